"""Train the ``tiny`` backbone briefly on the packaged demo sample and export it to a bundle (for CI's check
of the runtime-only install: a real bundle without downloading weights). Needs the dev install (torch).

    python scripts/make_tiny_bundle.py OUT_DIR      # OUT_DIR/run (the run), OUT_DIR/bundle (the bundle)
"""
from __future__ import annotations

import sys
from pathlib import Path

from lungsam.export.bundle import export_bundle
from lungsam.export.config import ExportOptions
from lungsam.train.config import TrainConfig
from lungsam.train.run import train_run


def main(out: Path) -> None:
    """Same settings as the test suite's ``tiny_bundle`` fixture: points, one split, 3 epochs, FP32 ONNX."""
    train_run(TrainConfig(backbone="tiny", prompt="points", folds=1, epochs=3, lr=1e-3, batch_size=4),
              out / "run", log=print, progress=False)
    # the untrained tiny model's jitter IoU is noise: no bound on it (tests/conftest.py TINY_JITTER_SHIFT)
    result = export_bundle(out / "run", out / "bundle", ExportOptions(max_jitter_log_odds_shift=6.0),
                           parity_images=4, log=print)
    print(result.summary())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
