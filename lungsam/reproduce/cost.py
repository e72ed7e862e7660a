"""The cost model of ``lungsam reproduce``: rates measured in this invocation's step folders, and the full
protocol's cost extrapolated from them (``results.json["estimate"]``; :func:`lungsam.reproduce.tables.render_cost`
writes it out)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import read_json
from ..layout import RunLayout
from . import paper

FULL_SET_SIZES = {"montgomery": 138, "shenzhen": 566}
WORKING_DAY_S = 8 * 3600
# the mean of the full protocol's Montgomery grid cells at lr 1e-4 and 1e-3 (30-57 epochs, patience 15)
TYPICAL_EPOCHS = 45
# grid cells at this lr or below run to the epoch cap (the full protocol's Montgomery cells did: 100 of 100)
SLOW_LR = 1e-5


def _fold_costs(root: Path, runs) -> tuple[float | None, float | None]:
    """Median over the folds of ``runs`` of (epoch seconds per image of train + val, seconds outside the epochs).

    An epoch's seconds are its whole wall time (training, validation, weight files) where the fold recorded it
    (``epochs_wall_s``), else its training time. Medians, so one fold slowed by another job on a shared machine
    does not move the extrapolation."""
    rates, fixed = [], []
    for run in dict.fromkeys(runs):
        for f in read_json(RunLayout(root / run).metrics_json)["folds"]:
            units = f["epochs_run"] * (f["n"]["train"] + f["n"]["val"])
            epochs_s = f.get("epochs_wall_s", f["train_time_s"])
            if units:
                rates.append(epochs_s / units)
                fixed.append(max(f["fold_wall_s"] - epochs_s, 0.0))
    if not rates:
        return None, None
    return float(np.median(rates)), float(np.median(fixed))


def ran_at_once(step: dict) -> int:
    """How many training steps ran at once beside ``step`` (``--jobs``, recorded by the worker path; 1 in the
    main process)."""
    return step.get("info", {}).get("jobs", 1)


def _steps_at_once(steps: list[dict], kinds: tuple[str, ...]) -> int:
    """:func:`ran_at_once` for the timed steps of ``kinds`` (their median)."""
    n = [ran_at_once(s) for s in steps if s["kind"] in kinds]
    return int(np.median(n)) if n else 1


def estimate(res: dict, st, root: Path) -> dict:
    """Per-image encode cost, per-(image x epoch) training cost and per-fold fixed cost (model build, threshold sweep,
    test scoring) measured in this invocation's artifacts, and the full protocol's cost extrapolated from them: an
    upper bound (every run goes to 100 epochs) and a typical figure: the grid's cells at ``SLOW_LR`` run to the cap,
    every other run stops after ``TYPICAL_EPOCHS`` (a k-fold run at the paper's lr 1e-5 would go on longer)."""
    enc = [s["info"] for s in res["steps"] if s["kind"] == "encode" and s["info"].get("computed", 0) > 0]
    enc_rate = (sum(i["encode_seconds"] for i in enc) / sum(i["computed"] for i in enc)) if enc else None
    rate, fixed = _fold_costs(root, [s["out"] for s in res["steps"] if s["kind"] in ("grid", "k-fold", "pooled")])
    u_rate, u_fixed = _fold_costs(root, [s["out"] for s in res["steps"] if s["kind"] == "unet"])
    out = {"encode_s_per_image": enc_rate, "train_s_per_image_epoch": rate, "train_fixed_s_per_fold": fixed,
           "unet_s_per_image_epoch": u_rate, "unet_fixed_s_per_fold": u_fixed,
           "note": "medians over this invocation's folds on this machine (reused steps keep their original timings)"}
    if rate is not None:
        n_grid, n_prompts, k, ep = len(paper.LR_GRID) * len(paper.WD_GRID), len(st.prompts), 5, 100
        n_slow = sum(lr <= SLOW_LR for lr in paper.LR_GRID) * len(paper.WD_GRID)
        per_run = 0.8 * sum(FULL_SET_SIZES.values())  # train + val images of one fold of each set
        image_epochs = per_run * (n_grid + n_prompts * k + k)  # grid cells, k-fold runs, pooled folds
        unet_image_epochs = per_run * k if st.unet else 0
        n_folds = 2 * (n_grid + n_prompts * k) + k
        n_unet = 2 * k if st.unet else 0

        def total(epochs: int, slow_epochs: int) -> float:
            return (epochs * ((image_epochs - per_run * n_slow) * rate + unet_image_epochs * (u_rate or rate))
                    + slow_epochs * per_run * n_slow * rate
                    + n_folds * fixed + n_unet * (u_fixed if u_fixed is not None else fixed))
        # rates measured in N worker processes at once (--jobs N) come from N steps sharing the wall clock
        out["jobs"] = jobs = _steps_at_once(res["steps"], ("grid", "k-fold", "pooled", "unet"))
        out["full_protocol_training_s_upper_bound"] = total(ep, ep) / jobs
        out["full_protocol_training_s_typical"] = total(TYPICAL_EPOCHS, ep) / jobs
        out["full_protocol_encode_s"] = None if enc_rate is None else enc_rate * sum(FULL_SET_SIZES.values())
        out["full_protocol_runs"] = {"per_set": n_grid + n_prompts * k, "epochs_max": ep,
                                     "epochs_typical": TYPICAL_EPOCHS, "fold_trainings": 2 * (n_grid + n_prompts * k),
                                     "pooled_fold_trainings": k,
                                     "slow_grid_cells_per_set": n_slow, "slow_lr": SLOW_LR}
    return out
