"""Collecting ``lungsam reproduce``'s results: the step folders' artifacts read into ``results.json``'s body, one
function per paper table, and the figures the tables cite copied next to them.

The protocol (:mod:`lungsam.reproduce.protocol`) fills a :class:`Found` phase by phase with the folders of the
steps that finished; :func:`collect` reads them (a table whose steps have not finished yet is empty, and
:mod:`lungsam.reproduce.tables` renders it as pending). Every path in the result is relative to the results root.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts import read_json
from ..data import dataset_of
from ..layout import EvalLayout, FoldLayout, ReproduceLayout, RunLayout
from ..metrics import summarize
from . import paper
from .cost import estimate


@dataclass
class Found:
    """The step folders each table reads, filled as the protocol's phases finish.

    Attributes:
        zero: ``{(set, prompt): folder}`` of the zero-shot evaluations (Tables 1-2).
        grid: ``{(set, lr, weight decay): run folder}`` of the grid cells.
        best_hp: ``{set: (lr, weight decay)}``, the grid's choice per set.
        kfold: ``{(set, prompt): run folder}`` of the k-fold runs (Tables 3-4, 7-8).
        cross: ``{(train set, test set): folder}`` of the cross-dataset evaluations (Tables 5-6).
        pooled: ``{"hp": (lr, weight decay), "run": run folder}`` of the pooled model (Table 10).
        unet: ``{set: run folder}`` of the U-Net baseline (Table 9).
    """

    zero: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    best_hp: dict = field(default_factory=dict)
    kfold: dict = field(default_factory=dict)
    cross: dict = field(default_factory=dict)
    pooled: dict = field(default_factory=dict)
    unet: dict = field(default_factory=dict)


def collect(st, root: Path, data: dict, records: list[dict], found: Found) -> dict:
    """``results.json`` without the invocation's own record (command, machine, times): the data used, every
    step, the paper's numbers, the tables, the cost estimate and the figures' paths (``st``: the protocol's
    ``Settings``; ``data``: ``{set: DataSet}``; ``records``: the steps' records in the protocol's order)."""
    steps = _steps(records, data)
    # the protocol's order (sets, then prompts), whatever order the steps finished in (``--jobs``)
    kfold = {(n, p): found.kfold[(n, p)] for n in data for p in st.prompts if (n, p) in found.kfold}
    unet_runs = {n: found.unet[n] for n in data if n in found.unet}
    kf, sweeps = kfold_tables(root, kfold, found.best_hp)
    tables = {"zero_shot": zero_shot_table(root, data, found.zero), "threshold_sweep": sweeps,
              "grid": grid_table(root, found.grid, found.best_hp),
              "best_hyperparameters": {k: {"lr": v[0], "weight_decay": v[1]} for k, v in found.best_hp.items()},
              "kfold": kf, "cross_dataset": cross_table(root, found.cross, kf, steps),
              "unet": unet_table(root, data, kf, unet_runs, kfold),
              "pooled": pooled_table(root, found.pooled, kfold, steps)}
    res = {"backbone": st.backbone, "checkpoint": st.checkpoint, "profile": "quick" if st.quick else "full",
           "data": data_record(data), "steps": steps, "paper": paper.as_dict(), "tables": tables}
    res["estimate"] = estimate(res, st, root)
    layout = ReproduceLayout(root)
    res["paths"] = {"tables": str(layout.tables_md), "results": str(layout.results_json),
                    "figures": figures(res, root, kfold, found.zero, found.cross, sweeps)}
    return res


def _rel(root: Path, p) -> str:
    return str(Path(p).relative_to(root))


def _set_of(rec: dict, data: dict) -> str | None:
    for name, ds in data.items():
        if rec["out"].startswith(f"runs/{ds.tag}/"):
            return name
    return None


def _steps(records: list[dict], data: dict) -> list[dict]:
    """Every step's record as results.json lists it (with the data set its folder belongs to)."""
    return [{"name": r["name"], "kind": r["kind"], "set": _set_of(r, data), "out": r["out"], "status": r["status"],
             "seconds": r["seconds"], "started": r["started"], "finished": r["finished"], "info": r.get("info", {})}
            for r in records]


