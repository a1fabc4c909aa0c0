"""The plan: which logical ops of the graph fuse into one launch, in which order.

Pure Python over the graph (no torch, no GPU), so it is tested on the CPU. The GPU plan
(`schedule(graph)`) fuses:

- a compensated linear group's selector -> dma -> correction -> merge -> base_gemv into ONE item: the
  fused correction kernel, then the base GEMV, chained on the one stream. The correction launches
  early (behind the kernel before it) and lets the GEMV launch at once, so its PCIe fetch starts as
  soon as the GEMV's input is ready and its few blocks hold their SMs before the GEMV's blocks take
  the rest; the GEMV waits for the input, not for the correction. Their merge is done by arrival:
  both add their parts into the GEMV's split output, and whichever finishes a tile last writes it.
- a residual_add and the rms_norm that reads its output into one launch (the fused norm kernel).

The CPU runs the unfused plan (`schedule(graph, fuse=False)`): one launch per node, in graph order.
"""

from __future__ import annotations

from dataclasses import dataclass

from decdec.constants import CHUNK_SIZE, PASS_CHUNKS
from decdec.graph import Graph, Node

CORRECTION_OPS = ("selector", "dma", "correction", "merge")  # one fused correction kernel on the GPU
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
    """One kernel launch (or one reference call on the CPU): the logical nodes it carries out; a
    compensated group's item is two chained kernels (the fused correction, then the base GEMV)."""

    nodes: tuple[Node, ...]

    @property
    def op(self) -> str:
        """What runs: the op of a single node, or the fused ops joined by '+'."""
        return "+".join(n.op for n in self.nodes)

    @property
    def layer(self) -> int | None:
        return self.nodes[-1].layer

    @property
    def name(self) -> str:
        head = self.nodes[-1].name.rsplit(".", 1)[0] if self.nodes[-1].layer is not None else ""
        return f"{head}.{self.op}" if head else self.op

    def attr(self, name: str, default=None):
        """An attribute of the first node that has it (k_chunk, n_tb, shape, bits, group)."""
        return next((n.attr(name) for n in self.nodes if n.attr(name) is not None), default)


@dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]

    def format(self) -> str:
        """One line per launch: order, layer, the logical ops it carries out, shape, bits, k_chunk and
        n_tb (* = the default for a shape the tuner did not size)."""
        lines = [f"{'#':>4} {'layer':>5} {'launch (logical ops)':<50} {'out x in':>11} {'bits':>4} "
                 f"{'k_chunk':>7} {'n_tb':>4}"]
        for i, launch in enumerate(self.launches):
            shape = launch.attr("shape", ())
            n_tb = launch.attr("n_tb")
            if "correction" in launch.op:
                n_tb = f"{n_tb}" if n_tb else f"{default_n_tb(*shape)}*"
            layer = "" if launch.layer is None else launch.layer
            lines.append(f"{i:>4} {layer:>5} {launch.name:<50} {'x'.join(map(str, shape)):>11} "
                         f"{launch.attr('bits', '')!s:>4} {launch.attr('k_chunk', '')!s:>7} {n_tb or '':>4}")
        if any("correction" in launch.op and not launch.attr("n_tb") for launch in self.launches):
            lines.append("n_tb * : the executor's default for the shape (the tuner sizes it with a target slowdown)")
        return "\n".join(lines)


def schedule(graph: Graph, fuse: bool = True) -> Plan:
    """The GPU plan (fused launches) or, with fuse=False, the CPU's (a node a launch)."""
    if not fuse:
        return Plan(tuple(Launch((n,)) for n in graph.nodes))
    corrections: dict[tuple, list[Node]] = {}
    for n in graph.nodes:
        if n.op in CORRECTION_OPS:
            corrections.setdefault((n.layer, n.attr("group")), []).append(n)
    launches: list[Launch] = []
    for n in graph.nodes:
        if n.op in CORRECTION_OPS:
            continue
        last = launches[-1] if launches else None
        if n.op == "base_gemv":
            launches.append(Launch(tuple(corrections.get((n.layer, n.attr("group")), ())) + (n,)))
        elif n.op == "rms_norm" and last and last.op == "residual_add" and n.inputs[0] == last.nodes[0].outputs[0]:
            launches[-1] = Launch(last.nodes + (n,))
        else:
            launches.append(Launch((n,)))
    return Plan(tuple(launches))

