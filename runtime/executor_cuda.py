"""CUDA executor: the plan's decode step on the GPU, captured once as one CUDA graph.

Everything is allocated at construction; a step allocates nothing and costs one `graph.replay()`:

- `DeviceModel` (built once, shared by executors): the quantized weights as `BaseGemv` objects, the
  residual tables in pinned, device-mapped host memory (`PinnedTable`, zero-copy) with their
  per-output scales on the GPU, and the other weights (embedding fp16, lm_head fp16 or int8 codes with
  float32 row scales, norms float32).
- `DecodeState`: one static buffer per graph tensor, the step's inputs (token, position) as device
  tensors the graph reads, the fp16 KV cache [n_layers, max_seq, n_kv, hd] and the RoPE tables; the
  torch ops of a step (`TORCH_OPS`: the embedding row, an fp16 lm_head; an int8 one is our kernel).
- `CUDAExecutor`: binds every plan launch to a kernel (the base GEMV and the fused correction, each
  with the glue the plan folds into them: the norm or act x up before, the residual add after; the
  fused residual add + RMSNorm where it stays apart; attention with RoPE and the KV write; all from
  ops/), warms everything up on the capture stream and captures the step with
  `torch.cuda.graph(g, stream=main)`.
  `run(token, position)` writes the inputs on the replay stream, replays, and returns the logits.

Streams (scheduler/plan.py): every launch but the corrections runs on the main stream. A compensated
group's fused correction (selector -> dma -> correction -> merge) waits for its input's event on a
high-priority side stream, so its few blocks are dispatched before the GEMV's; it adds its part into
the base GEMV's `SplitOutput`, and whichever kernel completes a row tile last writes the output (fp16,
or the float32 residual stream where the add is folded). The next reader of that output waits for the
side launch's event, which also joins the side stream back before the capture ends.

Programmatic dependent launch (compute capability 9.0+): after the capture, every edge from a kernel to
one of our kernels (`PDL_KERNELS`) becomes a programmatic edge (`programmatic_edges`), so a kernel's
blocks launch while the kernel before it still runs and load what no kernel of the step writes
(weights, the cache's earlier rows) before `ops.ptx.wait_upstream`. A decode step is a chain of a few
hundred short kernels: each launch's ramp and first memory round trip otherwise sit on that chain.

Per-launch timing (`run(..., timings)`, what `decdec profile` reads): a second captured graph with
CUDA events as graph nodes (`external=True`) at the step's start and around every launch; its
replay is the real step plus two event nodes per launch. `eager=True` launches one by one instead,
with ordinary events: that timeline is mostly Python launch gaps.

Precision: GEMV inputs and outputs and the KV cache are fp16; the residual stream is float32
(Gemma 3's exceeds fp16's range), and the layer kernels compute in float32.

Prefill replays a base-only step graph token by token (runtime/engine.py): the same kernels, no
dense copy of the weights.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda

from decdec.args import ModelArgs
from decdec.constants import LINEAR_KINDS
from decdec.models.arch import embed
from decdec.ops.attention import AttentionScratch, DecodeAttention, KVCache, plan_attention, rope_table
from decdec.ops.base_gemv import BaseGemv
from decdec.ops.correction import Correction
from decdec.ops.dma import PinnedTable
from decdec.ops.lm_head import MAX_DIM as LM_HEAD_MAX_DIM, VECTOR as LM_HEAD_VECTOR, Int8LmHead, width_supported
from decdec.ops.norm import AddRmsNorm
from decdec.ops.ptx import pdl_supported
from decdec.ops.selector import bucket_bounds
from decdec.errors import ConfigError, DeviceError
from decdec.graph import Node
from decdec.runtime.tune import require_gpu
from decdec.scheduler.plan import CORRECTION_OPS, FOLDS, MAIN, SIDE, Launch, Plan, default_n_tb

# our kernels that wait for the kernel before them (`ops.ptx.wait_upstream`) before reading what it writes:
# only an edge into one of these may become programmatic (matched in the kernel's mangled name)
PDL_KERNELS = ("_mma_kernel", "_correction_kernel", "_add_rms_norm_kernel", "_attention_kernel", "_lm_head_kernel")
FP16_INPUTS = ("base_gemv", "lm_head")  # ops that read fp16 buffers (the GEMV kernels, the lm_head)
FP16_OUTPUTS = ("base_gemv",)  # ops that write fp16 buffers (a merge's output is its base GEMV's buffer)
DEVICE = "cuda"  # where DeviceModel and CUDAExecutor put their tensors


# ----------------------------------------------------------------------------------------------------
# pure helpers (any device; tested on the CPU)


def device_weights(weights: dict[str, torch.Tensor], device, fp16_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The weights the torch ops use, on `device`: embed / lm_head fp16 (one tensor when tied; no lm_head
    without `fp16_lm_head`: the int8 kernel reads its own codes), norms and biases float32 (a few KB; the math
    around them is float32). The linear groups' weights stay behind: the GEMV kernels hold their
    quantized form."""
    out = {name: w.to(device, torch.float32) for name, w in weights.items()
           if name not in ("embed", "lm_head") and name.rsplit(".", 1)[-1] not in LINEAR_KINDS}
    out["embed"] = weights["embed"].to(device, torch.float16)
    if fp16_lm_head:
        tied = weights["lm_head"] is weights["embed"]
        out["lm_head"] = out["embed"] if tied else weights["lm_head"].to(device, torch.float16)
    return out