def data_record(data: dict) -> dict:
    """Per set: where its images came from, how many were used, skipped and split."""
    return {name: {"source": str(ds.source), "used": str(ds.path), "n_source": ds.n_source, "n_used": len(ds.ids),
                   "subset": ds.tag != name, "skipped": ds.skipped, "folds": len(ds.splits),
                   "split0": {k: len(v) for k, v in ds.splits[0].items()},
                   "zero_shot_prompt_source": f"split 0 training part ({len(ds.splits[0]['train'])} masks)"}
            for name, ds in data.items()}


def zero_shot_table(root: Path, data: dict, zero: dict) -> dict:
    """Tables 1-2: ``{set: {prompt: row}}``, scored on every image and on split 0's test part."""
    zs: dict = {}
    for (name, mode), o in zero.items():
        m = read_json(EvalLayout(o).metrics_json)
        test_ids = set(data[name].splits[0]["test"])
        sub = [r for r in m["per_image"] if r["id"] in test_ids]
        zs.setdefault(name, {})[mode] = {
            "f1": m["f1"], "iou": m["iou"], "n": m["n"], "threshold": m["threshold"],
            "split0_test_f1": summarize([r["f1"] for r in sub]), "split0_test_iou": summarize([r["iou"] for r in sub]),
            "prompt_uses_ground_truth": m["prompt_uses_ground_truth"], "learned_prompt": m["learned_prompt"],
            "out": _rel(root, o), "paper_f1": paper.get(paper.ZERO_SHOT, name, mode)}
    return zs


def grid_table(root: Path, grid: dict, best_hp: dict) -> dict:
    """The lr x weight-decay grid: ``{set: [cell]}`` with each cell's validation and test F1."""
    gr: dict = {}
    for (name, lr, wd), o in grid.items():
        f = read_json(RunLayout(o).metrics_json)["folds"][0]
        gr.setdefault(name, []).append({
            "lr": lr, "weight_decay": wd, "val_f1": f["val"]["f1"]["mean"], "test_f1": f["test"]["f1"],
            "threshold": f["threshold"], "best_epoch": f["best_epoch"], "epochs_run": f["epochs_run"],
            "fold_wall_s": f["fold_wall_s"], "out": _rel(root, o),
            "chosen": (lr, wd) == tuple(best_hp[name])})
    return gr


def kfold_tables(root: Path, kfold: dict, best_hp: dict) -> tuple[dict, dict]:
    """Tables 7-8 and 3-4: ``({set: {prompt: k-fold row}}, {set: {prompt: validation sweep rows}})``."""
    kf: dict = {}
    sweeps: dict = {}
    for (name, prompt), o in kfold.items():
        m = read_json(RunLayout(o).metrics_json)
        kf.setdefault(name, {})[prompt] = _kfold_row(root, o, m, best_hp[name], paper.get(paper.KFOLD, name, prompt))
        sweeps.setdefault(name, {})[prompt] = _threshold_sweep(m["folds"])
    return kf, sweeps


def _kfold_row(root: Path, run_dir: Path, m: dict, hp: tuple[float, float], paper_f1: str) -> dict:
    a, folds = m["aggregate"], m["folds"]
    return {
        "test_f1_across_folds": a["test_f1_across_folds"], "test_iou_across_folds": a["test_iou_across_folds"],
        "test_f1_pooled": a["test_f1_pooled"], "thresholds": a["thresholds"],
        "best_epochs": [f["best_epoch"] for f in folds], "epochs_run": [f["epochs_run"] for f in folds],
        "val_f1": [f["val"]["f1"]["mean"] for f in folds], "n": folds[0]["n"],
        "lr": hp[0], "weight_decay": hp[1],
        "prompt_uses_ground_truth": a["prompt_uses_ground_truth"], "out": _rel(root, run_dir),
        "paper_f1": paper_f1}


def _threshold_sweep(folds: list[dict]) -> list[dict]:
    """Validation F1 and IoU per threshold, summarised over the folds."""
    ths = [r["threshold"] for r in folds[0]["threshold_sweep"]]
    return [{"threshold": t, "val_f1": summarize([f["threshold_sweep"][i]["f1"] for f in folds]),
             "val_iou": summarize([f["threshold_sweep"][i]["iou"] for f in folds])} for i, t in enumerate(ths)]


