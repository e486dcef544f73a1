"""Measure how sensitive the embedded model is to quantization error in each layer's K and V.

CacheGen gives more precision to the layers whose KV errors hurt the output most. This script
measures that offline, on kvctl/common/texts/calibration.txt (never on the held-out benchmark text):
for each (layer, K/V) it quantizes only that tensor (step = the vector's RMS) and records the
KL divergence of the next-token distributions over the continuation. The step multipliers
``(w / geometric_mean(w)) ** -0.5`` equalise each tensor's share of the distortion (for
entropy-coded uniform quantizers, the optimum of sum_i w_i * step_i**2 at a fixed total rate).

Usage: python benchmarks/calibrate_sensitivity.py > /tmp/profile.txt   (~1-2 min on 2 cores)
The printed table goes into kvctl.codecs.profiles.
"""

from __future__ import annotations

import sys

import torch

from kvctl.common.bench import TEXTS
from kvctl.common.model import load_model, load_tokenizer_for, prefill


def main() -> None:
    prefix, cont = 512, 256
    lm = load_model("smollm2")
    tok = load_tokenizer_for("smollm2")
    ids = list(tok((TEXTS / "calibration.txt").read_text())["input_ids"])[:prefix + cont]
    _, kv = prefill(lm, ids[:prefix])
    x = kv.to(torch.float16).float()
    ref, _ = prefill(lm, ids[prefix:], past_kv=x)
    ref_lp = torch.log_softmax(ref[:-1], -1)

    def kl(y: torch.Tensor) -> float:
        logits, _ = prefill(lm, ids[prefix:], past_kv=y)
        lp = torch.log_softmax(logits[:-1].float(), -1)
        return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())

    L = x.shape[0]
    w = torch.zeros(L, 2)
    for layer in range(L):
        for j in range(2):
            y = x.clone()
            t = x[layer, j]
            step = t.square().mean(-1, keepdim=True).sqrt()
            y[layer, j] = torch.round(t / step) * step
            y[layer, j, 0] = t[0]  # the codec keeps the first token exactly
            w[layer, j] = kl(y)
        print(f"layer {layer}: K {w[layer, 0]:.2e}  V {w[layer, 1]:.2e}", file=sys.stderr)
    mult = (w / w.log().mean().exp()).pow(-0.5).clamp(0.125, 8.0)
    print("(")
    for layer in range(L):
        print(f"    ({mult[layer, 0]:.2f}, {mult[layer, 1]:.2f}),")
    print(")")


if __name__ == "__main__":
    main()
