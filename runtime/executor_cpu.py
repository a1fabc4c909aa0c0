"""CPU executor: the reference of the decode step. It runs the unfused plan (one launch per graph
node, in graph order) with each logical op's CPU reference: the same ops, in the same order, that
the GPU fuses into its launches, and the same functions the batch simulation of perplexity uses.

Every op has one signature, `op(ex, node, env)`, reading its inputs from `env` (tensor name ->
tensor, rows of shape [1, width]) and writing its outputs there; `run` can time each one, which is
all `decdec profile` needs. Dense dequantized weights are made once at construction.
"""

from __future__ import annotations

import time

import torch

from decdec.args import ModelArgs
from decdec.models.arch import embed
from decdec.ops.act import act_mul
from decdec.ops.attention import KVCache, attend
from decdec.ops.correction import compensate
from decdec.ops.norm import residual_add, rms_norm
from decdec.ops.selector import bucket_bounds, select_bucket
from decdec.runtime.evaluate import DenseGroup
from decdec.scheduler.plan import Plan


class CPUExecutor:
    def __init__(self, args: ModelArgs, weights, groups: dict[tuple[int, str], DenseGroup], plan: Plan,
                 max_seq_len: int):
        self.args, self.weights, self.groups, self.plan = args, weights, groups, plan
        self.bounds = {(n.layer, n.attr("group")): bucket_bounds(self.group(n).thresholds, n.attr("k_chunk"))
                       for launch in plan.launches for n in launch.nodes if n.op == "selector"}  # at its k_chunk
        self.cache = KVCache.allocate(args, max_seq_len)

    def group(self, node) -> DenseGroup:
        return self.groups[node.layer, node.attr("group")]

    @torch.no_grad()
    def run(self, token: int, position: int, timings: list | None = None) -> torch.Tensor:
        """One decode step; logits [vocab]. With `timings`, appends (launch, start s, end s)."""
        env = {"token": torch.tensor([token]), "position": torch.tensor([position])}
        for launch in self.plan.launches:
            start = time.perf_counter()
            for node in launch.nodes:
                env[node.outputs[0]] = OPS[node.op](self, node, env)
            if timings is not None:
                timings.append((launch, start, time.perf_counter()))
        return env["logits"][0]


def _inputs(env, node) -> list:
    return [env[name] for name in node.inputs]


def _scaled(ex, node, env):
    """x~ = x * act_scale: what both the GEMV and the selector see."""
    return env[node.inputs[0]] * ex.group(node).act_scale


OPS = {
    "embed": lambda ex, n, env: embed(ex.args, ex.weights, env["token"]),
    "rms_norm": lambda ex, n, env: rms_norm(env[n.inputs[0]], ex.weights[n.attr("weight")], ex.args.norm_eps),
    "base_gemv": lambda ex, n, env: _scaled(ex, n, env) @ ex.group(n).weight.T,
    "selector": lambda ex, n, env: select_bucket(_scaled(ex, n, env), n.attr("k_chunk"), ex.bounds[n.layer, n.attr("group")]),
    # the table is in host memory already: on the CPU the correction reads its rows in place
    "dma": lambda ex, n, env: ex.group(n).residual,
    "correction": lambda ex, n, env: compensate(_scaled(ex, n, env), *_inputs(env, n)[1:]),
    "merge": lambda ex, n, env: env[n.inputs[0]] + env[n.inputs[1]],
    "attention": lambda ex, n, env: attend(ex.args, ex.weights, n.layer, env[n.inputs[0]], env["position"], ex.cache),
    "act_mul": lambda ex, n, env: act_mul(ex.args, env[n.inputs[0]]),
    "residual_add": lambda ex, n, env: residual_add(ex.args, ex.weights, *_inputs(env, n), n.attr("post_norm")),
    "lm_head": lambda ex, n, env: env[n.inputs[0]] @ ex.weights["lm_head"].T,
}