def cross_table(root: Path, cross: dict, kf: dict, steps: list[dict]) -> dict:
    """Tables 5-6: ``{"A->B": row}``, A's point-prompt model on every image of B, beside B's in-domain F1."""
    cr = {}
    for (a, b), o in cross.items():
        m = read_json(EvalLayout(o).metrics_json)
        secs = sum(s["seconds"] for s in steps if s["out"] == _rel(root, o))
        cr[f"{a}->{b}"] = {"seconds": secs, "train": a, "test": b, "f1": m["f1"], "iou": m["iou"], "n": m["n"],
                           "threshold": m["threshold"], "model": m["model"],
                           "in_domain_test_f1": kf.get(b, {}).get("points", {}).get("test_f1_across_folds"),
                           "out": _rel(root, o), "paper_f1": paper.CROSS.get((a, b), paper.NA)}
    return cr


def unet_table(root: Path, data: dict, kf: dict, unet_runs: dict, kfold: dict) -> dict:
    """Table 9: per set, the paper's U-Net and SAM, our point-prompt and best prompts, and our U-Net run."""
    unet = {name: _unet_sam_entry(name, kf.get(name)) for name in data}
    for name, o in unet_runs.items():
        if RunLayout(o).metrics_json.exists():
            unet[name]["ours_unet"] = unet_row(o, kfold.get((name, "points")), root)
    return unet


def _unet_sam_entry(name: str, by_prompt: dict | None) -> dict:
    """Table 9's SAM side for one set (``by_prompt``: its k-fold rows, ``None`` before they ran)."""
    if not by_prompt:
        return {"paper_unet_f1": paper.UNET[name], "ours_best_any": None, "ours_best_without_gt": None,
                "paper_sam_points_f1": paper.get(paper.KFOLD, name, "points"), "ours_points": None,
                "ours_unet": None}
    best = lambda rows: max(rows, key=lambda p: rows[p]["test_f1_across_folds"]["mean"])  # noqa: E731
    no_gt = {p: v for p, v in by_prompt.items() if not v["prompt_uses_ground_truth"]}
    best_no_gt = best(no_gt) if no_gt else None
    best_any = best(by_prompt)
    return {"paper_unet_f1": paper.UNET[name], "paper_sam_points_f1": paper.get(paper.KFOLD, name, "points"),
            "ours_points": by_prompt["points"]["test_f1_across_folds"] if "points" in by_prompt else None,
            "ours_best_without_gt": {"prompt": best_no_gt, "test_f1": no_gt[best_no_gt]["test_f1_across_folds"]}
            if best_no_gt else None,
            "ours_best_any": {"prompt": best_any, "test_f1": by_prompt[best_any]["test_f1_across_folds"]},
            "ours_unet": None}


def _per_image(run_dir: Path) -> dict[str, tuple[int, float, float]]:
    """``{sample id: (fold, test F1, test IoU)}`` over the finished folds of a training run."""
    from ..runs import finished_fold_dirs

    out = {}
    for d in finished_fold_dirs(run_dir):
        m = read_json(FoldLayout(d).metrics_json)
        out.update({r["id"]: (m["fold"], r["f1"], r["iou"]) for r in m["per_image"]})
    return out


def unet_row(run_dir: Path, points_run: Path | None, root: Path) -> dict:
    """Table 9, ours: the U-Net run's k-fold test F1 and, on the same test images, the point-prompt SAM run
    against it (paired: Δ F1 = SAM − U-Net, mean ± standard error, images better / worse, Wilcoxon p)."""
    from ..train.compare import paired

    layout = RunLayout(run_dir)
    m = read_json(layout.metrics_json)
    row = {"out": str(run_dir.relative_to(root)), "test_f1_across_folds": m["aggregate"]["test_f1_across_folds"],
           "test_f1_pooled": m["aggregate"]["test_f1_pooled"], "folds": len(m["folds"]),
           "parameters": read_json(layout.run_json).get("parameters"), "points_vs_unet": None}
    if points_run is not None and RunLayout(points_run).metrics_json.exists():
        u, p = _per_image(run_dir), _per_image(Path(points_run))
        ids = sorted(set(u) & set(p))
        if ids:
            row["points_vs_unet"] = paired([u[i][1] for i in ids], [p[i][1] for i in ids])
    return row


