"""CUDA executor: the plan's decode step on the GPU, captured once as one CUDA graph (DESIGN.md §3, §6).

Everything is allocated at construction; a step allocates nothing and costs one `graph.replay()`:

- `DeviceModel` (built once, shared by executors): the quantized weights as `BaseGemv` objects, the
  residual tables in pinned, device-mapped host memory (`PinnedTable`, zero-copy) with their
  per-output scales on the GPU, and the other weights (embedding / lm_head fp16, norms float32).
- `DecodeState` (the torch half of a step, on any device): one static buffer per graph tensor, the
  step's inputs (token, position) as device tensors the graph reads, the fp16 KV cache
  [n_layers, max_seq, n_kv, hd], RoPE tables, and one function per non-GEMV op (`TORCH_OPS`), the
  math of `models/arch.py` rewritten only where it would read the position on the host.
- `CUDAExecutor`: binds every plan item to a launch, warms everything up on the capture stream and
  captures the step with `torch.cuda.graph(g, stream=main)`. `run(token, position)` writes the
  inputs on the replay stream, replays, and returns the logits.

Per-op timing (`run(..., timings)`, what `decdec profile` reads): a second graph, the "profiled
graph", is captured on the first timed step: the same launches with CUDA events recorded as graph
nodes (`external=True`, cudaEventRecordExternal) at the step's start and around every plan item on
its stream. Its replay is the real step (same kernels, same fork/join, no Python between ops) plus
two event-record nodes per op; events recorded inside a capture without `external` would only order
streams and could not be timed. `eager=True` launches item by item instead (as without a graph),
with ordinary timing events: that timeline is mostly Python launch gaps.

Streams and events (scheduler/plan.py): torch ops and base GEMVs run on the main stream. A
compensated group's side items wait for the fork event of its input on a high-priority side stream
(priority -1: measured on the H100, the pair slows down by ~8 % instead of 50-90 % at priority 0,
README "Base GEMV and correction concurrently"). The graph's three side nodes, selector -> dma ->
correction, are ONE launch of the fused `Correction` kernel (it selects, fetches over PCIe and
corrects itself); it runs as one more part of the base GEMV's `SplitOutput`, so whichever kernel
completes a row tile last writes the final fp16 output. The merge node is therefore a no-op on the
GPU, but its wait on the join event stays: the next consumer on the main stream must not start
before the correction has arrived, and every side stream must join back before the capture ends.

Precision: GEMV inputs and outputs are fp16 (the kernels' contract), the KV cache is fp16, and
everything else (the residual stream, norms, attention, softmax) is float32, because Gemma 3's
residual stream exceeds fp16's range (max |x| 104 061 on the evaluation text, CPU reference).

Prefill replays a base-only step graph token by token (see runtime/engine.py): the same kernels, no
dense copy of the weights; O(prompt) replays, which is fine for prompts of hundreds of tokens.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda

from decdec.models.arch import LINEAR_KINDS, KVCache, ModelArgs, act_mul, attention, embed, residual_add, rms_norm
from decdec.ops.base_gemv import SIMULATED, BaseGemv
from decdec.ops.correction import Correction
from decdec.ops.dma import PinnedTable
from decdec.ops.selector import bucket_bounds
from decdec.errors import ConfigError, DeviceError
from decdec.graph import Node
from decdec.scheduler.plan import CORRECTION_OPS, MAIN, SIDE, Launch, Plan, default_n_tb

FP16_INPUTS = ("base_gemv", "lm_head")  # ops that read fp16 buffers (the GEMV kernels, torch's fp16 matmul)
FP16_OUTPUTS = ("base_gemv",)  # ops that write fp16 buffers (a merge's output is its base GEMV's buffer)
DEVICE = "cuda"  # where DeviceModel and CUDAExecutor put their tensors


# ----------------------------------------------------------------------------------------------------
# pure helpers (any device; tested on the CPU)


def rope_table(head_dim: int, base: float, max_seq_len: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] of `models.arch.rope`'s angles at every position, computed the
    same way in float32 (a test checks that a lookup equals `rope`)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(max_seq_len, device=device).to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)


def rope_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`models.arch.rope` with looked-up cos / sin [T, hd], on x [T, heads, hd]."""
    hd = x.shape[-1]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos[:, None, :] + torch.cat([-x2, x1], -1) * sin[:, None, :]


