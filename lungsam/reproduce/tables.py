"""tables.md of ``lungsam reproduce``, rendered from ``results.json`` alone: the paper's Tables 1-10 with our
numbers beside them, one function per table (``render_*``), then the figures, the steps and the cost.

What the tables read is collected by :mod:`lungsam.reproduce.collect`; the cost figures come from
:mod:`lungsam.reproduce.cost`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import write_json_atomic, write_text_atomic
from ..layout import ReproduceLayout
from ..metrics import fmt_mean_std
from . import paper
from .cost import TYPICAL_EPOCHS, WORKING_DAY_S, ran_at_once

SHORT = {"montgomery": "MC", "shenzhen": "SZ"}
GT_PROMPTS = ("box", "both")


def _f(x: float | None, d: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{d}f}"


def _ms(s: dict | None) -> str:
    """``mean ± std``; a single value (one fold) is printed without a meaningless ``± 0.000``."""
    if not s or s.get("n", 0) == 0:
        return "n/a"
    return f"{s['mean']:.3f}" if s["n"] == 1 else fmt_mean_std(s)


def _lr(x: float) -> str:
    """A learning rate as the paper writes it: 1e-5, not 1e-05."""
    return f"{x:g}".replace("e-0", "e-")



def prompt_label(p: str) -> str:
    return f"{p} (GT box)" if p in GT_PROMPTS else p


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
    overlapped = any(ran_at_once(s) > 1 for s in res["steps"])  # --jobs: step times overlap
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
        + (f"; every SAM step runs the image encoder at {enc}x{enc}, not the backbone's native input size"
           if enc else "")
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
            L.append(f"| {prompt_label(mode)} | {r['paper_f1']} | {_ms(r['f1'])} | {_ms(r['iou'])} | "
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
              "| threshold | paper | " + " | ".join(prompt_label(p) for p in prompts) + " |",
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
            L.append(f"| {prompt_label(p)} | {r['paper_f1']} | {_ms(r['test_f1_across_folds'])} | "
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
    row = [f"{_ms(u[n]['ours_best_any']['test_f1'])} ({prompt_label(u[n]['ours_best_any']['prompt'])})"
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
    """``results.json`` and the ``tables.md`` rendered from it, into the results root ``root``."""
    layout = ReproduceLayout(root)
    write_json_atomic(layout.results_json, res)
    write_text_atomic(layout.tables_md, render(res))
