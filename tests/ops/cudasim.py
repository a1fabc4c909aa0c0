"""Shared set-up of the kernel tests; import it before anything imports numba.cuda.

Without DECDEC_GPU_TESTS=1 the kernels run under Numba's CUDA simulator on the CPU (tiny shapes);
with it, on the real GPU. `kernels` marks tests that run in either; `gpu` those that need the GPU.
"""

import os
import sys

GPU_RUN = os.environ.get("DECDEC_GPU_TESTS") == "1"
if not GPU_RUN:  # the simulator must be on before numba.cuda is first imported
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba" in sys.modules and "numba.cuda" not in sys.modules:
        import numba.core.config

        numba.core.config.reload_config()

import pytest  # noqa: E402
import torch  # noqa: E402
from numba import cuda  # noqa: E402

SIMULATED = cuda.jit.__module__.startswith("numba.cuda.simulator")
ON_GPU = GPU_RUN and torch.cuda.is_available()
kernels = pytest.mark.skipif(not (SIMULATED or ON_GPU),
                             reason="no CUDA simulator (numba.cuda was imported first) and no GPU run asked")
gpu = pytest.mark.skipif(not ON_GPU, reason="needs DECDEC_GPU_TESTS=1 and a CUDA GPU")
