"""CPU executor: runs a plan's nodes in order with each op's CPU reference.

Every op has the same signature, `op(ex, node, env)`, reading its inputs from `env` (tensor name ->
tensor, rows of shape [1, width]) and writing its outputs there; `run` can time each one, which is
all `decdec profile` needs. Dense dequantized weights are made once at construction, so a step
allocates only its activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from decdec.models.arch import KVCache, ModelArgs, act_mul, attend, embed, residual_add, rms_norm
from decdec.models.prepare import PreparedGroup
from decdec.ops.layout import unpack_rows
from decdec.ops.selector import BucketBounds, bucket_bounds, select_bucket
from decdec.scheduler.plan import Plan


@dataclass
class CPUGroup:
    weight: torch.Tensor  # deq(Q), float32 [out, in]
    act_scale: torch.Tensor  # float32 [in]
    residual_rows: torch.Tensor  # uint8 [in, out/2]: the table the DMA reads
    residual_scales: torch.Tensor  # float32 [out]
    bounds: BucketBounds | None  # None when this group is not compensated


def cpu_groups(groups: dict[tuple[int, str], PreparedGroup], k_chunks: dict[tuple[int, str], int]) -> dict:
    return {
        key: CPUGroup(
            g.q.dequantize(), g.q.act_scale, g.residual.rows, g.residual.scales.float(),
            bucket_bounds(g.thresholds, k_chunks[key]) if k_chunks[key] else None,
        )
        for key, g in groups.items()
    }


class CPUExecutor:
    def __init__(self, args: ModelArgs, weights, groups: dict, plan: Plan, max_seq_len: int):
        self.args, self.weights, self.groups, self.plan = args, weights, groups, plan
        self.cache = KVCache.allocate(args, max_seq_len)

    def group(self, node) -> CPUGroup:
        return self.groups[node.layer, node.attr("group")]

    @torch.no_grad()
    def run(self, token: int, position: int, timings: list | None = None) -> torch.Tensor:
        """One decode step; logits [vocab]. With `timings`, appends (plan item, start s, end s)."""
        env = {"token": torch.tensor([token]), "position": torch.tensor([position])}
        for item in self.plan.items:
            start = time.perf_counter()
            OPS[item.node.op](self, item.node, env)
            if timings is not None:
                timings.append((item, start, time.perf_counter()))
        return env["logits"][0]


def _embed(ex, node, env):
    env[node.outputs[0]] = embed(ex.args, ex.weights, env["token"])


def _rms_norm(ex, node, env):
    env[node.outputs[0]] = rms_norm(env[node.inputs[0]], ex.weights[node.attr("weight")], ex.args.norm_eps)


def _base_gemv(ex, node, env):
    g = ex.group(node)
    env[node.outputs[0]] = (env[node.inputs[0]] * g.act_scale) @ g.weight.T


def _selector(ex, node, env):
    g = ex.group(node)
    env[node.outputs[0]] = select_bucket(env[node.inputs[0]] * g.act_scale, node.attr("k_chunk"), g.bounds)[0]


def _dma(ex, node, env):
    """Fetch the picked rows of the residual table (zero-copy on the GPU; an index here)."""
    env[node.outputs[0]] = ex.group(node).residual_rows[env[node.inputs[0]]]


def _correction(ex, node, env):
    """corr = R_hat[:, idx] @ x~[idx]: dequantize the fetched rows, weight them by their activations."""
    g = ex.group(node)
    x, idx, rows = (env[name] for name in node.inputs)
    n_out = g.residual_scales.shape[0]
    picked = (x * g.act_scale)[0, idx]  # [n]
    env[node.outputs[0]] = (picked @ (unpack_rows(rows, n_out) * g.residual_scales))[None]


def _merge(ex, node, env):
    env[node.outputs[0]] = env[node.inputs[0]] + env[node.inputs[1]]


def _attention(ex, node, env):
    env[node.outputs[0]] = attend(ex.args, ex.weights, node.layer, env[node.inputs[0]], env["position"], ex.cache)


def _act_mul(ex, node, env):
    env[node.outputs[0]] = act_mul(ex.args, env[node.inputs[0]])


def _residual_add(ex, node, env):
    x, branch = (env[name] for name in node.inputs)
    env[node.outputs[0]] = residual_add(ex.args, ex.weights, x, branch, node.attr("post_norm"))


def _lm_head(ex, node, env):
    env[node.outputs[0]] = env[node.inputs[0]] @ ex.weights["lm_head"].T


OPS = {
    "embed": _embed, "rms_norm": _rms_norm, "base_gemv": _base_gemv, "selector": _selector, "dma": _dma,
    "correction": _correction, "merge": _merge, "attention": _attention, "act_mul": _act_mul,
    "residual_add": _residual_add, "lm_head": _lm_head,
}
