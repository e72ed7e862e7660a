"""results.json and tables.md of ``lungsam reproduce``: the paper's Tables 1-9 with our numbers beside them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..artifacts import read_json, write_json_atomic, write_text_atomic
from ..data import dataset_of
from ..metrics import fmt_mean_std, summarize
from . import paper

SHORT = {"montgomery": "MC", "shenzhen": "SZ"}
GT_PROMPTS = ("box", "both")


def _f(x: float | None, d: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{d}f}"


def _ms(s: dict | None) -> str:
    """``mean ± std``; a single value (one fold) is printed without a meaningless ``± 0.000``."""
    if not s or s.get("n", 0) == 0:
        return "n/a"
    return f"{s['mean']:.3f}" if s["n"] == 1 else fmt_mean_std(s)


def _prompt_label(p: str) -> str:
    return f"{p} (GT box)" if p in GT_PROMPTS else p


# ---------------------------------------------------------------------------------------------
# collect: read the steps' artifacts into one JSON-friendly dict
# ---------------------------------------------------------------------------------------------

def _set_of(rec: dict, data: dict) -> str | None:
    for name, ds in data.items():
        if rec["out"].startswith(f"runs/{ds.tag}/"):
            return name
    return None


def collect(st, root: Path, data: dict, records: list[dict], zero: dict, grid: dict, best_hp: dict, kfold: dict,
            cross: dict, pooled: dict | None = None, unet_runs: dict | None = None) -> dict:
    rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731
    steps = [{"name": r["name"], "kind": r["kind"], "set": _set_of(r, data), "out": r["out"], "status": r["status"],
              "seconds": r["seconds"], "started": r["started"], "finished": r["finished"], "info": r.get("info", {})}
             for r in records]

    zs = {}
    for (name, mode), o in zero.items():
        m = read_json(o / "metrics.json")
        test_ids = set(data[name].splits[0]["test"])
        sub = [r for r in m["per_image"] if r["id"] in test_ids]
        zs.setdefault(name, {})[mode] = {
            "f1": m["f1"], "iou": m["iou"], "n": m["n"], "threshold": m["threshold"],
            "split0_test_f1": summarize([r["f1"] for r in sub]), "split0_test_iou": summarize([r["iou"] for r in sub]),
            "prompt_uses_ground_truth": m["prompt_uses_ground_truth"], "learned_prompt": m["learned_prompt"],
            "out": rel(o), "paper_f1": paper.get(paper.ZERO_SHOT, name, mode)}

    gr = {}
    for (name, lr, wd), o in grid.items():
        f = read_json(o / "metrics.json")["folds"][0]
        gr.setdefault(name, []).append({
            "lr": lr, "weight_decay": wd, "val_f1": f["val"]["f1"]["mean"], "test_f1": f["test"]["f1"],
            "threshold": f["threshold"], "best_epoch": f["best_epoch"], "epochs_run": f["epochs_run"],
            "fold_wall_s": f["fold_wall_s"], "out": rel(o),
            "chosen": (lr, wd) == tuple(best_hp[name])})

    # the protocol's order (sets, then prompts), whatever order the steps finished in (``--jobs``)
    kfold = {(n, p): kfold[(n, p)] for n in data for p in st.prompts if (n, p) in kfold}
    unet_runs = {n: unet_runs[n] for n in data if n in (unet_runs or {})}
    kf, sweeps = {}, {}
    for (name, prompt), o in kfold.items():
        m = read_json(o / "metrics.json")
        a = m["aggregate"]
        folds = m["folds"]
        kf.setdefault(name, {})[prompt] = {
            "test_f1_across_folds": a["test_f1_across_folds"], "test_iou_across_folds": a["test_iou_across_folds"],
            "test_f1_pooled": a["test_f1_pooled"], "thresholds": a["thresholds"],
            "best_epochs": [f["best_epoch"] for f in folds], "epochs_run": [f["epochs_run"] for f in folds],
            "val_f1": [f["val"]["f1"]["mean"] for f in folds], "n": folds[0]["n"],
            "lr": best_hp[name][0], "weight_decay": best_hp[name][1],
            "prompt_uses_ground_truth": a["prompt_uses_ground_truth"], "out": rel(o),
            "paper_f1": paper.get(paper.KFOLD, name, prompt)}
        ths = [r["threshold"] for r in folds[0]["threshold_sweep"]]
        sweeps.setdefault(name, {})[prompt] = [
            {"threshold": t, "val_f1": summarize([f["threshold_sweep"][i]["f1"] for f in folds]),
             "val_iou": summarize([f["threshold_sweep"][i]["iou"] for f in folds])} for i, t in enumerate(ths)]

    cr = {}
    for (a, b), o in cross.items():
        m = read_json(o / "metrics.json")
        secs = sum(s["seconds"] for s in steps if s["out"] == rel(o))
        cr[f"{a}->{b}"] = {"seconds": secs, "train": a, "test": b, "f1": m["f1"], "iou": m["iou"], "n": m["n"], "threshold": m["threshold"],
                           "model": m["model"],
                           "in_domain_test_f1": kf.get(b, {}).get("points", {}).get("test_f1_across_folds"),
                           "out": rel(o), "paper_f1": paper.CROSS.get((a, b), paper.NA)}

    unet = {}
    for name in data:
        if name not in kf:
            unet[name] = {"paper_unet_f1": paper.UNET[name], "ours_best_any": None, "ours_best_without_gt": None,
                          "paper_sam_points_f1": paper.get(paper.KFOLD, name, "points"), "ours_points": None,
                          "ours_unet": None}
            continue
        no_gt = {p: v for p, v in kf[name].items() if not v["prompt_uses_ground_truth"]}
        best_no_gt = max(no_gt, key=lambda p: no_gt[p]["test_f1_across_folds"]["mean"]) if no_gt else None
        best_any = max(kf[name], key=lambda p: kf[name][p]["test_f1_across_folds"]["mean"])
        unet[name] = {"paper_unet_f1": paper.UNET[name], "paper_sam_points_f1": paper.get(paper.KFOLD, name, "points"),
                      "ours_points": kf[name]["points"]["test_f1_across_folds"] if "points" in kf[name] else None,
                      "ours_best_without_gt": {"prompt": best_no_gt,
                                               "test_f1": no_gt[best_no_gt]["test_f1_across_folds"]} if best_no_gt else None,
                      "ours_best_any": {"prompt": best_any, "test_f1": kf[name][best_any]["test_f1_across_folds"]},
                      "ours_unet": None}
    for name, o in unet_runs.items():
        if (o / "metrics.json").exists():
            unet.setdefault(name, {"paper_unet_f1": paper.UNET[name], "ours_best_any": None, "ours_best_without_gt": None,
                                   "paper_sam_points_f1": paper.get(paper.KFOLD, name, "points"), "ours_points": None})
            unet[name]["ours_unet"] = unet_row(o, kfold.get((name, "points")), root)

    po = pooled_table(root, pooled or {}, kfold, steps)

    dsets = {name: {"source": str(ds.source), "used": str(ds.path), "n_source": ds.n_source, "n_used": len(ds.ids),
                    "subset": ds.tag != name, "skipped": ds.skipped, "folds": len(ds.splits),
                    "split0": {k: len(v) for k, v in ds.splits[0].items()},
                    "zero_shot_prompt_source": f"split 0 training part ({len(ds.splits[0]['train'])} masks)"}
             for name, ds in data.items()}
    res = {"backbone": st.backbone, "checkpoint": st.checkpoint, "profile": "quick" if st.quick else "full",
           "data": dsets, "steps": steps, "paper": paper.as_dict(),
           "tables": {"zero_shot": zs, "threshold_sweep": sweeps, "grid": gr,
                      "best_hyperparameters": {k: {"lr": v[0], "weight_decay": v[1]} for k, v in best_hp.items()},
                      "kfold": kf, "cross_dataset": cr, "unet": unet, "pooled": po}}
    res["estimate"] = estimate(res, st, root)
    res["paths"] = {"tables": str(root / "tables.md"), "results": str(root / "results.json"),
                    "figures": figures(res, root, kfold, zero, cross, sweeps)}
    return res


def _per_image(run_dir: Path) -> dict[str, tuple[int, float, float]]:
    """``{sample id: (fold, test F1, test IoU)}`` over the finished folds of a training run."""
    from ..runs import finished_fold_dirs

    out = {}
    for d in finished_fold_dirs(run_dir):
        m = read_json(d / "metrics.json")
        out.update({r["id"]: (m["fold"], r["f1"], r["iou"]) for r in m["per_image"]})
    return out


def unet_row(run_dir: Path, points_run: Path | None, root: Path) -> dict:
    """Table 9, ours: the U-Net run's k-fold test F1 and, on the same test images, the point-prompt SAM run
    against it (paired: Δ F1 = SAM − U-Net, mean ± standard error, images better / worse, Wilcoxon p)."""
    from ..train.compare import paired

    m = read_json(run_dir / "metrics.json")
    row = {"out": str(run_dir.relative_to(root)), "test_f1_across_folds": m["aggregate"]["test_f1_across_folds"],
           "test_f1_pooled": m["aggregate"]["test_f1_pooled"], "folds": len(m["folds"]),
           "parameters": read_json(run_dir / "run.json").get("parameters"), "points_vs_unet": None}
    if points_run is not None and (Path(points_run) / "metrics.json").exists():
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
    m = read_json(run_dir / "metrics.json")
    per_set = {}
    for name in sorted({dataset_of(i) for i in mine}):
        ids = sorted(i for i in mine if dataset_of(i) == name)
        folds = sorted({mine[i][0] for i in ids})
        row = {"n": len(ids), "f1_pooled": summarize([mine[i][1] for i in ids]),
               "iou_pooled": summarize([mine[i][2] for i in ids]),
               "f1_across_folds": summarize([float(np.mean([mine[i][1] for i in ids if mine[i][0] == f])) for f in folds]),
               "own_set_run": None}
        own_dir = kfold.get((name, "points"))
        if own_dir is not None:
            own = _per_image(Path(own_dir))
            if set(ids) <= set(own):
                d = np.array([mine[i][1] - own[i][1] for i in ids])
                row["own_set_run"] = {
                    "out": str(Path(own_dir).relative_to(root)), "f1_pooled": summarize([own[i][1] for i in ids]),
                    "delta_f1": float(d.mean()), "delta_f1_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                    "better": int((d > 0).sum()), "worse": int((d < 0).sum())}
        per_set[name] = row
    return {"out": rel, "lr": pooled["hp"][0], "weight_decay": pooled["hp"][1], "folds": len(m["folds"]),
            "thresholds": m["aggregate"]["thresholds"], "per_set": per_set,
            "seconds": sum(s["seconds"] for s in steps if s["out"] == rel)}


# ---------------------------------------------------------------------------------------------
# cost estimate from measured step times
# ---------------------------------------------------------------------------------------------

FULL_SET_SIZES = {"montgomery": 138, "shenzhen": 566}
WORKING_DAY_S = 8 * 3600
TYPICAL_EPOCHS = 45  # mean of the full protocol's Montgomery grid cells at lr 1e-4 and 1e-3 (30-57 epochs, patience 15)
SLOW_LR = 1e-5  # grid cells at this lr or below run to the epoch cap (the full protocol's Montgomery cells did: 100 of 100)


def _fold_costs(root: Path, runs) -> tuple[float | None, float | None]:
    """Median over the folds of ``runs`` of (epoch seconds per image of train + val, seconds outside the epochs).

    An epoch's seconds are its whole wall time (training, validation, weight files) where the fold recorded it
    (``epochs_wall_s``), else its training time. Medians, so one fold slowed by another job on a shared machine
    does not move the extrapolation."""
    rates, fixed = [], []
    for run in dict.fromkeys(runs):
        for f in read_json(root / run / "metrics.json")["folds"]:
            units = f["epochs_run"] * (f["n"]["train"] + f["n"]["val"])
            epochs_s = f.get("epochs_wall_s", f["train_time_s"])
            if units:
                rates.append(epochs_s / units)
                fixed.append(max(f["fold_wall_s"] - epochs_s, 0.0))
    if not rates:
        return None, None
    return float(np.median(rates)), float(np.median(fixed))


def _lr(x: float) -> str:
    """A learning rate as the paper writes it: 1e-5, not 1e-05."""
    return f"{x:g}".replace("e-0", "e-")


def _ran_at_once(step: dict) -> int:
    """How many training steps ran at once beside ``step`` (``--jobs``, recorded by the worker path; 1 in the
    main process)."""
    return step.get("info", {}).get("jobs", 1)


def _steps_at_once(steps: list[dict], kinds: tuple[str, ...]) -> int:
    """:func:`_ran_at_once` for the timed steps of ``kinds`` (their median)."""
    n = [_ran_at_once(s) for s in steps if s["kind"] in kinds]
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
        out["full_protocol_runs"] = {"per_set": n_grid + n_prompts * k, "epochs_max": ep, "epochs_typical": TYPICAL_EPOCHS,
                                     "fold_trainings": 2 * (n_grid + n_prompts * k), "pooled_fold_trainings": k,
                                     "slow_grid_cells_per_set": n_slow, "slow_lr": SLOW_LR}
    return out


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

def _best_fold_dir(run_dir: Path) -> Path:
    from ..runs import pick_fold

    return pick_fold(run_dir, None)


def figures(res: dict, root: Path, kfold: dict, zero: dict, cross: dict, sweeps: dict) -> list[str]:
    from ..train.report import _plt, save_figure

    fig_dir = root / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def copy(src: Path, name: str):
        if src.exists():
            shutil.copy2(src, fig_dir / name)
            written.append(f"figures/{name}")

    for (name, prompt), run_dir in kfold.items():
        if prompt != "points":
            continue
        fd = _best_fold_dir(run_dir)
        for fig in ("learning_curve", "threshold_curve", "overlays"):
            copy(fd / f"{fig}.png", f"{name}_points_{fd.name}_{fig}.png")
    for (name, mode), o in zero.items():
        if mode == "points":
            copy(o / "overlays.png", f"{name}_zeroshot_points_overlays.png")
    for (a, b), o in cross.items():
        copy(o / "overlays.png", f"cross_{a}_to_{b}_overlays.png")

    plt = _plt()
    for name, by_prompt in sweeps.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for prompt, rows in by_prompt.items():
            ax.errorbar([r["threshold"] for r in rows], [r["val_f1"]["mean"] for r in rows],
                        yerr=[r["val_f1"]["std"] for r in rows], marker="o", capsize=3, label=_prompt_label(prompt))
        ax.set_xlabel("probability threshold")
        ax.set_ylabel("validation F1 (mean over folds)")
        ax.set_title(f"{res['backbone']}: threshold sweep, {name}", fontsize=9)
        ax.legend(fontsize=7)
        save_figure(fig, fig_dir / f"{name}_threshold_sweep.png")
        written.append(f"figures/{name}_threshold_sweep.png")
    return written


# ---------------------------------------------------------------------------------------------
# tables.md
# ---------------------------------------------------------------------------------------------

def _machine(m: dict) -> str:
    s = f"{m.get('cpu') or 'CPU'}, {m.get('affinity_cpus')} of {m.get('cpu_count')} cores usable, {m.get('platform')}"
    if m.get("loadavg_at_end"):
        s += f", load average at end {m['loadavg_at_end'][0]:.1f} (shared machine)"
    return s


def _seconds(res: dict, kinds: tuple[str, ...], sets: tuple[str | None, ...]) -> float:
    """Recorded time of the steps of ``kinds`` on ``sets``, each step folder counted once."""
    seen = {}
    for s in res["steps"]:
        if s["kind"] in kinds and s["set"] in sets:
            seen[s["out"]] = s["seconds"]
    return sum(seen.values())


def _total_seconds(res: dict) -> float:
    return sum({s["out"]: s["seconds"] for s in res["steps"]}.values())


def _prov(res: dict, secs: float, what: str) -> str:
    overlapped = any(_ran_at_once(s) > 1 for s in res["steps"])  # --jobs: step times overlap
    return (f"_Command: `{res['command']}` · device {res['device']} · machine: {_machine(res['machine'])} · "
            f"date: {res['finished']} · time taken: {secs:.0f} s ({what}"
            + ("; summed over steps, some of which ran at once" if overlapped else "") + ")._")


PENDING = ("_Not run yet: the protocol stopped before these steps (rerun the same command; finished steps are "
           "reused)._")


def render(res: dict) -> str:
    """tables.md: the header, then one section per paper table (1-10), the figures, the steps and the cost."""
    L: list[str] = []
    for section in (render_header, render_zero_shot, render_threshold_sweeps, render_grid, render_cross_dataset,
                    render_kfold, render_unet, render_pooled, render_figures, render_steps, render_cost):
        L += section(res)
    return "\n".join(L) + "\n"


def render_header(res: dict) -> list[str]:
    """Title, PARTIAL banner, what the profile is, and the protocol as run."""
    st, bb = res["settings"], res["backbone"]
    quick = res["profile"] == "quick"
    enc = st.get("encoder_size")
    L = [f"# Reproducing {paper.CITATION} with `{bb}`" + (f" at encoder input {enc}" if enc else "")
         + (", training in bfloat16" if st.get("cpu_bf16") else ""), ""]
    if not res.get("complete", True):
        latest = max(res["steps"], key=lambda s: s["finished"])["name"] if res["steps"] else "-"
        L += [f"**PARTIAL**: written after the step \"{latest}\" finished; "
              "steps not finished yet (still to run, or running beside it with `--jobs`) are marked pending.", ""]
    L += [
        f"Profile: **{res['profile']}**{' (reduced protocol; NOT the paper protocol: see below)' if quick else ''}. "
        f"Backbone `{bb}` (weights sha256 `{res['weights_sha256'][:16]}…`); the paper used SAM ViT-B, so the paper's "
        "numbers are a reference, not the same model. F1 = Dice, mean ± population std. Images and masks are scored "
        f"at {st['size']}x{st['size']}"
        + (f"; every SAM step runs the image encoder at {enc}x{enc}, not the backbone's native input size" if enc else "")
        + ("; every training step (SAM decoders and U-Nets) ran in bfloat16 autocast on the CPU (`--cpu-bf16`), "
           "thresholds and test scores in float32" if st.get("cpu_bf16") else "")
        + ". All our numbers below were measured by this command; \"n/a\" marks a value "
        "the paper reports that we have not transcribed, or one we did not measure.",
        "",
        "Protocol as run:",
        "",
    ]
    for name, d in res["data"].items():
        scheme = ("one 60/20/20 split" if d["folds"] == 1
                  else f"{d['folds']}-fold cross-validation (60/20/20 per fold)")
        L.append(f"- {name}: {d['n_used']} of {d['n_source']} pairs"
                 + (" (a seeded random subset)" if d["subset"] else "")
                 + f"; {scheme}; split 0 train/val/test = "
                 f"{d['split0']['train']}/{d['split0']['val']}/{d['split0']['test']}.")
    L += _protocol_lines(st, _sweep_range(res))
    if quick:
        L += [f"- **--quick**: one split instead of 5 folds, {st['epochs']} epochs without early stopping, a "
              f"{len(st['grid'])}-cell grid, subsets as listed. Numbers are indicative only."]
    return L + [""]


def _sweep_range(res: dict) -> str:
    """``"LO-HI"`` of the validation threshold sweep the k-fold runs recorded (the runs' own setting)."""
    for sweeps in res["tables"]["threshold_sweep"].values():
        for rows in sweeps.values():
            ths = [r["threshold"] for r in rows]
            if ths:
                return f"{min(ths):.2f}-{max(ths):.2f}"
    return "the runs' sweep"


def _protocol_lines(st: dict, sweep: str) -> list[str]:
    """The protocol's steps as bullet lines (zero-shot, grid, k-fold, cross-dataset, U-Net, pooled)."""
    return [
        f"- Zero-shot (Tables 1-2): the untuned backbone; point prompts ({st['points_per_lung']} per lung) and the "
        "`auto-box` come from the mean mask of **split 0's training part** of the same set; box prompts are the "
        "ground-truth mask's bounding box; threshold 0.5 (logit 0). Scored on every image of the set and, "
        "leak-free, on split 0's test part.",
        f"- Grid: lr x weight decay on one 60/20/20 split per set, prompt `points`, {st['epochs']} epochs max "
        f"(patience {st['patience']}); cells {', '.join(f'({lr:g}, {wd:g})' for lr, wd in st['grid'])}. The cell with "
        "the best validation F1 is used for every k-fold run of that set.",
        f"- k-fold per prompt (Tables 3-4, 7-8): prompts {', '.join(st['prompts'])}; decoder only (encoders frozen), "
        f"Adam, DiceFocal loss, batch {st['batch_size']}, box jitter 5 %; the threshold is chosen on each fold's "
        f"validation split from {sweep}.",
        "- Cross-dataset (Tables 5-6): the point-prompt k-fold run of the training set, its fold with the best "
        "validation F1 (trained on that fold's 60 % training split, threshold from its validation split), "
        "scored on **every image** of the other set.",
        ("- U-Net (Table 9): MONAI's UNet trained from scratch on each set's folds (`lungsam train-unet`: same "
         "splits, DiceFocal loss, Adam lr 1e-3, early stopping and validation threshold as the SAM runs; grey image "
         "standardised per image; no augmentation), compared per image with the point-prompt SAM run."
         if st.get("unet", True) else "- U-Net (Table 9): not trained in this invocation; the paper's numbers only."),
        "- One model for both sets (Table 10, beyond the paper): the point-prompt recipe trained on Montgomery and "
        "Shenzhen pooled, lr and weight decay from the grid (best validation F1 averaged over the two sets); each set "
        "is split on its own, so the pooled model is tested on exactly the test images of each set's own run.",
    ]


def render_zero_shot(res: dict) -> list[str]:
    """Tables 1-2: zero-shot F1 per prompt, one table per set."""
    L: list[str] = []
    for i, name in enumerate(res["data"], start=1):
        z = res["tables"]["zero_shot"].get(name)
        L += [f"## Table {i}: zero-shot F1, {name} ({SHORT[name]})", ""]
        if not z:
            L += [PENDING, ""]
            continue
        L += [
              _prov(res, _seconds(res, ("encode", "zero-shot"), (name,)), "encoder pass + zero-shot evaluations"), "",
              "| prompt | paper F1 (ViT-B) | ours F1, all images | ours IoU | ours F1, split-0 test | n |",
              "|---|---|---|---|---|---|"]
        for mode, r in z.items():
            L.append(f"| {_prompt_label(mode)} | {r['paper_f1']} | {_ms(r['f1'])} | {_ms(r['iou'])} | "
                     f"{_ms(r['split0_test_f1'])} | {r['n']} |")
        L.append("")
    return L


def render_threshold_sweeps(res: dict) -> list[str]:
    """Tables 3-4: validation F1 by threshold per prompt, the best per prompt in bold."""
    L: list[str] = []
    for i, name in enumerate(res["data"], start=3):
        sw = res["tables"]["threshold_sweep"].get(name)
        if not sw:
            L += [f"## Table {i}: validation F1 by threshold, {name} ({SHORT[name]})", "", PENDING, ""]
            continue
        prompts = list(sw)
        ths = [r["threshold"] for r in sw[prompts[0]]]
        L += [f"## Table {i}: validation F1 by threshold, {name} ({SHORT[name]})", "",
              _prov(res, _seconds(res, ("k-fold",), (name,)), "the k-fold runs whose validation sweeps these are"), "",
              "Mean ± std over folds of the validation F1 of each fold's best checkpoint. Paper values: n/a "
              "(not transcribed). **Bold**: best per prompt.", "",
              "| threshold | paper | " + " | ".join(_prompt_label(p) for p in prompts) + " |",
              "|---|---|" + "---|" * len(prompts)]
        best = {p: max(r["val_f1"]["mean"] for r in sw[p]) for p in prompts}
        for j, th in enumerate(ths):
            cells = []
            for p in prompts:
                s = _ms(sw[p][j]["val_f1"])
                cells.append(f"**{s}**" if sw[p][j]["val_f1"]["mean"] == best[p] else s)
            L.append(f"| {th:.2f} | n/a | " + " | ".join(cells) + " |")
        L.append("")
    return L


def render_grid(res: dict) -> list[str]:
    """The lr x weight-decay grid (the paper reports only its best cell)."""
    sets = list(res["data"])
    L = ["## Hyper-parameter grid (lr x weight decay, prompt `points`, one split per set)", "",
         _prov(res, _seconds(res, ("grid",), tuple(sets)), "the grid's training runs"), "",
         f"Paper: best lr {paper.GRID_BEST['lr']:g}, weight decay {paper.GRID_BEST['weight_decay']:g} (cell values "
         "n/a). Ours: validation F1 at the run's chosen threshold; test F1 of the same split for reference.", "",
         "| set | lr | weight decay | val F1 | test F1 | threshold | best epoch / run | time (s) | chosen |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name in sets:
        for c in res["tables"]["grid"].get(name, []):
            L.append(f"| {SHORT[name]} | {c['lr']:g} | {c['weight_decay']:g} | {_f(c['val_f1'])} | "
                     f"{_ms(c['test_f1'])} | {c['threshold']:.2f} | {c['best_epoch']} / {c['epochs_run']} | "
                     f"{c['fold_wall_s']:.0f} | {'yes' if c['chosen'] else ''} |")
    return L + [""]


def render_cross_dataset(res: dict) -> list[str]:
    """Tables 5-6: the point-prompt model of one set scored on every image of the other."""
    L: list[str] = []
    for i, key in enumerate(("shenzhen->montgomery", "montgomery->shenzhen"), start=5):
        c = res["tables"]["cross_dataset"].get(key)
        if not c:
            a, b = key.split("->")
            L += [f"## Table {i}: cross-dataset, train {a} ({SHORT[a]}) → test {b} ({SHORT[b]})", "",
                  f"Paper F1 (ViT-B): {paper.CROSS[(a, b)]}.", "", PENDING, ""]
            continue
        L += [f"## Table {i}: cross-dataset, train {c['train']} ({SHORT[c['train']]}) → test {c['test']} "
              f"({SHORT[c['test']]})", "",
              _prov(res, c["seconds"], "this evaluation; training time is in Table "
                    f"{7 if c['train'] == 'montgomery' else 8}"), "",
              "| | paper F1 (ViT-B) | ours F1 | ours IoU | n | threshold | ours in-domain k-fold F1 on the test set |",
              "|---|---|---|---|---|---|---|",
              f"| points | {c['paper_f1']} | {_ms(c['f1'])} | {_ms(c['iou'])} | {c['n']} | {c['threshold']:.2f} | "
              f"{_ms(c['in_domain_test_f1'])} |", "", f"Model: {c['model']}.", ""]
    return L


def render_kfold(res: dict) -> list[str]:
    """Tables 7-8: k-fold (or one-split) test F1 per prompt, one table per set."""
    quick = res["profile"] == "quick"
    L: list[str] = []
    for i, name in enumerate(res["data"], start=7):
        k = res["tables"]["kfold"].get(name)
        if not k:
            L += [f"## Table {i}: test F1 per prompt, {name} ({SHORT[name]})", "",
                  f"Paper F1 (ViT-B), points: {paper.get(paper.KFOLD, name, 'points')}.", "", PENDING, ""]
            continue
        any_ = next(iter(k.values()))
        L += [f"## Table {i}: {'5-fold' if not quick else 'one-split'} test F1 per prompt, {name} ({SHORT[name]})", "",
              _prov(res, _seconds(res, ("k-fold",), (name,)), "the runs of this table"), "",
              f"lr {any_['lr']:g}, weight decay {any_['weight_decay']:g} (the grid's choice); "
              + ("F1 is the mean ± std of the fold means; " if len(any_["thresholds"]) > 1 else
                 "one split, so F1 is its test images' mean; ")
              + "pooled = mean ± std over all test images.", "",
              "| prompt | paper F1 (ViT-B) | ours F1 | ours IoU | pooled F1 (min) | thresholds | best epochs |",
              "|---|---|---|---|---|---|---|"]
        for p, r in k.items():
            L.append(f"| {_prompt_label(p)} | {r['paper_f1']} | {_ms(r['test_f1_across_folds'])} | "
                     f"{_ms(r['test_iou_across_folds'])} | {_ms(r['test_f1_pooled'])} "
                     f"({_f(r['test_f1_pooled']['min'])}) | {', '.join(f'{x:.2f}' for x in r['thresholds'])} | "
                     f"{', '.join(map(str, r['best_epochs']))} |")
        L.append("")
    return L


def render_unet(res: dict) -> list[str]:
    """Table 9: the paper's and our U-Net against the point-prompt SAM, with the paired per-image difference."""
    t, bb, sets = res["tables"], res["backbone"], list(res["data"])
    u = {n: t["unet"][n] for n in sets}
    L = ["## Table 9: comparison with U-Net", "",
         _prov(res, _total_seconds(res), "all steps of the protocol"), "",
         "| model | " + " | ".join(f"{n} ({SHORT[n]})" for n in sets) + " |", "|---|" + "---|" * len(sets),
         "| U-Net (paper) | " + " | ".join(u[n]["paper_unet_f1"] for n in sets) + " |",
         "| SAM ViT-B, points (paper) | " + " | ".join(u[n]["paper_sam_points_f1"] for n in sets) + " |",
         "| U-Net (ours, MONAI UNet from scratch, same folds) | " + " | ".join(
             _ms(u[n]["ours_unet"]["test_f1_across_folds"]) if u[n].get("ours_unet") else "not run yet"
             for n in sets) + " |",
         f"| {bb}, points (ours) | " + " | ".join(_ms(u[n]["ours_points"]) if u[n]["ours_points"]
                                                  else "not run yet" for n in sets) + " |"]
    row = [f"{_ms(u[n]['ours_best_without_gt']['test_f1'])} ({u[n]['ours_best_without_gt']['prompt']})"
           if u[n]["ours_best_without_gt"] else "not run yet" for n in sets]
    L.append(f"| {bb}, best prompt without ground truth (ours) | " + " | ".join(row) + " |")
    row = [f"{_ms(u[n]['ours_best_any']['test_f1'])} ({_prompt_label(u[n]['ours_best_any']['prompt'])})"
           if u[n]["ours_best_any"] else "not run yet" for n in sets]
    L += [f"| {bb}, best prompt incl. ground-truth box (ours) | " + " | ".join(row) + " |", ""]
    diffs = [_paired_line(n, u[n]["ours_unet"]["points_vs_unet"]) for n in sets
             if u[n].get("ours_unet") and u[n]["ours_unet"].get("points_vs_unet")]
    if diffs:
        L += [f"Paired per test image, {bb} points minus our U-Net (Δ F1 ± standard error): " + "; ".join(diffs) + ".",
              ""]
    return L


def _paired_line(name: str, d: dict) -> str:
    """One set's paired difference: ``name: +Δ ± SE (better / worse of n, Wilcoxon p)``."""
    pv = "< 0.001" if d["wilcoxon_p"] < 1e-3 else f"{d['wilcoxon_p']:.3f}"
    return (f"{name}: {d['mean']:+.4f} ± {d['se']:.4f} ({d['improved']} better / {d['worse']} worse of "
            f"{d['n']}, Wilcoxon p {pv})")


def render_figures(res: dict) -> list[str]:
    return ["## Figures", ""] + [f"- [{p}]({p})" for p in res["paths"]["figures"]] + [""]


def _step_result(s: dict) -> str:
    """A step's result cell: what it encoded, or the F1 it scored."""
    info = s["info"]
    if s["kind"] == "encode":
        return f"{info.get('computed', 0)} encoded, {info.get('cache_hits', 0)} from cache"
    if "f1" in info:
        return f"F1 {_ms(info['f1'])}"
    if "test_f1" in info:
        return f"test F1 {_ms(info['test_f1'])} ({info['folds']} fold(s))"
    return ""


def render_steps(res: dict) -> list[str]:
    """Every step with its status and recorded time."""
    L = ["## Steps and time taken", "",
         f"Started {res['started']}, finished {res['finished']}, wall time {res['wall_time_s']:.0f} s for this "
         "invocation (reused steps cost ~0 s now; their recorded time is from the run that made them).", "",
         "| step | status | time (s) | result |", "|---|---|---|---|"]
    L += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {_step_result(s)} |" for s in res["steps"]]
    return L


def render_cost(res: dict) -> list[str]:
    """The full protocol's cost, extrapolated from the measured rates, and whether it fits a working day."""
    e, st = res["estimate"], res["settings"]
    on_cuda = str(res.get("device", "cpu")).startswith("cuda")
    L = ["", "### Cost of the full protocol (extrapolated from the measurements above)", ""]
    enc = e.get("encode_s_per_image")
    L.append(f"- encoder: {_f(enc, 2)} s per image" + (" (all embeddings came from the cache in this invocation)"
                                                       if enc is None else ""))
    if e.get("train_s_per_image_epoch") is not None:
        L += _training_cost_lines(e, st, on_cuda)
    if not on_cuda:
        L.append("- GPU: not measured (no GPU on the machine that ran this).")
    return L + [""]


def _training_cost_lines(e: dict, st: dict, on_cuda: bool) -> list[str]:
    """Per-epoch rates, the upper bound and the typical figure, and the working-day verdict."""
    fixed = e.get("train_fixed_s_per_fold")
    L = [f"- decoder training + validation: {e['train_s_per_image_epoch'] * 1000:.1f} ms per image per epoch"
         + (f", plus {fixed:.0f} s per fold outside the epochs (model build, threshold sweep, test scoring)"
            if fixed is not None else "") + " (medians over the folds above)"]
    if e.get("unet_s_per_image_epoch") is not None:
        L.append(f"- U-Net: {e['unet_s_per_image_epoch'] * 1000:.1f} ms per image per epoch")
    fr = e["full_protocol_runs"]
    enc_full = e.get("full_protocol_encode_s")
    jobs = e.get("jobs", 1)
    L.append(f"- full protocol: {fr['fold_trainings']} fold trainings ({fr['per_set']} per set) and "
             f"{fr.get('pooled_fold_trainings', 0)} on both sets pooled"
             + (f", plus {2 * 5} U-Net fold trainings" if st.get("unet", True) else "") + ", each of at most "
             f"{fr['epochs_max']} epochs: at most {e['full_protocol_training_s_upper_bound'] / 3600:.1f} h of "
             "training on this machine"
             + (f" with {jobs} steps at a time (`--jobs {jobs}`, the rates measured that way; a phase also waits "
                "for its slowest step)" if jobs > 1 else "")
             + (f", plus {enc_full / 60:.0f} min of encoding (704 images)" if enc_full else "")
             + "; early stopping (patience 15) shortens it.")
    typical = e.get("full_protocol_training_s_typical")
    if typical is not None:
        slow = fr.get("slow_grid_cells_per_set")
        L.append(f"- typical: about {typical / 3600:.1f} h of training if runs stop after "
                 f"{fr.get('epochs_typical', TYPICAL_EPOCHS)} epochs, the mean at which early stopping (patience 15) "
                 "ended the full protocol's Montgomery grid cells at lr 1e-4 and 1e-3 (30-57 epochs)"
                 + (f", and the grid's {slow} cells per set at lr {_lr(fr['slow_lr'])} run all {fr['epochs_max']} "
                    "(they learn slowly: the full protocol's Montgomery cells did)" if slow else "")
                 + f". If the grid picks lr {_lr(paper.GRID_BEST['lr'])} (the paper's choice), that set's k-fold "
                 "runs may run longer too, toward the upper bound.")
    if (typical or e["full_protocol_training_s_upper_bound"]) + (enc_full or 0) > WORKING_DAY_S:
        L.append("- That is more than a working day (8 h) on this machine. "
                 + ("" if st.get("encoder_size") else
                    "The decoder's cost grows with the embedding grid: `--encoder-size` (e.g. 512 for `mobile_sam`, "
                    "a 32x32 grid instead of 64x64) makes training about 4x cheaper. ")
                 + ("" if st.get("cpu_bf16") or on_cuda else
                    "On a CPU with native bfloat16 (AVX512-BF16 or AMX), `--cpu-bf16` makes training about 1.5x "
                    "cheaper. ")
                 + "A smaller `--epochs` cuts it linearly; or run on a GPU.")
    elif typical is not None:
        L.append("- That fits in a working day (8 h) on this machine"
                 + (", encoding included" if enc_full else " (plus the encoder pass, not timed here: every embedding "
                    "came from the cache)")
                 + ", if runs stop as assumed in the typical figure"
                 + (f" and {jobs} steps at a time gain what the rates measured that way suggest" if jobs > 1 else "")
                 + ".")
    return L


def render_pooled(res: dict) -> list[str]:
    """Table 10 (ours only): the pooled MC+SZ model on each set's held-out test images."""
    po = res["tables"].get("pooled")
    L = ["## Table 10: one model for both sets (Montgomery + Shenzhen pooled), points", ""]
    if not po:
        return L + ["The paper trains one model per set; this table has no paper column.", "", PENDING, ""]
    k = po["folds"]
    L += [_prov(res, po["seconds"], "the pooled run"), "",
          f"lr {po['lr']:g}, weight decay {po['weight_decay']:g}; {k} fold(s); thresholds "
          f"{', '.join(f'{x:.2f}' for x in po['thresholds'])} (chosen on the pooled validation split). F1 pooled = "
          "mean ± std over the set's test images (each once); Δ = pooled model minus the set's own model on the same "
          "images (mean ± standard error), better / worse = images.", "",
          "| test set | test images | own-set model F1 (pooled) | pooled model F1 (pooled) | pooled model, "
          f"{'fold means' if k > 1 else 'split'} | Δ F1 | better / worse |",
          "|---|---|---|---|---|---|---|"]
    for name, r in po["per_set"].items():
        own = r["own_set_run"]
        delta, counts = "n/a", "n/a"
        if own:
            counts = f"{own['better']} / {own['worse']}"
            se = f" ± {own['delta_f1_se']:.4f}" if own["delta_f1_se"] is not None else ""
            delta = f"{own['delta_f1']:+.4f}{se}"
        L.append(f"| {name} ({SHORT.get(name, name)}) | {r['n']} | {_ms(own['f1_pooled']) if own else 'not run'} | "
                 f"{_ms(r['f1_pooled'])} (min {_f(r['f1_pooled']['min'])}) | {_ms(r['f1_across_folds'])} | {delta} | "
                 f"{counts} |")
    return L + [""]


def write(res: dict, root: Path) -> None:
    write_json_atomic(root / "results.json", res)
    write_text_atomic(root / "tables.md", render(res))