def decode_attention(args: ModelArgs, weights, layer: int, qkv: torch.Tensor, position: torch.Tensor,
                     cache: KVCache, table: tuple[torch.Tensor, torch.Tensor], k_pos: torch.Tensor) -> torch.Tensor:
    """`models.arch.attend` for one token whose position is a device tensor: fixed shapes, no host sync.

    qkv [1, q + 2 kv] float32, position int64 [1], table = rope_table(...), k_pos = arange(max_seq).
    K and V are written into the cache at `position` (index_copy_), and attention reads the whole
    cache: `arch.attention_mask` hides the positions after `position` (and, on Gemma's sliding
    layers, those before its window). `arch.attend` itself slices the cache up to `int(position)`,
    which would read the position on the host, so its first half is repeated here.
    """
    p = f"layers.{layer}."
    if args.qkv_bias:
        qkv = qkv + weights[p + "qkv_bias"]
    q, k, v = qkv.split([args.q_dim, args.kv_dim, args.kv_dim], dim=-1)
    q = q.reshape(1, args.n_heads, args.head_dim)
    k = k.reshape(1, args.n_kv_heads, args.head_dim)
    v = v.reshape(1, args.n_kv_heads, args.head_dim)
    if args.is_gemma:
        q = rms_norm(q, weights[p + "q_norm"], args.norm_eps)
        k = rms_norm(k, weights[p + "k_norm"], args.norm_eps)
    cos, sin = (t.index_select(0, position) for t in table)  # [1, hd]
    q, k = rope_at(q, cos, sin), rope_at(k, cos, sin)
    cache.k[layer].index_copy_(0, position, k.to(cache.k.dtype))
    cache.v[layer].index_copy_(0, position, v.to(cache.v.dtype))
    keys, values = cache.k[layer].float(), cache.v[layer].float()  # [max_seq, KV, hd]
    return attention(args, layer, q, keys, values, position, k_pos)


def device_weights(weights: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The weights the torch ops use, on `device`: embed / lm_head fp16 (one tensor when tied), norms
    and biases float32 (a few KB; the math around them is float32). The linear groups' weights stay
    behind: the GEMV kernels hold their quantized form."""
    out = {name: w.to(device, torch.float32) for name, w in weights.items()
           if name not in ("embed", "lm_head") and name.rsplit(".", 1)[-1] not in LINEAR_KINDS}
    out["embed"] = weights["embed"].to(device, torch.float16)
    tied = weights["lm_head"] is weights["embed"]
    out["lm_head"] = out["embed"] if tied else weights["lm_head"].to(device, torch.float16)
    return out


def _width(args: ModelArgs, node: Node) -> int:
    """Elements of a node's output (one token)."""
    if node.op in ("base_gemv", "merge"):
        return node.attr("shape")[0]
    return {"embed": args.dim, "rms_norm": args.dim, "residual_add": args.dim, "attention": args.q_dim,
            "act_mul": args.ffn_dim, "lm_head": args.vocab_size}[node.op]


def buffer_specs(args: ModelArgs, nodes: list[Node]) -> tuple[dict[str, tuple[int, torch.dtype]], dict[str, str]]:
    """(specs, aliases): width and dtype of every tensor kept in a static buffer, and the tensors that
    share another's buffer. fp16 where a GEMV kernel or the fp16 lm_head reads it or a GEMV writes it,
    float32 elsewhere. The fused side nodes' tensors (indices, rows, correction) get no buffer, and a
    merge's output is its base GEMV's buffer, which the split-output arrival completes."""
    fp16 = {t for n in nodes if n.op in FP16_INPUTS for t in n.inputs}
    fp16 |= {t for n in nodes if n.op in FP16_OUTPUTS for t in n.outputs}
    specs, aliases = {}, {}
    for n in nodes:
        if n.op in CORRECTION_OPS[:-1]:
            continue
        if n.op == "merge":
            aliases[n.outputs[0]] = n.inputs[0]
            continue
        specs[n.outputs[0]] = (_width(args, n), torch.float16 if n.outputs[0] in fp16 else torch.float32)
    return specs, aliases


def check_plan(plan: Plan) -> None:
    """What the executor relies on: only fused corrections on the side stream; every wait names an
    event recorded earlier; every event the side stream records is waited for later on the main stream
    (so the side stream joins back before the step, and the capture, ends)."""
    recorded: dict[str, int] = {}
    waited_on_main: set[str] = set()
    for i, launch in enumerate(plan.launches):
        if launch.stream == SIDE and tuple(n.op for n in launch.nodes) != CORRECTION_OPS:
            raise ValueError(f"launch {i} ({launch.name}) runs on the side stream: only the fused {CORRECTION_OPS} may")
        for name in launch.waits:
            if name not in recorded:
                raise ValueError(f"launch {i} ({launch.name}) waits for '{name}' before anything records it")
            if launch.stream == MAIN:
                waited_on_main.add(name)
        for name in launch.records:
            recorded[name] = launch.stream
    unjoined = sorted(name for name, stream in recorded.items() if stream == SIDE and name not in waited_on_main)
    if unjoined:
        raise ValueError(f"the side stream never joins back after {unjoined}")


# ----------------------------------------------------------------------------------------------------
# the torch half of a step


class DecodeState:
    """Static buffers, step inputs, KV cache and RoPE tables of one plan on one device.

    `buf[name]` is a 1-D tensor per graph tensor (see `buffer_specs`); `token` and `position` are
    int64 [1] device tensors that the ops read, so the same launches serve every step. The torch ops
    (`TORCH_OPS`) compute in float32 and copy their result into their output buffer.
    """

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], nodes: list[Node], max_seq_len: int,
                 device, cache: KVCache | None = None):
        self.args, self.weights = args, weights  # weights: from device_weights()
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        specs, aliases = buffer_specs(args, nodes)
        self.buf = {name: torch.zeros(width, dtype=dtype, device=device) for name, (width, dtype) in specs.items()}
        for name, target in aliases.items():
            self.buf[name] = self.buf[target]
        self.cache = cache if cache is not None else KVCache.allocate(args, max_seq_len, device, torch.float16)
        bases = {args.rope_local_base if args.is_sliding(i) else args.rope_base for i in range(args.n_layers)}
        self.rope = {base: rope_table(args.head_dim, base, max_seq_len, device) for base in bases}
        self.k_pos = torch.arange(max_seq_len, device=device)

    def read(self, name: str) -> torch.Tensor:
        """A buffer as a float32 row [1, width]."""
        return self.buf[name].float()[None]

    def write(self, node: Node, value: torch.Tensor) -> None:
        self.buf[node.outputs[0]].copy_(value.reshape(-1))


