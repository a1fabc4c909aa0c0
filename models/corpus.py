"""Text for calibration and evaluation, and its cutting into token windows.

The embedded default corpus is CPython's language reference (`pydoc_data.topics`, ~465 k
characters, shipped with every Python): topics in name order alternate between the calibration
half (even positions) and the evaluation half (odd), so the two never share a topic.

'pysource' is off-domain evaluation text: the source code of a fixed list of pure-Python stdlib
modules. The calibration text is English prose about the language; source code is another kind
of text (identifiers, indentation, operators, terse comments) that no calibration half contains,
and like pydoc_data it ships with every Python, so it needs no download. It changes only with the
Python version (a result can record the text's sha256).
"""

from __future__ import annotations

from pathlib import Path

import torch

from decdec.errors import ConfigError

HALVES = ("calibration", "eval")
# code-dense modules first: an evaluation reads only the first few thousand tokens
PYSOURCE_MODULES = ("bisect", "colorsys", "graphlib", "shlex", "textwrap", "fractions", "heapq", "statistics")


def pydoc_half(half: str) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)[HALVES.index(half) :: 2]
    return "\n\n".join(topics[name] for name in names)


def pysource() -> str:
    import importlib.util

    return "\n\n".join(Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8") for m in PYSOURCE_MODULES)


def corpus_text(corpus: str, half: str) -> str:
    """'pydoc' gives the named half of the embedded corpus, 'pysource' the stdlib source (all of it,
    whatever the half); anything else is a UTF-8 text file."""
    if corpus == "pydoc":
        return pydoc_half(half)
    if corpus == "pysource":
        return pysource()
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ConfigError(f"config field '{half}.corpus' = '{corpus}': no such text file (or use 'pydoc' or 'pysource')")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config field '{half}.corpus' = '{corpus}' is not UTF-8 text ({e})") from e


def check_disjoint(calibration: str, evaluation: str) -> None:
    """Calibration must not see the evaluation text: the same file, or 'pysource' (which has no
    halves), for both is refused."""
    same = calibration == evaluation == "pysource" or calibration not in ("pydoc", "pysource") and (
        Path(calibration).resolve() == Path(evaluation).resolve())
    if same:
        raise ConfigError(f"'calibration.corpus' and 'eval.corpus' are the same text ({calibration}): "
                          "calibration and evaluation text must not overlap")


def token_windows(tokenizer, text: str, ctx: int, max_tokens: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `ctx` tokens, each starting with BOS (when the model has one) and
    followed by the next ctx-1 tokens of text. Windows start until `max_tokens` text tokens are
    reached, and the last one is kept whole, so up to one window more than max_tokens is used (the
    perplexity functions report the exact count)."""
    ids = tokenizer.encode(text, add_bos=False)
    bos = [tokenizer.bos_id] if tokenizer.add_bos_default and tokenizer.bos_id is not None else []
    body = ctx - len(bos)
    windows = []
    for start in range(0, min(len(ids), max_tokens), body):
        chunk = ids[start : start + body]
        if len(chunk) < 2:
            break
        windows.append(torch.tensor(bos + chunk, dtype=torch.int64))
    if not windows:
        raise ConfigError(f"corpus is too short: {len(ids)} tokens, need at least 2")
    return windows
