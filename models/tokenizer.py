"""Text <-> token ids, built from GGUF metadata or from a Hugging Face `tokenizer.json`.

Both sources end in one fast `tokenizers.Tokenizer` (Rust) wrapped in `Tokenizer`, which owns the
BOS policy so that callers never depend on a post-processor.

A GGUF file has no `tokenizer.json`: llama.cpp defines its tokenizer from metadata, and we rebuild
llama.cpp's behaviour from the same keys.

* `tokenizer.ggml.model = 'llama'` (SentencePiece BPE with scores, e.g. Gemma 3). llama.cpp turns
  spaces into '▁' and then keeps merging the adjacent pair whose concatenation is the vocabulary
  piece with the highest score; characters no piece covers become `<0xNN>` byte tokens. That is
  plain BPE whose merge list holds every split of every piece, ranked by the merged piece's score,
  so we derive that list once and let `tokenizers` run it.
* `tokenizer.ggml.model = 'gpt2'` (byte-level BPE, e.g. SmolLM2). The merges are in the file; what
  the file names instead of storing is the split regex (`tokenizer.ggml.pre`), which we look up.

In both, control tokens (type 3, e.g. `<bos>`, `<start_of_turn>`) and user-defined tokens (type 4,
e.g. Gemma's `<table>` or its runs of spaces and newlines) are matched whole in the raw text before
anything else sees it, as llama.cpp's special-token partition does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from decdec.errors import ModelFileError, UnsupportedModelError

# llama.cpp's `llama_token_type`, as stored in `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # '▁': SentencePiece's visible space

# Split regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre`, as llama.cpp applies them:
# each regex in turn splits every piece the previous ones left, keeping matches and the text between.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)  # StarCoder-style: every digit alone, then GPT-2's split
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for a byte-level file that names no known pre-tokenizer: punctuation runs
    # are cut off first, then GPT-2's split, then digit runs and triples.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt2", "mpt", "olmo"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), (_QWEN2,)),
}
# Llama 3's vocabulary is used whole when a split piece is a token, before any merge (llama.cpp's
# `ignore_merges`), and llama.cpp adds BOS for it unless the file says otherwise.
_LLAMA3_FAMILY = {"llama-bpe", "llama3", "llama-v3"}


@dataclass
class Tokenizer:
    """Encodes text to token ids and back; adds BOS by the model's default unless told otherwise.

    Special and user-defined tokens written in the text (e.g. '<start_of_turn>') become their
    single ids. `decode` drops special tokens unless `skip_special=False`.
    """

    backend: tokenizers.Tokenizer = field(repr=False)
    bos_id: int | None
    eos_id: int | None
    add_bos_default: bool  # made False where the model has no BOS
    vocab_size: int
    chat_template: str | None = field(default=None, repr=False)  # the model's Jinja template, if it has one

    def __post_init__(self) -> None:
        self.add_bos_default = bool(self.add_bos_default and self.bos_id is not None)
        if not isinstance(self.chat_template, str):  # a malformed metadata value counts as none
            self.chat_template = None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; `add_bos=None` follows the model (`add_bos_default`)."""
        # The backend's post-processor (if any) is bypassed: BOS is this class's decision alone.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos_default if add_bos is None else add_bos
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of `ids`; special tokens (BOS, EOS, control tokens) are dropped by default."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)


# ---------------------------------------------------------------- GGUF


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF file describes, from its metadata as a plain dict (arrays as lists)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelFileError("GGUF metadata has no 'tokenizer.ggml.model': the file carries no tokenizer")
    builders = {"llama": _sentencepiece_backend, "gpt2": _byte_level_backend}
    if kind not in builders:
        raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported; supported: {sorted(builders)}")
    tokens, types = _tokens_and_types(meta)
    backend = builders[kind](meta, tokens, types)
    _add_whole_tokens(backend, tokens, types)
    bos_id = _checked_id(meta, "tokenizer.ggml.bos_token_id", len(tokens))
    eos_id = _checked_id(meta, "tokenizer.ggml.eos_token_id", len(tokens))
    # llama.cpp's defaults when the file has no flag: BOS for SentencePiece and Llama 3 vocabularies.
    default = kind == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3_FAMILY
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default))
    return Tokenizer(backend, bos_id, eos_id, add_bos, len(tokens), meta.get("tokenizer.chat_template"))


