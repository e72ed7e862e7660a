"""The inputs of ``lungsam bench`` and ``bench --sweep``: the working-frame images and masks (``--data`` or the
test split of the bundle's run) and where the bundle says its run is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..manifest import Manifest
from .plan import BenchError

Log = Callable[[str], None]


@dataclass
class Images:
    """The benchmarked images: ``images`` working-frame ``(S, S, 3)`` uint8, ``masks`` ``(S, S)`` bool ground truth,
    ``ids`` their sample ids, ``source`` a sentence saying where they came from."""

    source: str
    ids: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]


def bundle_run(meta: Manifest) -> tuple[str | None, int | None]:
    """``(run folder, fold)`` the bundle's typed manifest records in ``run`` (``Bundle.meta.run``): the folder is
    ``run.source``, present only in bundles exported with ``--provenance``; ``(None, None)`` without a run record."""
    run = meta.run
    if run is None:
        return None, None
    return run.source, run.fold


def load_images(working_size: int, data_dir: str | None, run_info: dict | None, split: dict | None,
                limit: int | None, log: Log) -> Images:
    """Working-frame images/masks: ``data_dir`` (all pairs) or the run's test split."""
    from ..data import load_dataset, pool

    if data_dir is not None:
        ds = load_dataset(data_dir, working_size, log=log)
        samples = ds.samples
        source = f"{data_dir} (all {len(samples)} pairs)"
    else:
        if run_info is None or split is None:
            raise BenchError("the bundle's run is unknown or missing, so its test split cannot be used: pass "
                             "--data DIR (or --run RUN)")
        datasets = [load_dataset(p, working_size, log=log) for p in run_info["config"]["data"]]
        by_id = pool(datasets).by_id()
        missing = [i for i in split["test"] if i not in by_id]
        if missing:
            raise BenchError(f"{len(missing)} test ids of the run are not in its data ({missing[:3]}...); "
                             "pass --data")
        samples = [by_id[i] for i in split["test"]]
        source = f"run test split ({', '.join(run_info['config']['data'])}; {len(samples)} images)"
    if limit:
        samples = samples[:limit]
    if not samples:
        raise BenchError("no images to benchmark")
    return Images(source=source, ids=[s.id for s in samples], images=[s.image for s in samples],
                  masks=[s.mask for s in samples])