def _width(args: ModelArgs, node: Node) -> int:
    """Elements of a node's output (one token)."""
    if node.op in ("base_gemv", "merge"):
        return node.attr("shape")[0]
    return {"embed": args.dim, "rms_norm": args.dim, "residual_add": args.dim, "attention": args.q_dim,
            "act_mul": args.ffn_dim, "lm_head": args.vocab_size}[node.op]


def buffer_specs(args: ModelArgs, launches: tuple[Launch, ...]) -> tuple[dict[str, tuple[int, torch.dtype]],
                                                                         dict[str, str]]:
    """(specs, aliases): width and dtype of every tensor kept in a static buffer, and the tensors that
    share another's buffer. fp16 where a GEMV kernel or the fp16 lm_head reads it or a GEMV writes it,
    float32 elsewhere. The fused side nodes' tensors (indices, rows, correction) and the tensors that
    live inside a GEMV's launch and its correction's (the glue folded into them) get no buffer, and a
    merge's output is its base GEMV's buffer, which the split-output arrival completes."""
    nodes = [n for launch in launches for n in launch.nodes]
    fp16 = {t for n in nodes if n.op in FP16_INPUTS for t in n.inputs}
    fp16 |= {t for n in nodes if n.op in FP16_OUTPUTS for t in n.outputs}
    readers: dict[str, set[int]] = {}  # tensor -> the launches that read it
    for i, launch in enumerate(launches):
        for n in launch.nodes:
            for t in n.inputs:
                readers.setdefault(t, set()).add(i)
    made = [{t for n in launch.nodes for t in n.outputs} for launch in launches]
    # folded glue: read only by GEMV or correction launches that make it themselves
    inside = {t for i, launch in enumerate(launches) if "base_gemv" in launch.op for t in made[i]
              if readers.get(t) and all(t in made[j] for j in readers[t])}
    specs, aliases = {}, {}
    for n in nodes:
        if n.op in CORRECTION_OPS[:-1] or n.outputs[0] in inside:
            continue
        if n.op == "merge":
            aliases[n.outputs[0]] = n.inputs[0]
            continue
        specs[n.outputs[0]] = (_width(args, n), torch.float16 if n.outputs[0] in fp16 else torch.float32)
    return specs, aliases


def _side_ops(launch: Launch) -> tuple[str, ...]:
    """A side launch's ops without the glue folded in beside its GEMV (`scheduler.plan.FOLDS`)."""
    return tuple(n.op for n in launch.nodes if n.op not in FOLDS)


def check_plan(plan: Plan) -> None:
    """What the executor relies on: only fused corrections (with their GEMV's folded glue) on the side
    stream; every wait names an event the other stream recorded earlier; every event the side stream
    records is waited for later on the main stream (so the side stream joins back before the step, and
    the capture, ends)."""
    recorded: set[tuple[str, int]] = set()
    waited_on_main: set[str] = set()
    for i, launch in enumerate(plan.launches):
        if launch.stream == SIDE and _side_ops(launch) != CORRECTION_OPS:
            raise ValueError(f"launch {i} ({launch.name}) runs on the side stream: only the fused {CORRECTION_OPS} may")
        for name in launch.waits:
            if (name, 1 - launch.stream) not in recorded:
                raise ValueError(f"launch {i} ({launch.name}) waits for '{name}' before the other stream records it")
            if launch.stream == MAIN:
                waited_on_main.add(name)
        recorded |= {(name, launch.stream) for name in launch.records}
    unjoined = sorted(name for name, stream in recorded if stream == SIDE and name not in waited_on_main)
    if unjoined:
        raise ValueError(f"the side stream never joins back after {unjoined}")


