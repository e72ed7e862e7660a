"""Paired comparison of training runs on the same test images (``lungsam compare``).

An option's effect (augmentation, more points, another lr) is measured by training the same split
twice and comparing per-image test F1: the runs must share data, folds and seed, so each test image
is scored by both. Reported per run: test F1 / IoU over the pooled test images, and against the
first run (the baseline) the paired mean difference with its standard error, how many images
improved or worsened, and the Wilcoxon signed-rank p-value (scipy).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import read_json
from ..errors import LungsamError
from ..layout import FoldLayout, RunLayout
from ..metrics import summarize
from .config import TrainConfig, UNetConfig

SPLIT_KEYS = ("data", "folds", "seed", "size")  # settings that fix which images are tested, and at what size


class CompareError(LungsamError, ValueError):
    """The runs cannot be compared image by image."""


def finished_folds(run_dir: Path) -> list[dict]:
    """The ``metrics.json`` of every finished fold of ``run_dir`` (training and test scoring done), in fold order."""
    layout = RunLayout(run_dir)
    folds = [read_json(f.metrics_json) for f in layout.existing_folds() if f.metrics_json.exists()]
    if not folds:
        raise CompareError(f"{run_dir}: no finished fold (no {FoldLayout(layout.folds_dir).metrics_json.name} "
                           f"in {layout.folds_dir}/fold_*)")
    return folds


def per_image(folds: list[dict]) -> dict[str, dict[str, float]]:
    """``{sample id: {"f1", "iou", "hd95"}}`` over the test images of ``folds`` (:func:`finished_folds`); ``hd95``
    (pixels, working frame) is ``None`` for folds scored before it was kept or where it is undefined."""
    return {r["id"]: {"f1": float(r["f1"]), "iou": float(r["iou"]), "hd95": r.get("hd95")}
            for f in folds for r in f["per_image"]}


def hd95_summary(values: list[float | None]) -> dict | None:
    """Summary of per-image HD95 over the common images, ``None`` unless every image has one."""
    if not values or any(v is None for v in values):
        return None
    return summarize(values)


def test_ids_by_fold(run_dir: Path) -> list[list[str]] | None:
    """Each fold's test image ids from the run's ``splits.json`` (``None`` for a run that has none)."""
    p = RunLayout(run_dir).splits_json
    return [sorted(f["test"]) for f in read_json(p)] if p.exists() else None


def check_same_images(dirs: list[Path], cfgs: list[dict]) -> None:
    """Raise :class:`CompareError` unless every run tested the baseline's images, fold by fold, at its size.

    The splits themselves (``splits.json``) decide; for runs that lack them the settings that fix the
    splits (:data:`SPLIT_KEYS`) must match. The working size always must: it is the frame scores are taken in.
    """
    base_ids = test_ids_by_fold(dirs[0])
    for d, c in zip(dirs[1:], cfgs[1:]):
        ids = test_ids_by_fold(d)
        keys = ("size",) if base_ids is not None and ids is not None else SPLIT_KEYS
        diff = {k: (cfgs[0].get(k), c.get(k)) for k in keys if cfgs[0].get(k) != c.get(k)}
        if diff:
            raise CompareError(f"{d} tested other images than {dirs[0]} (different {', '.join(diff)}: {diff}); "
                               "train both with the same --data, --folds, --seed and --size")
        if base_ids is not None and ids is not None and ids != base_ids:
            bad = [i for i, (a, b) in enumerate(zip(base_ids, ids)) if a != b] or ["count"]
            raise CompareError(f"{d} and {dirs[0]} have different test splits ({RunLayout(d).splits_json.name}; "
                               f"fold {bad[0]} differs): "
                               "train both on the same data with the same --folds and --seed")


def _config(run_dir: Path) -> dict:
    """The run's recorded config, with the defaults of the settings an older run did not record (what it did)."""
    p = RunLayout(run_dir).run_json
    if not p.exists():
        raise CompareError(f"{run_dir}: not a run folder (no {p.name})")
    c = read_json(p)["config"]
    return {**(UNetConfig if c.get("model") == "unet" else TrainConfig).from_dict(c).to_dict(), **c}


def changed_settings(base: dict, other: dict) -> dict[str, tuple]:
    """Settings whose values differ (``{key: (base, other)}``), ignoring device-only ones."""
    skip = {"device", "embed_batch_size", "checkpoint", "recipe_values"}
    keys = sorted((set(base) | set(other)) - skip)
    return {k: (base.get(k), other.get(k)) for k in keys if base.get(k) != other.get(k)}


def model_label(cfg: dict) -> str:
    """A run's model in a few words: ``U-Net`` or ``SAM <backbone> (<prompt>)``."""
    if cfg.get("model") == "unet":
        return "U-Net " + "-".join(map(str, cfg.get("channels", [])))
    return f"SAM {cfg.get('backbone')} ({cfg.get('prompt')} prompt)"


