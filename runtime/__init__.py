"""DecDEC runtime: config, op graph, compile, executors, engine, profiler and CLI.

    engine = runtime.compile("configs/gemma3-270m-3bit.yaml")
    logits = engine.step(token)
"""


def compile(model_cfg, progress: bool = True, force: bool = False):
    """Config (YAML path, dict or Config) -> a ready decode engine (see runtime/engine.py)."""
    from decdec.runtime.engine import compile as _compile  # imported lazily: `runtime.errors` stays light

    return _compile(model_cfg, progress=progress, force=force)
