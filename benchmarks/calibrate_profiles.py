"""Regenerate the committed cachegen step profiles of the bundled models.

kvctl calibrates any model on first load (kvctl.common.calibration); the bundled models'
profiles are committed so that tests, `kvctl serve` and `kvctl bench` do not pay for it.
Run after changing cachegen's level constants (the profiles' key then no longer matches):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibrate_profiles.py [smollm2 gemma3]

About 2 x layers x 2 levels forward passes over 256 tokens per model (a few minutes each on
one core). Prints each model's measured sensitivity spread and expected gain.
"""

from __future__ import annotations

import sys
import time

from kvctl.common import calibration
from kvctl.common.model import BUILTIN_MODELS, load_model, load_tokenizer_for
from kvctl.common.paths import atomic_write


def main(models: list[str]) -> None:
    for spec in models:
        t0 = time.perf_counter()
        lm = load_model(spec)
        prof = calibration.calibrate(lm, load_tokenizer_for(spec))
        path = calibration.committed_path(lm.name)
        atomic_write(path, prof.to_json().encode())
        for level in calibration.LEVELS:
            a = [x for pair in prof.sensitivity[level] for x in pair]
            m = [x for pair in prof.multipliers[level] for x in pair]
            print(f"{lm.name} {level}: sensitivity max/min {max(a) / min(a):.1f}, AM/GM "
                  f"{prof.gain(level):.3f}; multipliers {min(m):.2f}..{max(m):.2f}")
        print(f"{lm.name}: wrote {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:] or list(BUILTIN_MODELS))
