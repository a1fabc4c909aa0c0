"""One decode step of a model as a static op graph (decdec/graph.py), for any of our families: the
decoder block of models/arch.py, run over value names by a recorder that adds a node per op.

Every linear group with compensation becomes five nodes: the base GEMV on the quantized weight,
and beside it the selector (which channels), the DMA (fetch their residual rows from pinned host
memory), the correction (dequantize, GEMV on the picked channels) and a merge into the base
output. q/k/v share one group (one selection, one fetch), and so do gate/up.
"""

from __future__ import annotations

from decdec.args import ModelArgs
from decdec.constants import LINEAR_KINDS, n_selected
from decdec.graph import Graph
from decdec.models.arch import LayerOps, block

PerGroup = int | dict  # one value for every linear group, or one per (kind, bits) as the tuner gives them


def per_group(value: PerGroup, kind: str, bits: int, name: str) -> int:
    """`value` for the linear groups of one kind at one bit width: an int for all, or the entry
    (kind, bits) of a dict (the one shape every per-group setting takes: `Tuning.k_chunks`)."""
    if not isinstance(value, dict):
        return value
    if (kind, bits) not in value:
        raise ValueError(f"{name} has no value for the {kind} groups at {bits} bits: keys are {sorted(value)}")
    return value[kind, bits]


def group_shapes(args: ModelArgs, layer_bits: list[int]) -> dict[tuple[str, int], tuple[int, int, int, int]]:
    """(kind, bits) -> (out, in, bits, groups per decode step): the linear shapes a step runs, as the
    tuner and `decdec tune` take them (a 3.5-bit model has each kind at 3 and at 4 bits)."""
    return {(kind, bits): (*args.linear_shape(kind), bits, layer_bits.count(bits))
            for bits in sorted(set(layer_bits)) for kind in LINEAR_KINDS}


def recorder(g: Graph, args: ModelArgs, layer: int, bits: int, k_chunk: PerGroup, n_tb: PerGroup) -> LayerOps:
    """`block`'s ops for building one layer of the graph: its values are graph value names (h.3,
    qkv.3, ...; the layer's output x is the next layer's input x.4), and each call adds its nodes."""
    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"x.{layer + 1}" if name == "x" else f"{name}.{layer}"
        return g.add(op, inputs, [out], layer, **attrs).outputs[0]

    def linear(group: str, x: str, name: str) -> str:
        """The base GEMV alone, or with its compensation: five nodes (n_tb goes on the correction)."""
        (n_out, n_in), k = args.linear_shape(group), per_group(k_chunk, group, bits, "k_chunk")
        common = dict(group=group, shape=(n_out, n_in), bits=bits)
        if k == 0:
            return node("base_gemv", [x], name, **common)
        p, tb = f"{group}.{layer}", per_group(n_tb, group, bits, "n_tb")  # asked only where there is a correction
        g.add("base_gemv", [x], [f"{p}.base"], layer, **common)
        g.add("selector", [x], [f"{p}.idx"], layer, **common, k_chunk=k, n_selected=n_selected(n_in, k))
        g.add("dma", [f"{p}.idx"], [f"{p}.rows"], layer, **common, k_chunk=k, row_bytes=(n_out + 1) // 2)
        g.add("correction", [x, f"{p}.idx", f"{p}.rows"], [f"{p}.corr"], layer, **common, k_chunk=k,
              **({"n_tb": tb} if tb else {}))
        return node("merge", [f"{p}.base", f"{p}.corr"], name, **common)

    return LayerOps(
        layer, linear=linear, norm=lambda x, weight, name: node("rms_norm", [x], name, weight=weight),
        attention=lambda qkv, name: node("attention", [qkv, "position"], name, sliding=args.is_sliding(layer)),
        residual_add=lambda x, branch, post_norm, name: node("residual_add", [x, branch], name, post_norm=post_norm),
        act_mul=lambda gate_up, name: node("act_mul", [gate_up], name, act="gelu_tanh" if args.is_gemma else "silu"))


def build_graph(args: ModelArgs, layer_bits: list[int], k_chunk: PerGroup, n_tb: PerGroup = 0) -> Graph:
    """The decode-step graph: embed, `block` recorded for every layer, final norm and lm_head. `k_chunk`
    and `n_tb` (correction thread blocks; 0: the executor's default) are each one value for all groups,
    or a dict by (kind, bits) as `scheduler.tuner.Tuning` gives them."""
    g = Graph()
    g.add("embed", ["token"], ["x.0"], scale=args.is_gemma)
    for i in range(args.n_layers):
        block(args, recorder(g, args, i, layer_bits[i], k_chunk, n_tb), f"x.{i}")
    g.add("rms_norm", [f"x.{args.n_layers}"], ["hf"], weight="norm")
    g.add("lm_head", ["hf"], ["logits"])
    g.check()
    return g