# ----------------------------------------------------------------------------------------------------
# the torch half of a step


class DecodeState:
    """Static buffers, step inputs, KV cache and RoPE tables of one plan on one device.

    `buf[name]` is a 1-D tensor per graph tensor (see `buffer_specs`); `token` and `position` are
    int64 [1] device tensors that the launches read, so the same launches serve every step. `rope`:
    (cos, sin) float32 [max_seq, head_dim / 2] per RoPE base of the model's layers.
    """

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], launches: tuple[Launch, ...],
                 max_seq_len: int, device, cache: KVCache | None = None):
        self.args, self.weights = args, weights  # weights: from device_weights()
        self.inputs = torch.zeros(2, dtype=torch.int64, device=device)  # written by one copy a step
        self.token, self.position = self.inputs[0:1], self.inputs[1:2]
        specs, aliases = buffer_specs(args, launches)
        self.buf = {name: torch.zeros(width, dtype=dtype, device=device) for name, (width, dtype) in specs.items()}
        for name, target in aliases.items():
            self.buf[name] = self.buf[target]
        self.cache = cache if cache is not None else KVCache.allocate(args, max_seq_len, device, torch.float16)
        self.rope = {base: tuple(t.to(device) for t in rope_table(args.head_dim, base, max_seq_len))
                     for base in {args.rope_base_of(i) for i in range(args.n_layers)}}


def _embed(st: DecodeState, node: Node) -> None:
    # Gemma's sqrt(dim) in fp16, as HF does
    st.buf[node.outputs[0]].copy_(embed(st.args, st.weights, st.token).reshape(-1))


def _lm_head(st: DecodeState, node: Node) -> None:
    # fp16 in, fp32 accumulate
    st.buf[node.outputs[0]].copy_(F.linear(st.buf[node.inputs[0]][None], st.weights["lm_head"]).reshape(-1))


TORCH_OPS = {"embed": _embed, "lm_head": _lm_head}  # the rest of the step: our kernels (see CUDAExecutor._bind)


# ----------------------------------------------------------------------------------------------------
# weights on the device


@dataclass
class DeviceGroup:
    """One linear group on the GPU: the quantized GEMV and, for DecDEC, its residual table."""

    shape: tuple[int, int]  # (out, in)
    gemv: BaseGemv
    tensors: tuple  # the torch tensors the kernels read through Numba views (kept alive here)
    table: PinnedTable | None = None  # residual rows [in, stride], pinned and mapped (zero-copy)
    rscale: object = None  # Numba fp16 [out] view of the residual scales, on the GPU
    thresholds: np.ndarray | None = None  # float32 [in], the calibrated profile (bucket bounds per k_chunk)


def device_group(g, residuals: bool) -> DeviceGroup:
    """A prepared group (`models.prepare.PreparedGroup`, FORMATS.md tensors) on the GPU; with
    `residuals` also its residual table for DecDEC."""
    q = g.q
    tensors = tuple(t.to(DEVICE).contiguous() for t in (q.qweight, q.scales, q.zeros))
    tensors += (q.act_scale.to(DEVICE, torch.float32).contiguous(),)
    gemv = BaseGemv(*tensors, q.bits, q.group_size)
    tensors = tensors[1:]  # the kernel reads its own tiled copy of qweight (`mma_layout`), not qweight
    shape = (gemv.plan.out_features, gemv.plan.in_features)
    if not residuals:
        return DeviceGroup(shape, gemv, tensors)
    rscale = g.residual.scales.to(DEVICE, torch.float16).contiguous()
    return DeviceGroup(shape, gemv, tensors + (rscale,), PinnedTable.from_array(g.residual.rows.cpu().numpy()),
                       cuda.as_cuda_array(rscale, sync=False), g.thresholds.cpu().numpy().astype(np.float32))


