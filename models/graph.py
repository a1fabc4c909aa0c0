"""One decode step of a model as a static op graph (runtime/graph.py), for any of our families.

Every linear group with compensation becomes five nodes: the base GEMV on the quantized weight,
and beside it the selector (which channels), the DMA (fetch their residual rows from pinned host
memory), the correction (dequantize, GEMV on the picked channels) and a merge into the base
output. q/k/v share one group (one selection, one fetch), and so do gate/up.
"""

from __future__ import annotations

from models.arch import ModelArgs
from ops.selector import n_selected
from runtime.graph import Graph


def add_linear(g: Graph, layer: int, group: str, x: str, out: str, shape: tuple[int, int], bits: int, k_chunk: int) -> None:
    """The nodes of one linear group reading `x` and writing `out`."""
    n_out, n_in = shape
    common = dict(group=group, shape=shape, bits=bits)
    if k_chunk == 0:
        g.add("base_gemv", [x], [out], layer, **common)
        return
    p = f"{group}.{layer}"
    n_sel = n_selected(n_in, k_chunk)
    g.add("base_gemv", [x], [f"{p}.base"], layer, **common)
    g.add("selector", [x], [f"{p}.idx"], layer, **common, k_chunk=k_chunk, n_selected=n_sel)
    g.add("dma", [f"{p}.idx"], [f"{p}.rows"], layer, **common, k_chunk=k_chunk, row_bytes=(n_out + 1) // 2)
    g.add("correction", [x, f"{p}.idx", f"{p}.rows"], [f"{p}.corr"], layer, **common, k_chunk=k_chunk)
    g.add("merge", [f"{p}.base", f"{p}.corr"], [out], layer, **common)


def build_graph(args: ModelArgs, layer_bits: list[int], k_chunk: dict[str, int] | int) -> Graph:
    """The decode-step graph; `k_chunk` per group kind (qkv, o, gate_up, down) or one for all."""
    ks = k_chunk if isinstance(k_chunk, dict) else {kind: k_chunk for kind in ("qkv", "o", "gate_up", "down")}
    g = Graph()
    g.add("embed", ["token"], ["x.0"], scale=args.is_gemma)
    for i in range(args.n_layers):
        x, bits = f"x.{i}", layer_bits[i]
        g.add("rms_norm", [x], [f"h.{i}"], i, weight=f"layers.{i}.attn_norm")
        add_linear(g, i, "qkv", f"h.{i}", f"qkv.{i}", args.linear_shape("qkv"), bits, ks["qkv"])
        g.add("attention", [f"qkv.{i}", "position"], [f"attn.{i}"], i, sliding=args.is_sliding(i))
        add_linear(g, i, "o", f"attn.{i}", f"o.{i}", args.linear_shape("o"), bits, ks["o"])
        g.add("residual_add", [x, f"o.{i}"], [f"xa.{i}"], i,
              post_norm=f"layers.{i}.post_attn_norm" if args.is_gemma else None)
        g.add("rms_norm", [f"xa.{i}"], [f"h2.{i}"], i, weight=f"layers.{i}.ffn_norm")
        add_linear(g, i, "gate_up", f"h2.{i}", f"gu.{i}", args.linear_shape("gate_up"), bits, ks["gate_up"])
        g.add("act_mul", [f"gu.{i}"], [f"a.{i}"], i, act="gelu_tanh" if args.is_gemma else "silu")
        add_linear(g, i, "down", f"a.{i}", f"d.{i}", args.linear_shape("down"), bits, ks["down"])
        g.add("residual_add", [f"xa.{i}", f"d.{i}"], [f"x.{i + 1}"], i,
              post_norm=f"layers.{i}.post_ffn_norm" if args.is_gemma else None)
    g.add("rms_norm", [f"x.{args.n_layers}"], ["hf"], weight="norm")
    g.add("lm_head", ["hf"], ["logits"])
    g.check()
    return g
