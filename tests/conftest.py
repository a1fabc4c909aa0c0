"""Shared test set-up.

Numba's CUDA simulator is switched on here, before any test module imports numba.cuda (the models
import the ops, whose kernels import it), unless DECDEC_GPU_TESTS=1 asks for the real GPU. Tests
marked `gpu` skip cleanly on a machine without a CUDA device.
"""

import os

if os.environ.get("DECDEC_GPU_TESTS") != "1":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest  # noqa: E402


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