def _embed(st: DecodeState, node: Node) -> None:
    st.write(node, embed(st.args, st.weights, st.token).float())  # Gemma's sqrt(dim) in fp16, as HF does


def _rms_norm(st: DecodeState, node: Node) -> None:
    st.write(node, rms_norm(st.read(node.inputs[0]), st.weights[node.attr("weight")], st.args.norm_eps))


def _attention(st: DecodeState, node: Node) -> None:
    args, layer = st.args, node.layer
    table = st.rope[args.rope_local_base if args.is_sliding(layer) else args.rope_base]
    st.write(node, decode_attention(args, st.weights, layer, st.read(node.inputs[0]), st.position, st.cache,
                                    table, st.k_pos))


def _act_mul(st: DecodeState, node: Node) -> None:
    st.write(node, act_mul(st.args, st.read(node.inputs[0])))


def _residual_add(st: DecodeState, node: Node) -> None:
    x, branch = (st.read(name) for name in node.inputs)
    st.write(node, residual_add(st.args, st.weights, x, branch, node.attr("post_norm")))


def _lm_head(st: DecodeState, node: Node) -> None:
    st.write(node, F.linear(st.buf[node.inputs[0]][None], st.weights["lm_head"]))  # fp16 in, fp32 accumulate


TORCH_OPS = {"embed": _embed, "rms_norm": _rms_norm, "attention": _attention, "act_mul": _act_mul,
             "residual_add": _residual_add, "lm_head": _lm_head}


# ----------------------------------------------------------------------------------------------------
# weights on the device


@dataclass
class DeviceGroup:
    """One linear group on the GPU: the quantized GEMV and, for DecDEC, its residual table."""

    shape: tuple[int, int]  # (out, in)
    gemv: BaseGemv | None  # None: `matvec` is used instead
    tensors: tuple  # the torch tensors the kernels read through Numba views (kept alive here)
    table: PinnedTable | None = None  # residual rows [in, stride], pinned and mapped (zero-copy)
    rscale: object = None  # Numba fp16 [out] view of the residual scales, on the GPU
    thresholds: np.ndarray | None = None  # float32 [in], the calibrated profile (bucket bounds per k_chunk)
    matvec: Callable | None = None  # matvec(x, out): a torch GEMV instead of ours (bench/'s baselines)


