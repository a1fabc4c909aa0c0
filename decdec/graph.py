"""The static op graph IR: plain data, printable, built once per model at compile time.

A graph is a flat, topologically sorted list of `Node`s over named tensors. Nodes say *what* runs
(op type, inputs, outputs, attributes such as layer, shape, bits, k_chunk); the scheduler says
*where and when* (stream, order, events) in a separate `Plan`; executors say *how*.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Node:
    op: str  # embed, rms_norm, base_gemv, selector, dma, correction, merge, attention, act_mul, residual_add, lm_head
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    layer: int | None = None
    attrs: tuple[tuple[str, object], ...] = ()  # frozen key/value pairs: use .attr(name)

    def attr(self, name: str, default=None):
        return dict(self.attrs).get(name, default)

    @property
    def name(self) -> str:
        group = self.attr("group")
        where = f"L{self.layer}." if self.layer is not None else ""
        return f"{where}{group + '.' if group else ''}{self.op}"


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)

    def add(self, op: str, inputs, outputs, layer: int | None = None, **attrs) -> Node:
        node = Node(op, tuple(inputs), tuple(outputs), layer, tuple(sorted(attrs.items())))
        self.nodes.append(node)
        return node

    def check(self) -> None:
        """Every input is produced by an earlier node (or is a graph input), every output once."""
        produced = {"token", "position"}
        for node in self.nodes:
            missing = [t for t in node.inputs if t not in produced]
            if missing:
                raise ValueError(f"node {node.name} reads {missing} before anything writes them")
            twice = [t for t in node.outputs if t in produced]
            if twice:
                raise ValueError(f"node {node.name} rewrites {twice}")
            produced.update(node.outputs)
