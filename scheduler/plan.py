"""The plan: which stream each graph node runs on, in which order, and which events join them.

Pure Python over the graph (no torch, no GPU), so it is tested on the CPU. The rule, per
compensated linear group: selector -> dma -> correction go to the side stream, issued first so the
PCIe fetch starts as early as possible; it forks from the main stream when the group's input is
ready; the base GEMV runs on the main stream meanwhile; the merge waits for the side stream's event.
The CPU executor runs items in order; the CUDA executor captures the same items into one graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from decdec.graph import Graph, Node

MAIN, SIDE = 0, 1
SIDE_OPS = ("selector", "dma", "correction")


@dataclass(frozen=True)
class PlanItem:
    node: Node
    stream: int
    wait: str | None = None  # event to wait for before this node
    record: str | None = None  # event recorded after this node


@dataclass(frozen=True)
class Plan:
    items: tuple[PlanItem, ...]
    n_streams: int

    def format(self) -> str:
        """One line per node: order, stream, layer, op, k_chunk, n_tb (where set), events."""
        lines = [f"{'#':>4} {'stream':<6} {'layer':>5} {'node':<28} {'out x in':>11} {'bits':>4} {'k_chunk':>7} "
                 f"{'n_tb':>4}  events"]
        for i, it in enumerate(self.items):
            n = it.node
            events = " ".join(filter(None, [f"wait {it.wait}" if it.wait else "", f"record {it.record}" if it.record else ""]))
            k = n.attr("k_chunk", "")
            layer = "" if n.layer is None else n.layer
            shape = "x".join(map(str, n.attr("shape", ()))) or ""
            lines.append(f"{i:>4} {'side' if it.stream else 'main':<6} {layer:>5} {n.name:<28} {shape:>11} "
                         f"{n.attr('bits', '')!s:>4} {k!s:>7} {n.attr('n_tb', '')!s:>4}  {events}")
        return "\n".join(lines)


def schedule(graph: Graph) -> Plan:
    """Graph order, except that a group's side-stream nodes are issued before its base GEMV."""
    nodes = graph.nodes
    forked = {n.inputs[0] for n in nodes if n.op == "selector"}  # tensors a side stream starts from
    items: list[PlanItem] = []
    i = 0
    while i < len(nodes):
        node = nodes[i]
        side = nodes[i + 1 : i + 4]
        if node.op == "base_gemv" and [n.op for n in side] == list(SIDE_OPS):
            items.append(PlanItem(side[0], SIDE, wait=f"fork:{node.inputs[0]}"))
            items.append(PlanItem(side[1], SIDE))
            items.append(PlanItem(side[2], SIDE, record=f"join:{side[2].outputs[0]}"))
            items.append(PlanItem(node, MAIN))
            i += 4
            continue
        if node.op == "merge":
            items.append(PlanItem(node, MAIN, wait=f"join:{node.inputs[1]}"))
        else:
            out = node.outputs[0]
            items.append(PlanItem(node, MAIN, record=f"fork:{out}" if out in forked else None))
        i += 1
    return Plan(tuple(items), n_streams=2)
