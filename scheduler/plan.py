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
- the glue around a base GEMV into the GEMV's own launch (`FOLDS`): the rms_norm or act_mul that makes
  its input (the GEMV computes it while staging its input), and the residual_add (without a post-norm)
  that adds its output to the residual stream (added as rows are written). Beside a correction, the
  side launch carries the same folded ops: the correction makes its input from the glue's input as the
  GEMV does, and whichever of the two completes a row tile adds the residual. A folded op thus appears
  in two launches of a compensated group; the events treat its output as made on both streams.
- a residual_add and the rms_norm that reads its output into one launch (the fused norm kernel), where
  the add is not folded into its GEMV (Gemma's post-norm needs the whole branch).

The CPU runs the unfused plan (`schedule(graph, fuse=False)`): one launch per node, in graph order,
one stream. Every launch waits for the tensors it reads that the other stream produced, by an event
named after the tensor and recorded on that stream right after the launch that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from decdec.constants import CHUNK_SIZE, PASS_CHUNKS
from decdec.graph import Graph, Node

MAIN, SIDE = 0, 1
CORRECTION_OPS = ("selector", "dma", "correction", "merge")  # one fused correction launch on the GPU
FOLDS = ("rms_norm", "act_mul", "residual_add")  # the glue ops that fold into a base GEMV's launch (and its correction's)
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
        lines = [f"{'#':>4} {'stream':<6} {'layer':>5} {'launch (logical ops)':<56} {'out x in':>11} {'bits':>4} "
                 f"{'k_chunk':>7} {'n_tb':>4}  events"]
        for i, launch in enumerate(self.launches):
            shape = launch.attr("shape", ())
            n_tb = launch.attr("n_tb")
            if "correction" in launch.op:
                n_tb = f"{n_tb}" if n_tb else f"{default_n_tb(*shape)}*"
            events = " ".join([f"wait {t}" for t in launch.waits] + [f"record {t}" for t in launch.records])
            layer = "" if launch.layer is None else launch.layer
            lines.append(f"{i:>4} {'side' if launch.stream else 'main':<6} {layer:>5} {launch.name:<56} "
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
    input_folds = tuple(op for op in ("rms_norm", "act_mul") if op in folds)
    launches: list[Launch] = []
    side_of: dict[str, int] = {}  # a merge's output -> the index of its side launch
    for n in graph.nodes:
        if n.op in CORRECTION_OPS:
            continue
        last = launches[-1] if launches else None
        if n.op == "base_gemv":
            side = tuple(corrections.get((n.layer, n.attr("group")), ()))
            producer = ()  # the input's op, folded into the GEMV (and made again by the correction)
            if (last and len(last.nodes) == 1 and last.nodes[0].op in input_folds and n.inputs[0] in last.nodes[0].outputs
                    and all(r is n or r in side for r in readers[n.inputs[0]])):
                producer = launches.pop().nodes
            if side:
                side_of[side[-1].outputs[0]] = len(launches)
                launches.append(Launch(producer + side, SIDE))
            launches.append(Launch(producer + (n,)))
        elif (n.op == "residual_add" and "residual_add" in folds and n.attr("post_norm") is None and last
              and last.nodes[-1].op == "base_gemv" and readers[n.inputs[1]] == [n]
              and (n.inputs[1] == last.nodes[-1].outputs[0] or side_of.get(n.inputs[1]) == len(launches) - 2)):
            # the GEMV adds its output to the residual stream; beside a correction, whichever of the two
            # completes a row tile adds it, so the side launch carries the add as well
            launches[-1] = Launch(last.nodes + (n,))
            if n.inputs[1] in side_of:
                i = side_of[n.inputs[1]]
                launches[i] = Launch(launches[i].nodes + (n,), SIDE)
        elif n.op == "rms_norm" and last and last.op == "residual_add" and n.inputs[0] == last.nodes[0].outputs[0]:
            launches[-1] = Launch(last.nodes + (n,))
        else:
            launches.append(Launch((n,)))
    return Plan(_with_events(launches))


def _with_events(launches: list[Launch]) -> tuple[Launch, ...]:
    """Each launch waits for the tensors it reads from the other stream and does not make itself; their
    makers on the other stream record them (events are per tensor and recording stream: a folded add's
    output is made on both, and each stream waits for the other's). A group's merged output is made by
    its base GEMV's launch as well as by its side launch (the arrival completes it in either), and a
    merge's inputs make no wait (see the module docstring)."""
    merged = {(n.layer, n.attr("group")): n.outputs[0] for launch in launches for n in launch.nodes if n.op == "merge"}

    def makes(launch: Launch) -> set[str]:
        return ({t for n in launch.nodes for t in n.outputs}
                | {merged[k] for n in launch.nodes if n.op == "base_gemv" and (k := (n.layer, n.attr("group"))) in merged})

    made = [makes(launch) for launch in launches]
    made_on: dict[str, set[int]] = {}
    for launch, ts in zip(launches, made):
        for t in ts:
            made_on.setdefault(t, set()).add(launch.stream)
    waits = [tuple(sorted({t for n in launch.nodes if n.op != "merge" for t in n.inputs
                           if t not in own and made_on.get(t, set()) - {launch.stream}}))
             for launch, own in zip(launches, made)]
    waited_on = {stream: {t for launch, w in zip(launches, waits) if launch.stream != stream for t in w}
                 for stream in (MAIN, SIDE)}  # what the other stream waits for, by the stream that records it
    return tuple(Launch(launch.nodes, launch.stream, w, tuple(sorted(own & waited_on[launch.stream])))
                 for launch, w, own in zip(launches, waits, made))