def fp16_matvec(weight: torch.Tensor) -> Callable:
    """matvec(x, out) = torch's fp16 GEMV of `weight` ([out, in], put on the GPU as fp16): the fp16
    reference of bench/gpu_engine.py."""
    w = weight.to(DEVICE, torch.float16).contiguous()
    return lambda x, out: torch.mv(w, x, out=out)


def torch_int4_matvec(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int = 128) -> Callable:
    """matvec(x, out) through torch's int4 kernel (`_weight_int4pack_mm`, bf16 activations): codes
    uint8 [out, in / 2] (two per byte, as `torch._convert_weight_to_int4pack` takes them),
    scales_zeros bf16 [in / group_size, out, 2]. The torch int4 path of bench/gpu_engine.py; its fp16
    to bf16 casts and the copy out are part of what that path costs."""
    packed = torch._convert_weight_to_int4pack(codes.to(DEVICE), 8)
    sz = scales_zeros.to(DEVICE, torch.bfloat16).contiguous()
    return lambda x, out: out.copy_(torch._weight_int4pack_mm(x.view(1, -1).to(torch.bfloat16), packed,
                                                              group_size, sz).view(-1))


def quantized_group(qweight, scales, zeros, act_scale, bits: int, group_size: int = 128, *, rows=None,
                    rscale=None, thresholds=None) -> DeviceGroup:
    """A DeviceGroup from FORMATS.md tensors (any device); with `rows` (uint8 [in, ceil(out / 2)]),
    `rscale` and `thresholds` also the residual table for DecDEC."""
    tensors = tuple(t.to(DEVICE).contiguous() for t in (qweight, scales, zeros))
    tensors += (act_scale.to(DEVICE, torch.float32).contiguous(),)
    gemv = BaseGemv(*tensors, bits, group_size)
    if gemv.plan.mma:  # the tensor-core kernel reads its own copy of the weights (`mma_layout`)
        tensors = tensors[1:]
    shape = (gemv.plan.out_features, gemv.plan.in_features)
    if rows is None:
        return DeviceGroup(shape, gemv, tensors)
    rscale_t = torch.as_tensor(rscale).to(DEVICE, torch.float16).contiguous()
    table = PinnedTable.from_array(rows.cpu().numpy() if torch.is_tensor(rows) else rows)
    thresholds = thresholds.cpu().numpy() if torch.is_tensor(thresholds) else thresholds
    return DeviceGroup(shape, gemv, tensors + (rscale_t,), table, cuda.as_cuda_array(rscale_t, sync=False),
                       np.asarray(thresholds, dtype=np.float32))


class DeviceModel:
    """A model's weights on the GPU (residual tables in pinned host memory), shared by executors."""

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], groups: dict[tuple[int, str], DeviceGroup]):
        require_cuda()
        self.args, self.groups = args, groups
        self.weights = device_weights(weights, DEVICE)

    @classmethod
    def from_prepared(cls, args: ModelArgs, weights, prepared_groups: dict, residuals: bool = True) -> "DeviceModel":
        """From `models.prepare.Prepared` parts; without `residuals` no pinned memory is taken."""
        require_cuda()
        groups = {}
        for key, g in prepared_groups.items():
            q = g.q
            extra = dict(rows=g.residual.rows, rscale=g.residual.scales, thresholds=g.thresholds) if residuals else {}
            groups[key] = quantized_group(q.qweight, q.scales, q.zeros, q.act_scale, q.bits, q.group_size, **extra)
        return cls(args, weights, groups)

    def close(self) -> None:
        """Free the pinned residual tables (no executor of this model may run afterwards)."""
        for g in self.groups.values():
            if g.table is not None:
                g.table.close()


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise DeviceError("config asks for device 'cuda', but no CUDA device is available here")
    if SIMULATED:
        raise DeviceError("Numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): the CUDA executor needs the GPU")


# ----------------------------------------------------------------------------------------------------
# the executor


