"""A new user's first minutes: `decdec run` with the default model from a clean cache,
then again from another directory.

    python bench/first_run.py --out bench/results/first_run.json
    python bench/first_run.py --decdec /tmp/venv/bin/decdec   # the installed console script

Each run starts in a fresh temporary directory with DECDEC_CACHE pointing at a fresh (first run) or
the same (second run) cache folder. Times are wall seconds from the process start: the first
generated text on stdout (after the prompt), the end of generation (the tokens/s line), and the
exit; stderr lines mark when each preparation stage started. The second run skips the perplexity
comparison (`--ppl-tokens 0`): what it measures is how soon a cached model starts generating.
The machine's load average is recorded before and after: on shared cores the times vary with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402

PROMPT = "The capital of France is"  # the CLI's default prompt
STAGES = ("preparing", "calibration activations", "quantizing", "residuals + thresholds", "model ")


def timed_run(command: list[str], cache: Path, extra: list[str]) -> dict:
    """Run `command run` in a new temporary directory; stage and output times in seconds."""
    env = {**os.environ, "DECDEC_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        proc = subprocess.Popen([*command, "run", *extra], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
        stages: dict[str, float] = {}
        err_lines: list[str] = []

        def read_stderr() -> None:
            buf = b""
            while chunk := proc.stderr.read(256):
                buf += chunk
                for line in buf.replace(b"\r", b"\n").split(b"\n")[:-1]:
                    text = line.decode(errors="replace")
                    for stage in STAGES:
                        if text.startswith(stage):
                            stages.setdefault(stage.strip(), time.perf_counter() - start)
                    if text and "it/s" not in text and "s/it" not in text:
                        err_lines.append(text)
                buf = buf.replace(b"\r", b"\n").split(b"\n")[-1]

        reader = threading.Thread(target=read_stderr)
        reader.start()
        out, first_token = b"", None
        while chunk := proc.stdout.read(1):
            out += chunk
            at = out.find(PROMPT.encode())
            if first_token is None and at >= 0 and len(out) > at + len(PROMPT):
                first_token = time.perf_counter() - start
        proc.wait()
        total = time.perf_counter() - start
        reader.join()
    rate = next((line for line in err_lines if "tokens/s" in line), None)
    return {"command": " ".join([*command, "run", *extra]), "exit_code": proc.returncode,
            "first_token_s": first_token, "total_s": total, "stage_start_s": stages,
            "generation": rate, "stdout": out.decode(errors="replace"), "stderr_lines": err_lines[-12:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decdec", help="the decdec command (default: this checkout's `python -m decdec.runtime.cli`)")
    p.add_argument("--out", default="bench/results/first_run.json")
    args = p.parse_args()
    command = [args.decdec] if args.decdec else [sys.executable, "-m", "decdec.runtime.cli"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        first = timed_run(command, cache, [])
        print(json.dumps({k: first[k] for k in ("exit_code", "first_token_s", "total_s", "stage_start_s")}), flush=True)
        second = timed_run(command, cache, ["--ppl-tokens", "0"])
        print(json.dumps({k: second[k] for k in ("exit_code", "first_token_s", "total_s")}), flush=True)
    result = {**run_meta(), "cpu_count": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "first_run": first, "second_run": second,
              "goals_s": {"first_token": 60, "first_command": 150, "second_run_first_token": 15}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
