"""Torch GEMVs that stand in for our base GEMV in the CUDA executor (`DeviceGroup.matvec`): the fp16 and
torch-int4 baselines that gpu_engine.py times beside our kernels. Bench-only: nothing in the product uses them."""

from __future__ import annotations

from typing import Callable

import torch


def fp16_matvec(weight: torch.Tensor, device="cuda") -> Callable:
    """matvec(x, out) = torch's fp16 GEMV of `weight` ([out, in], put on `device` as fp16): the fp16
    reference of gpu_engine.py."""
    w = weight.to(device, torch.float16).contiguous()
    return lambda x, out: torch.mv(w, x, out=out)


def torch_int4_matvec(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int = 128) -> Callable:
    """matvec(x, out) through torch's int4 kernel (`_weight_int4pack_mm`, bf16 activations): codes
    uint8 [out, in / 2] (two per byte, as `torch._convert_weight_to_int4pack` takes them),
    scales_zeros bf16 [in / group_size, out, 2]. The torch int4 path of gpu_engine.py; its fp16
    to bf16 casts and the copy out are part of what that path costs."""
    packed = torch._convert_weight_to_int4pack(codes.to("cuda"), 8)
    sz = scales_zeros.to("cuda", torch.bfloat16).contiguous()
    return lambda x, out: out.copy_(torch._weight_int4pack_mm(x.view(1, -1).to(torch.bfloat16), packed,
                                                              group_size, sz).view(-1))