@dataclass
class StepEvents:
    """The timing events of one step: `start` on the main stream before the first item, and a (start,
    end) pair per plan item on that item's stream. The profiled graph's events are its nodes: made once
    at its capture and read after every replay."""

    start: torch.cuda.Event
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event]]

    @classmethod
    def make(cls, n_items: int, external: bool) -> "StepEvents":
        def event():
            return torch.cuda.Event(enable_timing=True, external=external)

        return cls(event(), [(event(), event()) for _ in range(n_items)])

    def times(self, items, host_start: float) -> list[tuple]:
        """(plan item, start s, end s) per item: GPU times after `start`, placed after the host's clock
        at the step's start (call once the step has completed)."""
        ms = self.start.elapsed_time
        return [(item, host_start + ms(s) / 1e3, host_start + ms(e) / 1e3) for item, (s, e) in zip(items, self.marks)]


class CUDAExecutor:
    """Runs a plan on the GPU: captured into one CUDA graph (`capture=True`), or launch by launch.

    `cache`: share a KV cache with another executor of the same model (prefill's base-only step).
    Thread blocks of a correction: its graph node's `n_tb` attribute (the tuner's choice) where set,
    else `n_tb`, else `default_n_tb` of its shape.
    """

    def __init__(self, model: DeviceModel, plan: Plan, max_seq_len: int, *, capture: bool = True,
                 cache: KVCache | None = None, n_tb: int | None = None):
        require_cuda()
        check_plan(plan)
        self.model, self.plan = model, plan
        nodes = [n for launch in plan.launches for n in launch.nodes]
        self.state = DecodeState(model.args, model.weights, nodes, max_seq_len, DEVICE, cache)
        self.cache = self.state.cache
        # index MAIN / SIDE; priority -1 dispatches the correction's few blocks before the GEMV's
        self.streams = (torch.cuda.Stream(), torch.cuda.Stream(priority=-1))
        self.numba_streams = tuple(cuda.external_stream(s.cuda_stream) for s in self.streams)
        self.events = {name: torch.cuda.Event() for launch in plan.launches for name in launch.records}
        # Numba views of the fp16 buffers, made once: a conversion inside the capture could synchronize
        self.views = {name: cuda.as_cuda_array(t, sync=False) for name, t in self.state.buf.items()
                      if t.dtype == torch.float16}
        self.base_out = {(n.layer, n.attr("group")): n.outputs[0] for n in nodes if n.op == "base_gemv"}
        self.corrections: dict = {}
        self.splits: dict = {}  # the compensated groups' split outputs: the correction is their last part
        for n in nodes:
            if n.op == "correction":
                self._prepare_correction(n, n_tb)
        self.launches = [self._bind(launch) for launch in plan.launches]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.profiled: tuple[torch.cuda.CUDAGraph, StepEvents] | None = None  # captured by the first timed run
        # warm-up on the capture stream: Numba compiles, cuBLAS / SDPA initialise, lazy scratch is made
        # (a first cuBLAS call inside a capture invalidates it); it writes the cache at position 0 only
        with torch.no_grad(), torch.cuda.stream(self.streams[MAIN]):
            self._issue()
        torch.cuda.synchronize()
        if capture:
            self.graph = self._capture()

    @property
    def max_seq_len(self) -> int:
        return self.cache.k.shape[1]

    def _prepare_correction(self, node: Node, n_tb: int | None) -> None:
        key = (node.layer, node.attr("group"))
        g = self.model.groups[key]
        if g.table is None or g.gemv is None:
            raise ConfigError(f"{node.name}: group {key} has no residual table (model built without residuals)")
        k_chunk = node.attr("k_chunk")
        tb = node.attr("n_tb") or n_tb or default_n_tb(*g.shape)
        self.corrections[key] = Correction(g.table.device_array(), g.rscale, bucket_bounds(g.thresholds, k_chunk),
                                           k_chunk, n_tb=tb, tile_rows=g.gemv.plan.merge_rows)
        self.splits[key] = g.gemv.split_output(extra_parts=1)

    def _bind(self, launch: Launch):
        """The call that issues one launch, with every argument bound (nothing is looked up per step)."""
        node = launch.nodes[0]
        key = (node.layer, node.attr("group"))
        if launch.stream == SIDE:
            # the fused correction: it selects, fetches over PCIe, corrects and adds its part into the base
            # GEMV's split output; whichever kernel completes a tile writes the fp16 output (the merge)
            corr, split, act = self.corrections[key], self.splits[key], self.model.groups[key].gemv.act_scale
            x_n, out_n, stream = self.views[node.inputs[0]], self.views[self.base_out[key]], self.numba_streams[SIDE]
            return lambda: corr(x_n, act, out=out_n, merge=split, stream=stream)
        if node.op == "base_gemv":
            g, x, out = self.model.groups[key], node.inputs[0], node.outputs[0]
            if g.gemv is None:  # a torch baseline (fp16 torch.mv, torch's int4 kernel)
                matvec, xb, ob = g.matvec, self.state.buf[x], self.state.buf[out]
                return lambda: matvec(xb, ob)
            gemv, x_n, out_n = g.gemv, self.views[x], self.views[out]
            stream, merge = self.numba_streams[MAIN], self.splits.get(key)
            return lambda: gemv(x_n, out_n, stream, merge=merge)
        missing = [n.op for n in launch.nodes if n.op not in TORCH_OPS]
        if missing:
            raise ValueError(f"the CUDA executor has no launch for op(s) {missing}")
        # torch ops launch on the current stream, the main one; a fused pair runs as its two ops in turn
        calls = [functools.partial(TORCH_OPS[n.op], self.state, n) for n in launch.nodes]
        return lambda: [call() for call in calls]

    def _capture(self, timing: StepEvents | None = None) -> torch.cuda.CUDAGraph:
        """The step captured on the main stream (with `timing`: its events become nodes of the graph)."""
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, stream=self.streams[MAIN]):
            self._issue(timing)
        torch.cuda.synchronize()
        return graph

    def _capture_profiled(self) -> tuple[torch.cuda.CUDAGraph, StepEvents]:
        timing = StepEvents.make(len(self.plan.launches), external=True)
        return self._capture(timing), timing

    def _issue(self, timing: StepEvents | None = None) -> None:
        """Issue every plan item on its stream with its events; with `timing`, records its step start on
        the main stream and its pair around each item (after the item's wait, so a side item's start is
        when it may begin, not when its stream was last idle)."""
        if timing is not None:
            timing.start.record(self.streams[MAIN])
        for i, (launch, issue) in enumerate(zip(self.plan.launches, self.launches)):
            stream = self.streams[launch.stream]
            for name in launch.waits:
                stream.wait_event(self.events[name])
            if timing is not None:
                timing.marks[i][0].record(stream)
            issue()
            if timing is not None:
                timing.marks[i][1].record(stream)
            for name in launch.records:
                self.events[name].record(stream)

    @torch.no_grad()
    def run(self, token: int, position: int, timings: list | None = None, *, eager: bool = False) -> torch.Tensor:
        """One decode step; logits [vocab] float32 on the CPU. Replays the graph; with `timings`, replays
        the profiled graph instead and appends (plan item, start s, end s) per item as runtime/profiler.py
        expects (GPU times from its events, placed after the host's clock at the step's start). With
        `eager` (or without a graph) the items are launched one by one, timed with ordinary events."""
        if not 0 <= position < self.max_seq_len:
            raise ConfigError(f"position {position} is outside the KV cache (model.max_seq_len = {self.max_seq_len})")
        eager = eager or self.graph is None
        if timings is not None and not eager and self.profiled is None:
            self.profiled = self._capture_profiled()  # before the inputs are written: capture synchronizes
        main = self.streams[MAIN]
        with torch.cuda.stream(main):
            # the graph's inputs, written on the replay stream before the replay (DESIGN.md §6's race)
            self.state.token.fill_(token)
            self.state.position.fill_(position)
            host_start = time.perf_counter()
            timing = self._step(timings is not None, eager)
            logits = self.state.buf["logits"].to("cpu", copy=True)  # waits for main, which joined the side
        if timing is not None:
            torch.cuda.synchronize()
            timings.extend(timing.times(self.plan.launches, host_start))
        return logits

    def _step(self, timed: bool, eager: bool) -> StepEvents | None:
        """Issue one step on the current (main) stream; its timing events when `timed`."""
        if eager:
            timing = StepEvents.make(len(self.plan.launches), external=False) if timed else None
            self._issue(timing)
            return timing
        if not timed:
            self.graph.replay()
            return None
        graph, timing = self.profiled
        graph.replay()
        return timing

    def replay_only(self, position: int) -> None:
        """Set the position and replay, leaving the logits on the GPU (for timing the step alone)."""
        with torch.cuda.stream(self.streams[MAIN]):
            self.state.position.fill_(position)
            self.graph.replay()
