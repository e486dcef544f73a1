"""Regenerate the committed kvtc bases (transform, token predictor, level steps) of the
bundled models.

kvctl calibrates any other model on first load (kvctl.common.transform); the bundled
models' bases are committed (codecs/bases/) so that tests, workers, the LMCache serde and
`kvctl bench` share them without paying for it. Run after a change that bumps
``transform_key()``:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibrate_bases.py [smollm2 gemma3]

Two prefills of the calibration texts for the covariances, then 8 backward passes over 256
tokens per text for the Fisher information, then a bisection per level for its step
(1.5-3 minutes per model on one core).
"""

from __future__ import annotations

import sys
import time

from kvctl.codecs.basis import COMMITTED
from kvctl.common import transform
from kvctl.common.model import BUILTIN_MODELS, load_model, load_tokenizer_for


def main(models: list[str]) -> None:
    for spec in models:
        t0 = time.perf_counter()
        lm = load_model(spec)
        b = transform.calibrate_transform(lm, load_tokenizer_for(spec))
        for old in COMMITTED.glob("*.kvb"):
            if old.name.startswith(transform._candidates_stem(lm.name)):
                old.unlink()
        path = transform.write_transform(b, COMMITTED)
        print(f"{lm.name}: basis {b.id}, level steps {b.meta['steps']};"
              f" wrote {path} ({path.stat().st_size} B, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:] or list(BUILTIN_MODELS))
