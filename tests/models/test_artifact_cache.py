"""The per-user artifact cache: keyed folders reused from any directory, one prepare per folder at a
time across processes, and Ctrl-C mid-prepare leaving nothing that a later run trusts."""

import subprocess
import sys
import time
from pathlib import Path

import yaml

from decdec.config import cache_root
from decdec.models import artifacts
from decdec.models.loader import synthetic_model
from decdec.models.prepare import artifact_folder, prepare
from decdec.config import load_config
from decdec.scheduler.profile import default_path

ROOT = Path(__file__).resolve().parents[2]
TINY = {"family": "llama", "vocab_size": 200, "dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
        "head_dim": 32, "ffn_dim": 128, "max_seq_len": 64}


def cfg(bits=3) -> dict:
    return {"model": {"source": {"synthetic": TINY}, "max_seq_len": 64}, "quant": {"method": "rtn", "bits": bits},
            "decdec": {"k_chunk": 256}, "calibration": {"tokens": 64, "ctx": 32}}


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DECDEC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "decdec"
    assert default_path("NVIDIA H200") == tmp_path / "xdg" / "decdec" / "device-profiles" / "nvidia-h200.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "decdec"
    monkeypatch.setenv("DECDEC_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_keyed_folders_reused_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DECDEC_CACHE", str(tmp_path / "cache"))
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = prepare(cfg(), progress=False)
    assert not first.reused and first.folder.parent == tmp_path / "cache" / "artifacts"
    monkeypatch.chdir(tmp_path / "b")
    again = prepare(cfg(), progress=False)
    assert again.reused and again.folder == first.folder
    four = prepare(cfg(bits=4), progress=False)  # another key: its own folder, the first one untouched
    assert not four.reused and four.folder != first.folder
    assert prepare(cfg(), progress=False).reused
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())


def _wait_for(path: Path, text: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.time() < end, f"{path} never said {text!r}: {path.read_text() if path.exists() else ''}"
        time.sleep(0.2)


def test_concurrent_prepares_of_one_key_wait_for_each_other(tmp_path, monkeypatch):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg()))
    monkeypatch.setenv("DECDEC_CACHE", str(tmp_path / "cache"))
    folder = artifact_folder(synthetic_model(TINY), load_config(cfg()))
    procs = []
    with artifacts.locked(folder):  # both start while the folder is locked: each must wait
        for i in range(2):
            err = tmp_path / f"err{i}"
            procs.append((subprocess.Popen([sys.executable, "-m", "decdec.runtime.cli", "prepare", str(config)],
                                           cwd=ROOT, stdout=subprocess.PIPE, stderr=err.open("w"),
                                           text=True), err))
        for _, err in procs:
            _wait_for(err, f"waiting for another prepare of {folder}")
        assert not (folder / "manifest.json").exists()
    outs = sorted(p.communicate(timeout=300)[0] for p, _ in procs)
    assert [p.returncode for p, _ in procs] == [0, 0]
    assert outs[0].startswith(f"artifacts ready in {folder}") and outs[1].startswith(f"artifacts reused in {folder}")
    assert prepare(cfg(), progress=False).reused


SIGINT_MID_PREPARE = """
import os, signal, sys
from decdec.models import artifacts
from decdec.runtime.cli import main

real = artifacts.save_file
def save_then_ctrl_c(tensors, path):  # a real SIGINT once the first file is in place
    real(tensors, path)
    os.kill(os.getpid(), signal.SIGINT)
artifacts.save_file = save_then_ctrl_c
sys.exit(main(["prepare", sys.argv[1]]))
"""


def test_sigint_mid_prepare_exits_130_and_leaves_nothing_trusted(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**cfg(), "artifacts": str(tmp_path / "art")}))
    done = subprocess.run([sys.executable, "-c", SIGINT_MID_PREPARE, str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130
    assert done.stderr.endswith("\ninterrupted\n") and "Traceback" not in done.stderr
    files = [p.name for p in (tmp_path / "art").iterdir()]
    assert "manifest.json" not in files and not [f for f in files if f.endswith(".tmp")]
    again = prepare({**cfg(), "artifacts": str(tmp_path / "art")}, progress=False)
    assert not again.reused  # rebuilt: the leftover file was not trusted