class DeviceModel:
    """A model's weights on the GPU (residual tables in pinned host memory), shared by executors:
    from `models.prepare.Prepared` parts; without `residuals` no pinned memory is taken. `lm_head_int8`:
    (codes, scale) of an int8 lm_head (`ops.lm_head`), else the lm_head is fp16."""

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], prepared_groups: dict,
                 residuals: bool = True, lm_head_int8: tuple | None = None):
        require_gpu("config asks for device 'cuda'")
        if lm_head_int8 is not None and not width_supported(args.dim):
            raise ConfigError(f"quant.lm_head_bits = 8: the int8 lm_head kernel takes a width that is a multiple of "
                              f"{LM_HEAD_VECTOR} up to {LM_HEAD_MAX_DIM}, this model's is {args.dim}: use 16")
        self.args = args
        self.groups = {key: device_group(g, residuals) for key, g in prepared_groups.items()}
        self.weights = device_weights(weights, DEVICE, fp16_lm_head=lm_head_int8 is None)
        self.lm_head_int8 = None if lm_head_int8 is None else tuple(t.to(DEVICE).contiguous() for t in lm_head_int8)

    def close(self) -> None:
        """Free the pinned residual tables (no executor of this model may run afterwards)."""
        for g in self.groups.values():
            if g.table is not None:
                g.table.close()


def _view(t: torch.Tensor):
    """A Numba view of a device tensor (no copy, no synchronisation): made once, outside any capture."""
    return cuda.as_cuda_array(t, sync=False)


def programmatic_pairs(edges: list[tuple[int, int]], kernel_name) -> list[tuple[int, int]]:
    """The edges (a, b) of a step's graph that may become programmatic: a kernel into one of `PDL_KERNELS`,
    except into a kernel (no correction) that follows a correction's predecessor. Those are the base
    GEMV forked beside a correction (`programmatic_edges`) and, as the side stream's corrections
    follow one another, the kernel that reads a compensated group's output (every group's but the
    last): with those readers launched early as well the compensated step measured slower
    (bench/results/edge_rule_k1_*).
    `kernel_name(node)` is the kernel's mangled name, None for a node that is no kernel."""
    name = lambda node: kernel_name(node) or b""  # noqa: E731
    corrections = {b for _, b in edges if b"_correction_kernel" in name(b)}
    before = {a for a, b in edges if b in corrections}
    held = {b for a, b in edges if a in before and b not in corrections}
    return [(a, b) for a, b in edges if kernel_name(a) is not None and b not in held
            and any(k.encode() in name(b) for k in PDL_KERNELS)]


def programmatic_edges(raw_graph: int) -> int:
    """Make the edges from a kernel node to a `PDL_KERNELS` kernel node of the captured graph
    `raw_graph` (a cudaGraph_t) programmatic: the downstream kernel may launch once every block of
    the upstream one has called `release_dependents` (or exited), and its `wait_upstream` returns when
    the upstream kernel has completed. Returns the number of edges changed.

    The edge into a base GEMV with a correction beside it stays ordinary (`programmatic_pairs`):
    launched early, the GEMV's persistent blocks would fill every SM before the correction's few
    blocks, and the correction would run after the GEMV instead of beside it. The correction launches
    early instead, so its blocks are resident first and the GEMV takes the rest when its input is
    complete."""
    from cuda.bindings import driver as cu

    def call(fn, *args):
        err, *out = fn(*args)
        if err != cu.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"{fn.__name__}: {err.name} (making the step's graph edges programmatic)")
        return out

    get, remove, add = (getattr(cu, f + "_v2", None) or getattr(cu, f)  # CUDA 12 names the edge-data forms _v2
                        for f in ("cuGraphGetEdges", "cuGraphRemoveDependencies", "cuGraphAddDependencies"))
    graph = cu.CUgraph(raw_graph)
    [n] = call(get, graph, 0)[-1:]
    src, dst, data, _ = call(get, graph, n)

    @functools.cache
    def kernel_name(node: int) -> bytes | None:  # None: not a kernel node
        [kind] = call(cu.cuGraphNodeGetType, cu.CUgraphNode(node))
        if kind != cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
            return None
        [params] = call(cu.cuGraphKernelNodeGetParams, cu.CUgraphNode(node))
        return call(cu.cuFuncGetName, params.func)[0]

    default = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_DEFAULT
    data_of = {(int(a), int(b)): d for a, b, d in zip(src, dst, data) if d.type == default}
    programmatic = cu.CUgraphEdgeData()
    programmatic.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
    programmatic.type = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
    changed = 0
    for a, b in programmatic_pairs(list(data_of), kernel_name):
        a_node, b_node = cu.CUgraphNode(a), cu.CUgraphNode(b)
        call(remove, graph, [a_node], [b_node], [data_of[a, b]], 1)
        call(add, graph, [a_node], [b_node], [programmatic], 1)
        changed += 1
    return changed


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
        event = functools.partial(torch.cuda.Event, enable_timing=True, external=external)
        return cls(event(), [(event(), event()) for _ in range(n_items)])

    def times(self, items, host_start: float) -> list[tuple]:
        """(plan item, start s, end s) per item: GPU times after `start`, placed after the host's clock
        at the step's start (call once the step has completed)."""
        ms = self.start.elapsed_time
        return [(item, host_start + ms(s) / 1e3, host_start + ms(e) / 1e3) for item, (s, e) in zip(items, self.marks)]