def pooled_table(root: Path, pooled: dict, kfold: dict, steps: list[dict]) -> dict | None:
    """Table 10: the pooled (MC+SZ) point-prompt model per set, beside each set's own k-fold point-prompt run on
    the same test images (paired: Δ F1 mean ± standard error, images better / worse)."""
    if not pooled.get("run"):
        return None
    run_dir = Path(pooled["run"])
    rel = str(run_dir.relative_to(root))
    mine = _per_image(run_dir)
    m = read_json(RunLayout(run_dir).metrics_json)
    per_set = {}
    for name in sorted({dataset_of(i) for i in mine}):
        ids = sorted(i for i in mine if dataset_of(i) == name)
        per_set[name] = _pooled_row(root, mine, ids, kfold.get((name, "points")))
    return {"out": rel, "lr": pooled["hp"][0], "weight_decay": pooled["hp"][1], "folds": len(m["folds"]),
            "thresholds": m["aggregate"]["thresholds"], "per_set": per_set,
            "seconds": sum(s["seconds"] for s in steps if s["out"] == rel)}


def _pooled_row(root: Path, mine: dict, ids: list[str], own_dir: Path | None) -> dict:
    """Table 10's row of one set: the pooled model on its test images ``ids`` and, paired, its own run."""
    folds = sorted({mine[i][0] for i in ids})
    row = {"n": len(ids), "f1_pooled": summarize([mine[i][1] for i in ids]),
           "iou_pooled": summarize([mine[i][2] for i in ids]),
           "f1_across_folds": summarize([float(np.mean([mine[i][1] for i in ids if mine[i][0] == f]))
                                         for f in folds]),
           "own_set_run": None}
    if own_dir is not None:
        own = _per_image(Path(own_dir))
        if set(ids) <= set(own):
            d = np.array([mine[i][1] - own[i][1] for i in ids])
            row["own_set_run"] = {
                "out": str(Path(own_dir).relative_to(root)), "f1_pooled": summarize([own[i][1] for i in ids]),
                "delta_f1": float(d.mean()),
                "delta_f1_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                "better": int((d > 0).sum()), "worse": int((d < 0).sum())}
    return row


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

FOLD_FIGURES = ("learning_curve_png", "threshold_curve_png", "overlays_png")  # FoldLayout properties


def _best_fold_dir(run_dir: Path) -> Path:
    from ..runs import pick_fold

    return pick_fold(run_dir, None)


def figures(res: dict, root: Path, kfold: dict, zero: dict, cross: dict, sweeps: dict) -> list[str]:
    """Copy the figures the tables cite into ``figures/`` and plot each set's threshold sweep; returns their
    paths relative to ``root``."""
    fig_dir = ReproduceLayout(root).figures_dir
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def copy(src: Path, name: str) -> None:
        if src.exists():
            shutil.copy2(src, fig_dir / name)
            written.append(_rel(root, fig_dir / name))

    for (name, prompt), run_dir in kfold.items():
        if prompt != "points":
            continue
        fd = _best_fold_dir(run_dir)
        for fig in FOLD_FIGURES:
            src = getattr(FoldLayout(fd), fig)
            copy(src, f"{name}_points_{fd.name}_{src.name}")
    for (name, mode), o in zero.items():
        if mode == "points":
            copy(EvalLayout(o).overlays_png, f"{name}_zeroshot_points_overlays.png")
    for (a, b), o in cross.items():
        copy(EvalLayout(o).overlays_png, f"cross_{a}_to_{b}_overlays.png")
    for name, by_prompt in sweeps.items():
        path = fig_dir / f"{name}_threshold_sweep.png"
        _plot_threshold_sweep(res["backbone"], name, by_prompt, path)
        written.append(_rel(root, path))
    return written


def _plot_threshold_sweep(backbone: str, name: str, by_prompt: dict, path: Path) -> None:
    """Validation F1 (mean ± std over folds) by threshold, one line per prompt."""
    from ..train.report import _plt, save_figure
    from .tables import prompt_label

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for prompt, rows in by_prompt.items():
        ax.errorbar([r["threshold"] for r in rows], [r["val_f1"]["mean"] for r in rows],
                    yerr=[r["val_f1"]["std"] for r in rows], marker="o", capsize=3, label=prompt_label(prompt))
    ax.set_xlabel("probability threshold")
    ax.set_ylabel("validation F1 (mean over folds)")
    ax.set_title(f"{backbone}: threshold sweep, {name}", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
