"""Our forward of the packaged GGUF models against transformers' own GGUF loading.

    python bench/parity.py --out bench/results/parity.json

Both dequantize the same file to float32 and run the first window of the evaluation text;
reported per model: top-1 agreement of next-token predictions and max |logit difference|.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.meta import run_meta  # noqa: E402
from decdec.models.arch import forward  # noqa: E402
from decdec.models.corpus import corpus_text  # noqa: E402
from decdec.models.loader import PACKAGED, load_model  # noqa: E402


@torch.no_grad()
def parity(model_name: str, n_tokens: int = 128) -> dict:
    from transformers import AutoModelForCausalLM

    ours = load_model(model_name)
    path = PACKAGED[model_name]()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    tokens = torch.tensor(ours.tokenizer.encode(corpus_text("pydoc", "eval")[:4000])[:n_tokens])
    a = forward(ours.args, ours.weights, tokens)
    b = theirs(tokens[None]).logits[0].float()
    return {
        "model": model_name,
        "tokens": int(tokens.shape[0]),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "max_abs_logit": b.abs().max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = [parity(m) for m in a.models.split(",")]
    for r in rows:
        print(f"{r['model']:<14} top-1 agreement {r['top1_agreement']:.1%}  max |logit diff| {r['max_abs_logit_diff']:.2e} "
              f"(max |logit| {r['max_abs_logit']:.1f}, {r['tokens']} tokens)")
    Path(a.out).write_text(json.dumps({**run_meta(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