class CUDAExecutor:
    """Runs a plan on the GPU, captured into one CUDA graph (or launch by launch: `run(eager=True)`).

    `cache`: share a KV cache with another executor of the same model (prefill's base-only step).
    Thread blocks of a correction: its graph node's `n_tb` attribute (the tuner's choice) where set,
    else `default_n_tb` of its shape.
    """

    def __init__(self, model: DeviceModel, plan: Plan, max_seq_len: int, *, cache: KVCache | None = None,
                 pdl: bool = True):
        check_plan(plan)  # the GPU itself was checked for by `model`
        self.model, self.plan = model, plan
        nodes = [n for launch in plan.launches for n in launch.nodes]
        self.state = DecodeState(model.args, model.weights, plan.launches, max_seq_len, DEVICE, cache)
        self.pinned = self.state.inputs.is_cuda  # host buffers the device copies from and into are pinned
        self.host_inputs = torch.zeros(2, dtype=torch.int64, pin_memory=self.pinned)  # (token, position) of a step
        self.cache = self.state.cache
        # index MAIN / SIDE; priority -1 dispatches the correction's few blocks before the GEMV's
        self.streams = (torch.cuda.Stream(), torch.cuda.Stream(priority=-1))
        self.numba_streams = tuple(cuda.external_stream(s.cuda_stream) for s in self.streams)
        # per (tensor, recording stream): a folded add's output is recorded on both streams, for the other
        self.events = {(name, launch.stream): torch.cuda.Event() for launch in plan.launches for name in launch.records}
        # Numba views of the buffers, made once: a conversion inside the capture could synchronize
        self.views = {name: _view(t) for name, t in self.state.buf.items()}
        self.attention_plan = plan_attention(model.args)
        self.attention_scratch = AttentionScratch.allocate(self.attention_plan)  # shared: layers run in turn
        self.base_out = {(n.layer, n.attr("group")): n.outputs[0] for n in nodes if n.op == "base_gemv"}
        # per compensated group: its correction, its GEMV's split output (the correction is its last parts), and its
        # GEMV re-planned to leave the correction its SMs
        self.corrections, self.splits, self.gemvs = {}, {}, {}
        for n in nodes:
            if n.op == "correction":
                self._prepare_correction(n)
        self.folded_scales: dict[tuple, torch.Tensor] = {}  # per group: its folded norm's weight x act_scale
        self.launches = [self._bind(launch) for launch in plan.launches]
        torch.cuda.synchronize()  # the folded scales, made on torch's default stream, before our streams read them
        self.profiled: tuple[torch.cuda.CUDAGraph, StepEvents] | None = None  # captured by the first timed run
        # warm-up on the capture stream: Numba compiles, cuBLAS / SDPA initialise, lazy scratch is made
        # (a first cuBLAS call inside a capture invalidates it); it writes the cache at position 0 only
        with torch.no_grad(), torch.cuda.stream(self.streams[MAIN]):
            self._issue()
        torch.cuda.synchronize()
        # pdl_edges: programmatic edges of the step's graph (0: none asked for, or the device has none)
        self.graph, self.pdl_edges = self._capture(pdl=pdl)

    @property
    def max_seq_len(self) -> int:
        return self.cache.k.shape[1]

    def _prepare_correction(self, node: Node) -> None:
        key = (node.layer, node.attr("group"))
        g = self.model.groups[key]
        if g.table is None:
            raise ConfigError(f"{node.name}: group {key} has no residual table (model built without residuals)")
        k_chunk = node.attr("k_chunk")
        tb = node.attr("n_tb") or default_n_tb(*g.shape)
        corr = Correction(g.table.device_array(), g.rscale, bucket_bounds(g.thresholds, k_chunk), k_chunk, n_tb=tb,
                          tile_rows=g.gemv.plan.merge_rows)
        self.corrections[key] = corr
        self.gemvs[key] = g.gemv.beside(corr.blocks)
        self.splits[key] = self.gemvs[key].split_output(extra_parts=corr.parts)

    def _bind(self, launch: Launch):
        """The call that issues one launch, with every argument bound (nothing is looked up per step)."""
        node = launch.nodes[0]
        if launch.stream == SIDE:
            # the fused correction: it selects, fetches over PCIe, corrects and adds its part into the base
            # GEMV's split output; whichever kernel completes a tile writes the output (the merge)
            key = next((n.layer, n.attr("group")) for n in launch.nodes if n.op == "correction")
            x, out, fold = self._folded(launch, key)
            return functools.partial(self.corrections[key], x, out=out, merge=self.splits[key],
                                     stream=self.numba_streams[SIDE], **fold)
        if "base_gemv" in launch.op:
            key = next((n.layer, n.attr("group")) for n in launch.nodes if n.op == "base_gemv")
            x, out, fold = self._folded(launch, key)
            return functools.partial(self.gemvs.get(key, self.model.groups[key].gemv), x, out, self.numba_streams[MAIN],
                                     merge=self.splits.get(key), **fold)
        if launch.op in TORCH_OPS and not (launch.op == "lm_head" and self.model.lm_head_int8):
            # torch launches on its current stream: the main one
            return functools.partial(TORCH_OPS[launch.op], self.state, node)
        return functools.partial(self._layer_kernel(launch), self.numba_streams[MAIN])

    def _folded(self, launch: Launch, key: tuple) -> tuple:
        """(x, out, the folded glue's kernel arguments) of a launch of group `key`'s GEMV or correction: the
        norm or act x up before it as the kernels' prologue (x its input), the residual add after it as
        their epilogue (out its output, float32), else x the GEMV's input and out its output."""
        first, last = launch.nodes[0], launch.nodes[-1]
        act_scale = self.model.groups[key].gemv.act_scale
        fold = dict(act_scale=act_scale)
        if first.op == "rms_norm":  # the norm's weight times the GEMV's act_scale, made once per group
            if key not in self.folded_scales:
                self.folded_scales[key] = (self.model.weights[first.attr("weight")]
                                           * torch.as_tensor(act_scale, device=DEVICE))
            fold = dict(prologue="rms_norm", act_scale=_view(self.folded_scales[key]), eps=self.model.args.norm_eps)
        elif first.op == "act_mul":
            fold["prologue"] = first.attr("act")
        if last.op == "residual_add":
            fold["resid"] = self.views[last.inputs[0]]
        out = self.views[last.outputs[0] if last.op == "residual_add" else self.base_out[key]]
        return self.views[first.inputs[0]], out, fold

    def _layer_kernel(self, launch: Launch):
        """The kernel of a launch between the GEMVs: the fused norm (after a residual add, or alone) or
        attention; its arguments are views made here, once."""
        args, w, v, node = self.model.args, self.model.weights, self.views, launch.nodes[-1]
        if launch.op in ("rms_norm", "residual_add+rms_norm"):
            add = launch.nodes[0] if len(launch.nodes) == 2 else None
            post = add.attr("post_norm") if add else None
            return AddRmsNorm(args, _view(w[node.attr("weight")]), v[launch.nodes[0].inputs[0]], v[node.outputs[0]],
                              branch=v[add.inputs[1]] if add else None, x_out=v[add.outputs[0]] if add else None,
                              post_weight=_view(w[post]) if post else None)
        if launch.op == "attention":
            p, st = f"layers.{node.layer}.", self.state
            k, vc = _view(st.cache.k), _view(st.cache.v)
            rope = tuple(_view(t) for t in st.rope[args.rope_base_of(node.layer)])
            return DecodeAttention(args, node.layer, self.attention_plan, self.attention_scratch, v[node.inputs[0]],
                                   _view(st.position), k, vc, v[node.outputs[0]], rope,
                                   **{name: _view(w[p + key]) for name, key in
                                      (("bias", "qkv_bias"), ("q_norm", "q_norm"), ("k_norm", "k_norm"))
                                      if p + key in w})
        if launch.op == "lm_head":
            codes, scale = self.model.lm_head_int8
            return Int8LmHead(_view(codes), _view(scale), v[node.inputs[0]], v[node.outputs[0]])
        raise ValueError(f"the CUDA executor has no launch for {launch.op} (act_mul runs folded into the down GEMV: "
                         "scheduler.plan.FOLDS)")

    def _capture(self, timing: StepEvents | None = None, pdl: bool = False) -> tuple[torch.cuda.CUDAGraph, int]:
        """The step captured on the main stream (with `timing`: its events become nodes of the graph;
        with `pdl`: kernel-to-kernel edges become programmatic where the device has them), and the
        number of programmatic edges."""
        graph = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.no_grad(), torch.cuda.graph(graph, stream=self.streams[MAIN]):
            self._issue(timing)
        edges = programmatic_edges(graph.raw_cuda_graph()) if pdl and pdl_supported() else 0
        graph.instantiate()
        torch.cuda.synchronize()
        return graph, edges

    def _capture_profiled(self) -> tuple[torch.cuda.CUDAGraph, StepEvents]:
        timing = StepEvents.make(len(self.plan.launches), external=True)
        return self._capture(timing)[0], timing

    def _issue(self, timing: StepEvents | None = None) -> None:
        """Issue every plan item on its stream with its events; with `timing`, records its step start on
        the main stream and its pair around each item (after the item's wait, so a side item's start is
        when it may begin, not when its stream was last idle)."""
        if timing is not None:
            timing.start.record(self.streams[MAIN])
        for i, (launch, issue) in enumerate(zip(self.plan.launches, self.launches)):
            stream = self.streams[launch.stream]
            for name in launch.waits:
                stream.wait_event(self.events[name, 1 - launch.stream])
            if timing is not None:
                timing.marks[i][0].record(stream)
            issue()
            if timing is not None:
                timing.marks[i][1].record(stream)
            for name in launch.records:
                self.events[name, launch.stream].record(stream)

    @torch.no_grad()
    def run(self, token: int, position: int, timings: list | None = None, *, eager: bool = False) -> torch.Tensor:
        """One decode step; logits [vocab] float32 on the CPU. Replays the graph; with `timings`, replays
        the profiled graph instead and appends (plan item, start s, end s) per item as runtime/profiler.py
        expects (GPU times from its events, placed after the host's clock at the step's start). With
        `eager` the items are launched one by one, timed with ordinary events."""
        if not 0 <= position < self.max_seq_len:
            raise ConfigError(f"position {position} is outside the KV cache (model.max_seq_len = {self.max_seq_len})")
        if timings is not None and not eager and self.profiled is None:
            self.profiled = self._capture_profiled()  # before the inputs are written: capture synchronizes
        main = self.streams[MAIN]
        with torch.cuda.stream(main):
            # the graph's inputs, written on the replay stream before the replay (a copy on another stream
            # races it); both in one copy from pinned memory, which the last step's sync left free
            self.host_inputs.numpy()[:] = (token, position)
            self.state.inputs.copy_(self.host_inputs, non_blocking=True)
            host_start = time.perf_counter()
            timing = self._step(timings is not None, eager)
            # into pinned memory: a pageable copy of the logits costs a staging copy on the host
            logits = torch.empty(self.state.buf["logits"].shape, dtype=torch.float32, pin_memory=self.pinned)
            logits.copy_(self.state.buf["logits"], non_blocking=True)
            main.synchronize()  # main joined the side stream: the step is done
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
        graph, timing = self.profiled if timed else (self.graph, None)
        graph.replay()
        return timing

    def replay_only(self, position: int) -> None:
        """Set the position and replay, leaving the logits on the GPU (for timing the step alone)."""
        with torch.cuda.stream(self.streams[MAIN]):
            self.state.position.fill_(position)
            self.graph.replay()
