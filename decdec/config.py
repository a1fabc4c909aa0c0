"""The model config (YAML or the same dict): dataclasses, defaults, and validation.

Every field is checked; a bad one raises `ConfigError` naming the field, the bad value and what is
allowed. Unknown fields are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from decdec.constants import SELECTION_MODES
from decdec.errors import ConfigError


@dataclass(frozen=True)
class ModelSection:
    source: Any = "gemma3-270m"  # packaged name, .gguf path, HF folder, or {"synthetic": {...}}
    max_seq_len: int = 2048


@dataclass(frozen=True)
class QuantSection:
    method: str = "robust"  # rtn | awq | robust (AWQ validated on held-back rows, scored after DecDEC's compensation)
    bits: float = 3  # 3 | 4 | 3.5 (3.5: the more sensitive half of the layers at 4 bits)
    group_size: int = 128  # the AWQ / GPTQ standard: one scale + zero per 128 inputs
    lm_head_bits: int = 16  # 16 (fp16) | 8 (int8, a scale per vocabulary row: half the bytes, ppl within 0.5 %)


@dataclass(frozen=True)
class DecDECSection:
    residual_bits: int = 4  # the paper's choice: 4-bit residuals halve PCIe bytes vs 8 at ~no quality cost
    chunk_size: int = 1024  # channels per selection chunk (one thread block scans one)
    n_buckets: int = 32  # approximate top-k resolution
    k_chunk: int | None = 32  # channels fetched per 1024-channel chunk
    target_slowdown: float | None = None  # e.g. 0.05: the tuner picks k_chunk and n_tb per group shape (GPU)
    device_profile: str | None = None  # `decdec tune`'s JSON; default <cache>/device-profiles/<GPU name>.json
    selection: str = "bucket"  # bucket | exact | static | none


@dataclass(frozen=True)
class CorpusSection:
    corpus: str = "pydoc"  # "pydoc" (CPython's language reference, split by topic) or a text file
    # calibration: text tokens, BOS not counted, in whole windows (2048 at ctx 512: 4 windows, 5 for a
    # model that starts each window with BOS); CPU-bound. Evaluation: tokens predicted.
    tokens: int = 2048
    ctx: int = 512  # window length


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    decdec: DecDECSection = field(default_factory=DecDECSection)
    calibration: CorpusSection = field(default_factory=CorpusSection)
    eval: CorpusSection = field(default_factory=lambda: CorpusSection(tokens=8192))
    device: str = "cpu"  # cpu | cuda
    artifacts: str | None = None  # folder; default <cache>/artifacts/<model>-<method><bits>-<key hash>

    def artifact_dir(self, key_hash: str) -> Path:
        """The explicit `artifacts` folder, else the per-user cache's folder for this model + config
        (`key_hash`: the hash of what the artifacts depend on, so different keys never share one)."""
        if self.artifacts:
            return Path(self.artifacts).expanduser()
        src = self.model.source
        name = "synthetic" if isinstance(src, dict) else Path(str(src)).name.removesuffix(".gguf")
        return cache_root() / "artifacts" / f"{name}-{self.quant.method}{self.quant.bits:g}-{key_hash[:16]}"

    def quant_k_chunk(self) -> int:
        """The k_chunk whose compensation the 'robust' quantizer plans for: DecDEC's fixed k_chunk,
        or 0 when DecDEC is off or a tuner picks k_chunk per layer later."""
        return (self.decdec.k_chunk or 0) if self.decdec.selection != "none" else 0


def cache_root() -> Path:
    """Where prepared artifacts and device profiles live, whatever the current directory:
    $DECDEC_CACHE, else $XDG_CACHE_HOME/decdec, else ~/.cache/decdec."""
    if os.environ.get("DECDEC_CACHE"):
        return Path(os.environ["DECDEC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "decdec"


ALLOWED = {  # field path -> allowed values (checked after the type)
    "quant.method": ("rtn", "awq", "robust"),
    "quant.bits": (3, 4, 3.5),
    "quant.group_size": (128,),
    "quant.lm_head_bits": (16, 8),
    "decdec.residual_bits": (4,),
    "decdec.chunk_size": (1024,),
    "decdec.n_buckets": (32,),
    "decdec.selection": SELECTION_MODES,
    "device": ("cpu", "cuda"),
}
RANGES = {  # field path -> (low, high) inclusive
    "model.max_seq_len": (1, 1 << 20),
    "decdec.k_chunk": (0, 1024),
    "decdec.target_slowdown": (0.0, 10.0),
    "calibration.tokens": (1, 1 << 24),
    "calibration.ctx": (2, 1 << 20),
    "eval.tokens": (1, 1 << 24),
    "eval.ctx": (2, 1 << 20),
}
TYPES = {"int": int, "float": (int, float), "str": str, "int | None": (int, type(None)),
         "float | None": (int, float, type(None)), "str | None": (str, type(None)), "Any": object}


def _check(path: str, value: Any, annotation: str) -> Any:
    expected = TYPES.get(annotation, object)
    if isinstance(value, bool) and annotation != "Any" or not isinstance(value, expected):
        raise ConfigError(f"config field '{path}' = {value!r} has the wrong type: expected {annotation}")
    if path in ALLOWED and value not in ALLOWED[path]:
        raise ConfigError(f"config field '{path}' = {value!r} is not allowed: allowed are {list(ALLOWED[path])}")
    if path in RANGES and value is not None and not RANGES[path][0] <= value <= RANGES[path][1]:
        low, high = RANGES[path]
        raise ConfigError(f"config field '{path}' = {value!r} is out of range: allowed {low} .. {high}")
    return value


def _build(default, data: Any, prefix: str):
    """`default` (a dataclass instance) with the fields given in `data` replaced, each checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(default)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in section '{prefix}'" if prefix else "at the top level"
        raise ConfigError(f"unknown config field '{unknown[0]}' {where}: allowed fields are {sorted(fields)}")
    values = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            values[name] = _build(current, value, path)
        else:
            values[name] = _check(path, value, str(fields[name].type))
    return dataclasses.replace(default, **values)


def load_config(cfg: str | Path | dict | Config | None) -> Config:
    """A Config from a YAML path, a dict, or None (the defaults: the embedded model, 3-bit robust AWQ)."""
    if cfg is None:
        return Config()
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.exists():
            raise ConfigError(f"config file '{path}' not found")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    decdec = cfg.get("decdec") if isinstance(cfg, dict) else None
    if isinstance(decdec, dict) and decdec.get("target_slowdown") is not None:
        if decdec.get("k_chunk") is not None:
            raise ConfigError("config fields 'decdec.k_chunk' and 'decdec.target_slowdown' exclude each other: set one")
        cfg = {**cfg, "decdec": {**decdec, "k_chunk": None}}  # the tuner will choose k_chunk
    config = _build(Config(), cfg, "")
    if config.decdec.k_chunk is None and config.decdec.target_slowdown is None:
        raise ConfigError("config fields 'decdec.k_chunk' and 'decdec.target_slowdown' are both unset: set one")
    return config
