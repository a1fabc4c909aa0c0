"""The plan: which logical ops of the graph fuse into one launch, on which stream, in which order,
and which events order the two streams.

Pure Python over the graph (no torch, no GPU), so it is tested on the CPU. The GPU plan
(`schedule(graph)`) fuses:

- a compensated linear group's selector -> dma -> correction -> merge into ONE launch, the fused
  correction kernel, on the side stream; it is issued just before the group's base GEMV so that the
  PCIe fetch starts as soon as the GEMV's input is ready. Its merge is done by arrival: both
  kernels add their parts into the GEMV's split output, and whichever finishes a tile last writes it,
  so the merge makes neither launch wait for the other; the next reader of the merged output waits
  for the side launch.
- the glue around an uncompensated base GEMV into the GEMV's own launch (`FOLDS`): the rms_norm or
  act_mul that makes its input (the GEMV computes it while staging its input), and the residual_add
  (without a post-norm) that adds its output to the residual stream (added as rows are written). A
  compensated GEMV keeps its input op apart: the correction reads that input too.
- a residual_add and the rms_norm that reads its output into one launch (the fused norm kernel), where
  the add is not folded into its GEMV (Gemma's post-norm needs the whole branch).

The CPU runs the unfused plan (`schedule(graph, fuse=False)`): one launch per node, in graph order,
one stream. Every launch waits for the tensors it reads that the other stream produced, by an event
named after the tensor and recorded right after the launch that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from decdec.constants import CHUNK_SIZE, PASS_CHUNKS
from decdec.graph import Graph, Node

MAIN, SIDE = 0, 1
CORRECTION_OPS = ("selector", "dma", "correction", "merge")  # one fused correction launch on the GPU
FOLDS = ("rms_norm", "act_mul", "residual_add")  # the glue ops that fold into an uncompensated base GEMV's launch
LARGE_WEIGHT = 4096 * 4096  # weights of at least this many elements get 16 correction blocks by default


SELECTION_PASS = PASS_CHUNKS * CHUNK_SIZE  # inputs one correction block selects per pass (at k_chunk <= 512);
# each pass of a wider input gets n_tb blocks of its own


def default_n_tb(out_features: int, in_features: int) -> int:
    """Thread blocks per selection pass of a correction that the tuner did not size: the best n_tb of
    the measured pairs is 16 for 4096x4096 and larger weights and 4-8 below, where 8 is never far
    off; shared by the passes of a wider input, so that the correction takes no more SMs from the GEMV."""
    return max(1, (16 if out_features * in_features >= LARGE_WEIGHT else 8) // -(-in_features // SELECTION_PASS))


@dataclass(frozen=True)
class Launch:
    """One kernel launch (or one reference call on the CPU): the logical nodes it carries out."""

    nodes: tuple[Node, ...]
    stream: int = MAIN
    waits: tuple[str, ...] = ()  # tensors from the other stream this launch must wait for
    records: tuple[str, ...] = ()  # tensors of this launch that the other stream reads afterwards

    @property
    def op(self) -> str:
        """What runs: the op of a single node, or the fused ops joined by '+'."""
        return "+".join(n.op for n in self.nodes)

    @property
    def layer(self) -> int | None:
        return self.nodes[-1].layer

    @property
    def name(self) -> str:
        """L<layer>.<group>.<op>: named after its linear group's node where it has one."""
        node = next((n for n in self.nodes if n.attr("group")), self.nodes[-1])
        head = node.name.rsplit(".", 1)[0] if node.layer is not None else ""
        return f"{head}.{self.op}" if head else self.op

    def attr(self, name: str, default=None):
        """An attribute of the first node that has it (k_chunk, n_tb, shape, bits, group)."""
        return next((n.attr(name) for n in self.nodes if n.attr(name) is not None), default)


@dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]

    def format(self) -> str:
        """One line per launch: order, stream, layer, the logical ops it carries out, shape, bits,
        k_chunk, n_tb (* = the default for a shape the tuner did not size) and events."""
        lines = [f"{'#':>4} {'stream':<6} {'layer':>5} {'launch (logical ops)':<40} {'out x in':>11} {'bits':>4} "
                 f"{'k_chunk':>7} {'n_tb':>4}  events"]
        for i, launch in enumerate(self.launches):
            shape = launch.attr("shape", ())
            n_tb = launch.attr("n_tb")
            if "correction" in launch.op:
                n_tb = f"{n_tb}" if n_tb else f"{default_n_tb(*shape)}*"
            events = " ".join([f"wait {t}" for t in launch.waits] + [f"record {t}" for t in launch.records])
            layer = "" if launch.layer is None else launch.layer
            lines.append(f"{i:>4} {'side' if launch.stream else 'main':<6} {layer:>5} {launch.name:<40} "
                         f"{'x'.join(map(str, shape)):>11} {launch.attr('bits', '')!s:>4} "
                         f"{launch.attr('k_chunk', '')!s:>7} {n_tb or '':>4}  {events}")
        if any("correction" in launch.op and not launch.attr("n_tb") for launch in self.launches):
            lines.append("n_tb * : the executor's default for the shape (the tuner sizes it with a target slowdown)")
        return "\n".join(lines)


def schedule(graph: Graph, fuse: bool = True, folds: tuple[str, ...] = FOLDS) -> Plan:
    """The GPU plan (fused launches on two streams; `folds`: the glue ops that may fold into a GEMV's
    launch) or, with fuse=False, the CPU's (a node a launch)."""
    if not fuse:
        return Plan(tuple(Launch((n,)) for n in graph.nodes))
    corrections: dict[tuple, list[Node]] = {}
    readers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        if n.op in CORRECTION_OPS:
            corrections.setdefault((n.layer, n.attr("group")), []).append(n)
        for t in n.inputs:
            readers.setdefault(t, []).append(n)

    def feeds(last: Launch | None, n: Node, ops: tuple[str, ...], port: int = 0) -> bool:
        """`last` ends with one of `ops`, whose output only n reads (at input `port`)."""
        return (last is not None and last.nodes[-1].op in ops and last.stream == MAIN
                and n.inputs[port] == last.nodes[-1].outputs[0] and readers[n.inputs[port]] == [n])

    launches: list[Launch] = []
    for n in graph.nodes:
        if n.op in CORRECTION_OPS:
            continue
        key = (n.layer, n.attr("group"))
        if n.op == "base_gemv" and key in corrections:
            launches.append(Launch(tuple(corrections[key]), SIDE))
        last = launches[-1] if launches else None
        folded_input = n.op == "base_gemv" and len(last.nodes if last else ()) == 1 and feeds(
            last, n, tuple(op for op in ("rms_norm", "act_mul") if op in folds))
        folded_add = (n.op == "residual_add" and "residual_add" in folds and n.attr("post_norm") is None
                      and feeds(last, n, ("base_gemv",), port=1))
        fused_norm = n.op == "rms_norm" and last and last.op == "residual_add" and n.inputs[0] == last.nodes[0].outputs[0]
        if folded_input or folded_add or fused_norm:
            launches[-1] = Launch(last.nodes + (n,))
        else:
            launches.append(Launch((n,)))
    return Plan(_with_events(launches))


def _with_events(launches: list[Launch]) -> tuple[Launch, ...]:
    """Each launch waits for the tensors it reads from the other stream; their producers record them.
    A merge's inputs make no wait: the merge is done by arrival (see the module docstring)."""
    stream_of = {t: launch.stream for launch in launches for n in launch.nodes for t in n.outputs}
    waits = [tuple(sorted({t for n in launch.nodes if n.op != "merge" for t in n.inputs
                           if t in stream_of and stream_of[t] != launch.stream}))
             for launch in launches]
    read_across = {t for w in waits for t in w}
    return tuple(Launch(launch.nodes, launch.stream, w,
                        tuple(t for n in launch.nodes for t in n.outputs if t in read_across))
                 for launch, w in zip(launches, waits))