def paired(base: list[float], other: list[float]) -> dict:
    """Paired difference ``other - base``: mean, standard error, improved / worse / equal counts, Wilcoxon p."""
    d = np.asarray(other, np.float64) - np.asarray(base, np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    p = float("nan")
    if n > 1 and np.any(d != 0):
        from scipy.stats import wilcoxon

        p = float(wilcoxon(d, zero_method="wilcox").pvalue)
    return {"mean": float(d.mean()), "se": se, "improved": int((d > 0).sum()), "worse": int((d < 0).sum()),
            "equal": int((d == 0).sum()), "wilcoxon_p": p, "n": n}


def compare_runs(run_dirs: list[str | Path], allow_partial: bool = False) -> dict:
    """Compare runs against the first one on their common test images.

    Raises :class:`CompareError` when the runs tested different images (other splits or size), or when a
    run has not finished all its folds unless ``allow_partial`` (then only the finished folds' test images
    are compared, and the result says so).
    """
    if len(run_dirs) < 2:
        raise CompareError("give at least two runs: the baseline first")
    dirs = [Path(d) for d in run_dirs]
    cfgs = [_config(d) for d in dirs]
    check_same_images(dirs, cfgs)
    done = [finished_folds(d) for d in dirs]
    total = [int(c.get("folds") or 1) for c in cfgs]  # folds the run was set up for
    partial = [f"{d} has {len(f)} of {t} folds" for d, f, t in zip(dirs, done, total) if len(f) < t]
    if partial and not allow_partial:
        raise CompareError(f"unfinished run: {'; '.join(partial)}. Finish it (--resume), or compare the finished "
                           "folds' test images only with --allow-partial")
    scores = [per_image(f) for f in done]
    ids = sorted(set(scores[0]).intersection(*scores[1:]))
    if not ids:
        raise CompareError("the runs share no test image")
    rows = [run_row(d, c, s, folds, t, cfgs[0], scores[0] if i else None, ids)
            for i, (d, c, s, folds, t) in enumerate(zip(dirs, cfgs, scores, done, total))]
    return {"baseline": str(dirs[0]), "n_images": len(ids), "split_settings": {k: cfgs[0].get(k) for k in SPLIT_KEYS},
            "partial": partial, "runs": rows}


def run_row(run_dir: Path, cfg: dict, scores: dict, folds: list[dict], total: int, base_cfg: dict,
            base_scores: dict | None, ids: list[str]) -> dict:
    """One run's row of :func:`compare_runs` on the common images ``ids`` (``base_scores``: the baseline's
    per-image scores, ``None`` for the baseline itself)."""
    f1 = [scores[i]["f1"] for i in ids]
    if base_cfg.get("model") != cfg.get("model"):  # a U-Net beside a SAM run: name the models, not every field
        changed = {"model": [model_label(base_cfg), model_label(cfg)]}
    else:
        changed = {k: list(v) for k, v in changed_settings(base_cfg, cfg).items()}
    row = {"run": str(run_dir), "changed": changed, "folds_finished": len(folds), "folds": total,
           "n_scored": len(scores), "n_left_out": len(scores) - len(ids),
           "f1": summarize(f1), "iou": summarize([scores[i]["iou"] for i in ids]),
           "hd95": hd95_summary([scores[i]["hd95"] for i in ids])}
    if base_scores is not None:
        row["f1_vs_baseline"] = paired([base_scores[i]["f1"] for i in ids], f1)
    row["best_epochs"] = [f["best_epoch"] for f in folds]
    row["thresholds"] = [f["threshold"] for f in folds]
    row["train_time_s"] = sum(f["train_time_s"] for f in folds)
    return row


TABLE_HEAD = ("| run | changed | folds | test F1 mean ± std (min) | IoU | HD95 px | Δ F1 vs baseline (± SE) "
              "| better / worse | p | best epoch | threshold | train s |")


def format_markdown(result: dict) -> str:
    """One table: a row per run, the baseline first."""
    settings = ", ".join(f"{k}={v}" for k, v in result["split_settings"].items())
    lines = [f"Paired comparison on the same {result['n_images']} test images ({settings}); baseline "
             f"`{result['baseline']}`. Δ F1 = mean per-image difference to the baseline ± its standard error (SE); "
             "p = Wilcoxon signed-rank.", ""]
    if result.get("partial"):
        lines += [f"**Partial**: {'; '.join(result['partial'])}; only the finished folds' test images are compared "
                  "(per run: images scored, left out).", ""]
    lines += [TABLE_HEAD, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [markdown_row(r) for r in result["runs"]]
    return "\n".join(lines) + "\n"


def _paired_cells(r: dict) -> tuple[str, str, str]:
    """The Δ F1, better / worse and p cells of a row (dashes for the baseline)."""
    if "f1_vs_baseline" not in r:
        return "–", "–", "–"
    p = r["f1_vs_baseline"]
    pv = ("–" if p["wilcoxon_p"] is None or np.isnan(p["wilcoxon_p"]) else "< 0.001" if p["wilcoxon_p"] < 1e-3
          else f"{p['wilcoxon_p']:.3f}")
    return f"{p['mean']:+.4f} ± {p['se']:.4f}", f"{p['improved']} / {p['worse']}", pv


def markdown_row(r: dict) -> str:
    """One run's row of :func:`format_markdown` (a row of :func:`compare_runs`)."""
    ch = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in r["changed"].items()) or "(baseline)"
    f1, iou = r["f1"], r["iou"]
    delta, bw, pv = _paired_cells(r)
    ep = ", ".join(str(e) for e in r.get("best_epochs", [])) or "?"
    th = ", ".join(f"{t:.2f}" for t in r.get("thresholds", [])) or "?"
    ts = f"{r['train_time_s']:.0f}" if "train_time_s" in r else "?"
    fo = f"{r['folds_finished']}/{r['folds']}" if "folds" in r else "?"
    if r.get("n_left_out"):
        fo += f" ({r['n_left_out']} of {r['n_scored']} images left out)"
    hd = f"{r['hd95']['mean']:.2f}" if r.get("hd95") else "–"
    return (f"| `{Path(r['run']).name}` | {ch} | {fo} | {f1['mean']:.4f} ± {f1['std']:.4f} ({f1['min']:.3f}) | "
            f"{iou['mean']:.4f} | {hd} | {delta} | {bw} | {pv} | {ep} | {th} | {ts} |")
