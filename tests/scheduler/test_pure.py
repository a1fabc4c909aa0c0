"""The scheduler and the base layer are pure Python: importing them must not load torch or numba."""

import subprocess
import sys


def test_scheduler_imports_no_torch():
    code = ("import sys; import decdec.scheduler.plan, decdec.scheduler.tuner, decdec.scheduler.latency, "
            "decdec.scheduler.profile, decdec.graph, decdec.config, decdec.constants; "
            "heavy = sorted(m for m in ('torch', 'numba', 'numpy') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the scheduler pulled in {out.strip()}"
