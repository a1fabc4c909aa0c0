"""One decode step of a model as a static op graph (runtime/graph.py), for any of our families.

Every linear group with compensation becomes five nodes: the base GEMV on the quantized weight,
and beside it the selector (which channels), the DMA (fetch their residual rows from pinned host
memory), the correction (dequantize, GEMV on the picked channels) and a merge into the base
output. q/k/v share one group (one selection, one fetch), and so do gate/up.
"""

from __future__ import annotations

from decdec.args import ModelArgs
from decdec.constants import LINEAR_KINDS, n_selected
from decdec.graph import Graph

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


def add_linear(g: Graph, layer: int, group: str, x: str, out: str, shape: tuple[int, int], bits: int, k_chunk: int,
               n_tb: int = 0) -> None:
    """The nodes of one linear group reading `x` and writing `out`; `n_tb` (0: the executor's
    default) goes on the correction node."""
    n_out, n_in = shape
    common = dict(group=group, shape=shape, bits=bits)
    if k_chunk == 0:
        g.add("base_gemv", [x], [out], layer, **common)
        return
    p = f"{group}.{layer}"
    n_sel = n_selected(n_in, k_chunk)
    blocks = {"n_tb": n_tb} if n_tb else {}
    g.add("base_gemv", [x], [f"{p}.base"], layer, **common)
    g.add("selector", [x], [f"{p}.idx"], layer, **common, k_chunk=k_chunk, n_selected=n_sel)
    g.add("dma", [f"{p}.idx"], [f"{p}.rows"], layer, **common, k_chunk=k_chunk, row_bytes=(n_out + 1) // 2)
    g.add("correction", [x, f"{p}.idx", f"{p}.rows"], [f"{p}.corr"], layer, **common, k_chunk=k_chunk, **blocks)
    g.add("merge", [f"{p}.base", f"{p}.corr"], [out], layer, **common)


def build_graph(args: ModelArgs, layer_bits: list[int], k_chunk: PerGroup, n_tb: PerGroup = 0) -> Graph:
    """The decode-step graph. `k_chunk` and `n_tb` (correction thread blocks; 0: the executor's default)
    are each one value for all groups, or a dict by (kind, bits) as `scheduler.tuner.Tuning` gives them."""
    g = Graph()
    g.add("embed", ["token"], ["x.0"], scale=args.is_gemma)
    for i in range(args.n_layers):
        x, bits = f"x.{i}", layer_bits[i]

        def linear(kind: str, x_in: str, out: str) -> None:
            k = per_group(k_chunk, kind, bits, "k_chunk")
            add_linear(g, i, kind, x_in, out, args.linear_shape(kind), bits, k,
                       per_group(n_tb, kind, bits, "n_tb") if k else 0)  # no correction: no n_tb asked

        g.add("rms_norm", [x], [f"h.{i}"], i, weight=f"layers.{i}.attn_norm")
        linear("qkv", f"h.{i}", f"qkv.{i}")
        g.add("attention", [f"qkv.{i}", "position"], [f"attn.{i}"], i, sliding=args.is_sliding(i))
        linear("o", f"attn.{i}", f"o.{i}")
        g.add("residual_add", [x, f"o.{i}"], [f"xa.{i}"], i,
              post_norm=f"layers.{i}.post_attn_norm" if args.is_gemma else None)
        g.add("rms_norm", [f"xa.{i}"], [f"h2.{i}"], i, weight=f"layers.{i}.ffn_norm")
        linear("gate_up", f"h2.{i}", f"gu.{i}")
        g.add("act_mul", [f"gu.{i}"], [f"a.{i}"], i, act="gelu_tanh" if args.is_gemma else "silu")
        linear("down", f"a.{i}", f"d.{i}")
        g.add("residual_add", [f"xa.{i}", f"d.{i}"], [f"x.{i + 1}"], i,
              post_norm=f"layers.{i}.post_ffn_norm" if args.is_gemma else None)
    g.add("rms_norm", [f"x.{args.n_layers}"], ["hf"], weight="norm")
    g.add("lm_head", ["hf"], ["logits"])
    g.check()
    return g
