"""DecDEC: low-bit LLM decoding with dynamic error compensation from pinned CPU memory.

The namespace maps the project's top-level folders (pyproject.toml): `decdec.models`,
`decdec.ops`, `decdec.scheduler`, `decdec.runtime`. This folder is the base layer under all of
them and imports nothing of ours: `errors`, `config` (the validated config schema), `graph`
(the op-graph IR) and `constants`.

    from decdec import runtime
    engine = runtime.compile("configs/gemma3-270m-3bit.yaml")
    logits = engine.step(token)
"""

import os as _os

# In a source checkout (tests, bench, a lent GPU) the subpackages are this folder's siblings;
# installed, pyproject.toml's package-dir has put them inside it and there is no pyproject.toml here.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)
