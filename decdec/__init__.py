"""DecDEC: low-bit LLM decoding with dynamic error compensation from pinned CPU memory.

The namespace maps the project's top-level folders (pyproject.toml): `decdec.models`,
`decdec.ops`, `decdec.scheduler`, `decdec.runtime`. This folder is the base layer under all of
them and imports nothing of ours: `errors`, `config` (the validated config schema), `graph`
(the op-graph IR) and `constants`.

    from decdec import runtime
    engine = runtime.compile("configs/gemma3-270m-3bit.yaml")
    logits = engine.step(token)
"""