def _tokens_and_types(meta: dict[str, Any]) -> tuple[list[str], list[int]]:
    """`tokenizer.ggml.tokens` and their types (all NORMAL when the file gives none), checked."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFileError("GGUF metadata has no 'tokenizer.ggml.tokens' list")
    types = meta.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFileError(f"GGUF metadata: 'tokenizer.ggml.token_type' has {len(types)} entries for "
                             f"{len(tokens)} tokens")
    return list(tokens), [int(t) for t in types]


def _checked_id(meta: dict[str, Any], key: str, n_tokens: int) -> int | None:
    """A token id from the metadata, or None when absent; an id outside the vocabulary is an error."""
    value = meta.get(key)
    if value is None:
        return None
    if not 0 <= int(value) < n_tokens:
        raise ModelFileError(f"GGUF metadata: '{key}' = {value} is outside the vocabulary of {n_tokens} tokens")
    return int(value)


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    """Piece -> id. A piece listed twice keeps its last id, as llama.cpp's lookup does."""
    return {piece: index for index, piece in enumerate(tokens)}


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """llama.cpp's SentencePiece tokenizer: score-ranked merges, byte fallback, '▁' for spaces."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ModelFileError("GGUF metadata: a 'llama' tokenizer needs one 'tokenizer.ggml.scores' entry per token")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=_vocab(tokens),
        merges=derive_merges(tokens, scores, types),
        unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,  # characters outside the vocabulary become their <0xNN> byte tokens
    )
    backend = tokenizers.Tokenizer(model)
    # llama.cpp puts a space in front of every stretch of text that starts the input or follows a
    # special token (even when that text already starts with a space), then writes spaces as '▁'. Our
    # normalizer runs on exactly those stretches, since whole tokens are cut out of the text first.
    # No pre-tokenizer: SentencePiece merges across spaces, so the whole stretch is one BPE word.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    # Decoding undoes it: '▁' -> ' ', byte tokens -> UTF-8 text, and the added space comes off.
    undo = [decoders.Strip(content=" ", left=1, right=0)] if prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *undo])
    return backend


def derive_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's score-driven SentencePiece tokenizer.

    Every split `(left, right)` of a normal piece whose halves are normal pieces too becomes a
    merge, ranked by the score of the merged piece (best first; ties by id). Control, byte and
    user-defined tokens are never merge results: they are matched whole or are fallbacks.
    """
    normal = {piece for piece, kind in zip(tokens, types, strict=True) if kind == NORMAL}
    ranked = sorted((index for index, piece in enumerate(tokens) if types[index] == NORMAL and len(piece) > 1),
                    key=lambda index: (-scores[index], index))
    merges = []
    for index in ranked:
        piece = tokens[index]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def _byte_level_backend(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE with the file's merges and the split regex its `pre` names."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise UnsupportedModelError(f"GGUF pre-tokenizer 'tokenizer.ggml.pre' = {pre!r} is not supported; "
                                    f"supported: {sorted(PRE_SPLITS)}")
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelFileError("GGUF metadata: a 'gpt2' tokenizer needs 'tokenizer.ggml.merges'")
    # Byte-level pieces never contain a real space (it is spelled 'Ġ'), so one space separates a pair.
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise ModelFileError("GGUF metadata: every 'tokenizer.ggml.merges' entry must be two pieces and a space")
    model = models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=pre in _LLAMA3_FAMILY)
    backend = tokenizers.Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in PRE_SPLITS[pre]]
    # The regexes split the raw text; only then is each byte spelled as its printable stand-in.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_whole_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Make control/unknown tokens (special) and user-defined tokens (not special) match whole.

    They are matched on the raw text before normalization: user-defined tokens are stored with real
    spaces (Gemma's '  ' runs), as llama.cpp's converter pre-normalizes them. Each piece is already
    in the model's vocabulary, so it keeps its id.
    """

    def whole(kinds: tuple[int, ...], special: bool) -> list[AddedToken]:
        return [AddedToken(piece, special=special, normalized=False)
                for piece, kind in zip(tokens, types, strict=True) if kind in kinds and piece]

    backend.add_special_tokens(whole((CONTROL, UNKNOWN), special=True))
    backend.add_tokens(whole((USER_DEFINED,), special=False))


# ---------------------------------------------------------------- Hugging Face folders


def tokenizer_from_json(folder: Path, config: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer of a Hugging Face folder, from its `tokenizer.json`; None when it has none.

    BOS/EOS come from `tokenizer_config.json` next to it, else from `config` (the model's
    `config.json`). Whether BOS is added by default comes from `add_bos_token` in
    `tokenizer_config.json`, else from what the file's post-processor does.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON or an unknown schema
        raise ModelFileError(f"{path}: not a valid tokenizer.json ({err})") from err
    tok_config = _read_json(folder / "tokenizer_config.json")
    bos_id = _special_id(backend, tok_config.get("bos_token"), config.get("bos_token_id"))
    eos_id = _special_id(backend, tok_config.get("eos_token"), config.get("eos_token_id"))
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds(backend, bos_id)
    return Tokenizer(backend, bos_id, eos_id, add_bos, backend.get_vocab_size(with_added_tokens=True),
                     tok_config.get("chat_template"))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is absent; a corrupt file is an error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _special_id(backend: tokenizers.Tokenizer, token: Any, fallback: Any) -> int | None:
    """Id of a `tokenizer_config.json` token (a string or {'content': ...}), else the config's id.

    A config id may be a list (several end-of-sequence ids); the first one is taken.
    """
    token = token.get("content") if isinstance(token, dict) else token
    token_id = backend.token_to_id(token) if isinstance(token, str) else None
    if token_id is not None:
        return token_id
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return int(fallback) if fallback is not None else None


def _post_processor_adds(backend: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether the file's own post-processor puts BOS in front (Llama-style tokenizer.json files)."""
    return bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
