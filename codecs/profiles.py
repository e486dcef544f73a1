"""Per-(layer, K/V) quantization step multipliers: CacheGen's sensitivity-driven allocation.

A profile is a property of the model, measured offline by
``benchmarks/calibrate_sensitivity.py`` on ``kvctl/common/texts/calibration.txt`` (a text the
benchmark never reads): each tensor's multiplier is ``(w / geomean(w)) ** -0.5`` where ``w``
is the KL divergence the model shows when only that tensor is quantized. The codec sees only
the KV shape, so a profile is looked up by (layers, kv heads, head dim). Encoder-only data:
the steps travel in each blob, so a changed profile never breaks old blobs.
"""

from __future__ import annotations

# SmolLM2-135M-Instruct (30 layers, 3 KV heads, head dim 64): (key, value) multipliers.
SMOLLM2_135M = (
    (1.96, 2.49),
    (0.39, 1.50),
    (0.73, 2.44),
    (0.64, 2.22),
    (0.78, 2.17),
    (0.72, 2.20),
    (0.87, 2.43),
    (0.35, 1.63),
    (0.47, 1.60),
    (0.59, 1.82),
    (0.74, 2.07),
    (0.79, 4.73),
    (0.71, 3.71),
    (1.14, 3.42),
    (0.38, 1.80),
    (0.42, 1.58),
    (0.46, 2.99),
    (0.36, 1.06),
    (0.18, 1.08),
    (0.34, 2.54),
    (0.23, 1.23),
    (0.30, 1.52),
    (0.35, 1.81),
    (0.19, 0.71),
    (0.25, 1.21),
    (0.67, 3.48),
    (0.29, 1.77),
    (0.78, 3.70),
    (0.48, 1.28),
    (0.91, 3.59),
)

PROFILES: dict[tuple[int, int, int], tuple[tuple[float, float], ...]] = {
    (30, 3, 64): SMOLLM2_135M,
}

# Unknown models: on every layer measured here keys were 5-20x more sensitive than values,
# so keys get about a third of the values' step; layers are treated alike.
GENERIC = (0.5, 1.6)


def layer_profile(num_layers: int, num_kv_heads: int, head_dim: int
                  ) -> list[tuple[float, float]]:
    """(key, value) step multipliers for each layer of a model with this KV shape."""
    prof = PROFILES.get((num_layers, num_kv_heads, head_dim))
    if prof is None:
        return [GENERIC] * num_layers
    return list(prof)
