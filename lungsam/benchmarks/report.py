"""``results.md`` (one pasteable table), ``latency.png`` and ``--compare`` for ``lungsam bench``. Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .machine import describe_machine
from .stats import STAGES, ratio


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def _ms(x: Any) -> str:
    if x is None:
        return "–"
    x = float(x)
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def label(r: dict) -> str:
    return f"{r['backend']} {r['precision']}" + (f" ({r['mode']})" if r.get("mode") else "")


def best_throughput(r: dict) -> dict | None:
    tp = r.get("throughput") or []
    return max(tp, key=lambda t: t["images_per_s"]) if tp else None


def markdown_table(results: dict) -> str:
    """The results table (one row per backend x precision; skipped ones say why)."""
    ref = "torch fp32 eager"
    head = ("| backend | precision | device | F1 mean ± std (min) | IoU mean ± std (min) | vs ref mask F1 mean / min "
            "| max abs logit diff | changed masks | pre / enc / dec / post p50 ms | end-to-end p50 / p95 / p99 ms "
            f"| e2e p50 vs {ref} | images/s (batch) | images/s w/o host preprocess (batch) | peak RSS MB "
            "| GPU peak MB |")
    sep = "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"
    rows = [head, sep]
    for r in results["results"]:
        mode = f" ({r['mode']})" if r.get("mode") else ""
        if r["status"] != "ok":
            rows.append(f"| {r['backend']}{mode} | {r['precision']} | {r['device']} | **{r['status']}**: {r['reason']} "
                        + "| " * (head.count("|") - 5) + "|")
            continue
        acc, par, lat = r["accuracy"], r.get("parity"), r["latency_ms"]
        f1 = f"{_f(acc['f1']['mean'])} ± {_f(acc['f1']['std'])} ({_f(acc['f1']['min'])})"
        iou = f"{_f(acc['iou']['mean'])} ± {_f(acc['iou']['std'])} ({_f(acc['iou']['min'])})"
        if (acc.get("hd95") or {}).get("mean") is not None:  # results written before HD95 was kept have none
            iou += f"; HD95 {acc['hd95']['mean']:.2f} px"
        if par:
            pf1 = f"{_f(par['mask_f1']['mean'], 4)} / {_f(par['mask_f1']['min'], 4)}"
            dl = f"{par['max_abs_logit_diff']:.2e}"
            ch = f"{par['changed_masks']} / {par['n']}"
        else:
            pf1 = dl = ch = "–"
        stages = " / ".join(_ms(lat[s]["p50"]) for s in STAGES)
        e2e = " / ".join(_ms(lat["end_to_end"][k]) for k in ("p50", "p95", "p99"))
        vs = (r.get("vs_reference") or {}).get("end_to_end_p50")
        vs_s = "reference" if (r["backend"], r["precision"], r.get("mode")) == ("torch", "fp32", "eager") else (
            f"{vs:.2f}x" if vs is not None else "–")
        tp = ", ".join(f"{t['images_per_s']:.1f} ({t['batch']})" for t in r.get("throughput", []))
        tpm = ", ".join(f"{t['images_per_s_without_preprocess']:.1f} ({t['batch']})" for t in r.get("throughput", [])
                        if t.get("images_per_s_without_preprocess") is not None) or "–"
        mem = r.get("memory") or {}
        rows.append(f"| {r['backend']}{mode} | {r['precision']} | {r['device']} | {f1} | {iou} | {pf1} | {dl} | {ch} "
                    f"| {stages} | {e2e} | {vs_s} | {tp} | {tpm} | {_f(mem.get('peak_rss_mb'), 0)} "
                    f"| {_f(mem.get('gpu_peak_mb'), 0)} |")
    return "\n".join(rows)


def markdown_report(results: dict, compare_lines: list[str] | None = None) -> str:
    b, d, s = results["bundle"], results["data"], results["settings"]
    v = results["versions"]
    packages = ("lungsam", "python", "torch", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt")
    vers = ", ".join(f"{k} {v[k]}" for k in packages if k in v)
    lines = [
        f"## lungsam bench: {b['backbone']} ({Path(b['path']).name})",
        "",
        f"- machine: {describe_machine(results['machine'])}",
        f"- versions: {vers}",
        f"- data: {d['source']}, {d['n_images']} images at the working resolution "
        f"{b['working_size']}x{b['working_size']} (encoder input {b['img_size']}), prompt `{b['prompt']}`"
        + (f" (box: {b['box_source']})" if b.get("box_source") else "") + f", threshold {b['threshold']:.2f}",
        f"- settings: device {s['device']}, batches {s['batches']}, warm-up {s['warmup']}, repeats {s['repeats']}, "
        f"threads {s['threads'] if s['threads'] else 'default'}, batch preprocessing in "
        f"{s.get('preprocess_threads', 1)} host threads",
        "- latency: per image at batch 1 after warm-up (device synchronised); images/s over timed batched passes; "
        "accuracy at the working resolution against ground truth; parity against torch fp32 (eager) on the same images",
        "",
        markdown_table(results),
        "",
    ]
    notes = [f"- {label(r)}: {n}" for r in results["results"] for n in r.get("notes", [])]
    if notes:
        lines += ["notes:", *notes, ""]
    if compare_lines:
        lines += ["### compared with an earlier result", "", *compare_lines, ""]
    return "\n".join(lines)


def latency_chart(results: dict, path: str | Path) -> Path | None:
    """Stacked per-stage p50 bars (with end-to-end p95 ticks) and throughput vs batch; ``None`` when
    no backend produced numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["results"] if r["status"] == "ok"]
    if not ok:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.6 * len(ok) + 2.5), gridspec_kw={"width_ratios": [3, 2]})
    names = [label(r) for r in ok]
    left = [0.0] * len(ok)
    colors = {"preprocess": "#9ecae1", "encoder": "#3182bd", "decoder": "#fd8d3c", "postprocess": "#74c476"}
    for stage in STAGES:
        vals = [r["latency_ms"][stage]["p50"] for r in ok]
        ax1.barh(names, vals, left=left, color=colors[stage], label=stage)
        left = [a + b for a, b in zip(left, vals)]
    e2e95 = [r["latency_ms"]["end_to_end"]["p95"] for r in ok]
    ax1.scatter(e2e95, names, marker="|", s=200, color="k", label="end-to-end p95", zorder=3)
    ax1.set_xlabel("ms per image (batch 1, p50 per stage)")
    ax1.invert_yaxis()
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(axis="x", alpha=0.3)
    for r in ok:
        tp = r.get("throughput") or []
        if tp:
            ax2.plot([t["batch"] for t in tp], [t["images_per_s"] for t in tp], marker="o", label=label(r))
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("images / s")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    b = results["bundle"]
    fig.suptitle(f"lungsam bench: {b['backbone']} on {describe_machine(results['machine'])}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _key(r: dict) -> tuple:
    return (r["backend"], r["precision"], r["device"], r.get("mode"))


def compare(new: dict, old: dict) -> tuple[list[str], list[dict]]:
    """Ratios new/old for results present (ok) in both: end-to-end p50, images/s at common batch sizes,
    and the change of mean F1. Returns markdown lines and the same as records."""
    olds = {_key(r): r for r in old.get("results", []) if r.get("status") == "ok"}
    lines = ["| backend | precision | device | e2e p50 ms new / old (ratio) | images/s new / old (ratio) at batch "
             "| F1 mean new − old |", "|---|---|---|---|---|---|"]
    records = []
    for r in new["results"]:
        o = olds.get(_key(r))
        if r["status"] != "ok" or o is None:
            continue
        n50, o50 = r["latency_ms"]["end_to_end"]["p50"], o["latency_ms"]["end_to_end"]["p50"]
        otp = {t["batch"]: t["images_per_s"] for t in o.get("throughput", [])}
        tps = [(t["batch"], t["images_per_s"], otp[t["batch"]]) for t in r.get("throughput", []) if t["batch"] in otp]
        df1 = r["accuracy"]["f1"]["mean"] - o["accuracy"]["f1"]["mean"]
        rec = {"backend": r["backend"], "precision": r["precision"], "device": r["device"], "mode": r.get("mode"),
               "end_to_end_p50_ratio": ratio(n50, o50),
               "throughput_ratio": {str(b): ratio(n, o_) for b, n, o_ in tps}, "f1_mean_delta": df1}
        records.append(rec)
        e2e_ratio = rec["end_to_end_p50_ratio"]
        tp_s = ", ".join(f"{n:.1f} / {o_:.1f} ({ratio(n, o_):.2f}x) at {b}" for b, n, o_ in tps) or "–"
        lines.append(f"| {r['backend']} | {r['precision']} | {r['device']} | {_ms(n50)} / {_ms(o50)} "
                     f"({e2e_ratio:.2f}x) | {tp_s} | {df1:+.4f} |")
    if not records:
        lines.append("| (no backend/precision in common) | | | | | |")
    return lines, records


# --- The CPU table over several bundles (issue 19): one row per backbone x size x backend x precision ---------------

CPU_TABLE_HEAD = ("| backbone | encoder size | backend | precision | F1 mean (min) "
                  "| agreement with torch FP32 mean (min) | pre / enc / dec / post p50 ms | end-to-end p50 / p95 ms "
                  "| vs torch FP32 (same run) | RSS growth MB | Pareto |")


def cpu_rows(results_list: list[dict]) -> list[dict]:
    """The ok rows of several ``lungsam bench`` results (one per bundle) as flat records: ``{backbone, img_size,
    backend, precision, mode, f1, f1_min, agreement, agreement_min, stages_p50 (ms, STAGES order), e2e_p50, e2e_p95
    (ms), vs_torch (end-to-end p50 ratio to torch FP32 eager in the same run, None for the reference), rss_growth_mb,
    bundle}``. Skipped rows are left out (their reasons stay in each run's own results.md)."""
    rows = []
    for res in results_list:
        b = res["bundle"]
        for r in res["results"]:
            if r["status"] != "ok":
                continue
            lat, par, mem = r["latency_ms"], r.get("parity") or {}, r.get("memory") or {}
            reference = (r["backend"], r["precision"], r.get("mode")) == ("torch", "fp32", "eager")
            rows.append({"backbone": b["backbone"], "img_size": b["img_size"], "backend": r["backend"],
                         "precision": precision_label(r["precision"], b.get("int8_method")),
                         "mode": r.get("mode"), "bundle": b["path"],
                         "f1": r["accuracy"]["f1"]["mean"], "f1_min": r["accuracy"]["f1"]["min"],
                         "agreement": (par.get("mask_f1") or {}).get("mean"),
                         "agreement_min": (par.get("mask_f1") or {}).get("min"),
                         "stages_p50": [lat[s]["p50"] for s in STAGES],
                         "e2e_p50": lat["end_to_end"]["p50"], "e2e_p95": lat["end_to_end"]["p95"],
                         "vs_torch": None if reference else (r.get("vs_reference") or {}).get("end_to_end_p50"),
                         "rss_growth_mb": mem.get("rss_growth_mb")})
    return rows


def precision_label(precision: str, int8_method: str | None) -> str:
    """``"int8 (static)"`` / ``"int8 (dynamic)"`` where the bundle says how its INT8 encoder was made (bench
    results before that field: plain ``"int8"``); other precisions as they are."""
    return f"{precision} ({int8_method})" if precision == "int8" and int8_method else precision


def pareto_front(rows: list[dict], quality: str = "f1", cost: str = "e2e_p50") -> list[bool]:
    """For each row, whether it is on the Pareto front of higher ``quality`` and lower ``cost``: no other row is at
    least as good on both and strictly better on one."""
    def dominated(a: dict) -> bool:
        return any(o[quality] >= a[quality] and o[cost] <= a[cost] and (o[quality] > a[quality] or o[cost] < a[cost])
                   for o in rows if o is not a)
    return [not dominated(a) for a in rows]


def _cpu_row(a: dict, on_front: bool) -> str:
    agree = "–" if a["agreement"] is None else f"{a['agreement']:.4f} ({a['agreement_min']:.4f})"
    vs = "reference" if a["vs_torch"] is None and a["backend"] == "torch" else _f(a["vs_torch"], 2) + "x"
    mode = f" ({a['mode']})" if a.get("mode") and a["backend"] != "torch" else ""
    return (f"| {a['backbone']} | {a['img_size']} | {a['backend']}{mode} | {a['precision']} | {a['f1']:.4f} "
            f"({a['f1_min']:.3f}) | {agree} | {' / '.join(_ms(s) for s in a['stages_p50'])} "
            f"| {_ms(a['e2e_p50'])} / {_ms(a['e2e_p95'])} | {vs} | {_f(a['rss_growth_mb'], 0)} "
            f"| {'**yes**' if on_front else ''} |")


def cpu_table(results_list: list[dict]) -> str:
    """Markdown: the machine line(s) and one row per backbone x size x backend x precision over several bench
    results, the Pareto front (F1 vs end-to-end p50) across all of them marked. Rows from different runs are
    timed under different loads: compare absolute times across bundles only with that in mind (each row's
    ``vs torch FP32`` is measured side by side in its own run)."""
    from ..cpufeatures import isa_summary

    rows = cpu_rows(results_list)
    machines = []
    for res in results_list:
        feats = (res.get("machine") or {}).get("cpu_features")
        line = isa_summary(feats) if feats else describe_machine(res.get("machine") or {})
        if line not in machines:
            machines.append(line)
    lines = [f"Machine: {m}" for m in machines] + ["", CPU_TABLE_HEAD,
                                                    "|" + "|".join(["---"] * (CPU_TABLE_HEAD.count("|") - 1)) + "|"]
    lines += [_cpu_row(a, p) for a, p in zip(rows, pareto_front(rows))]
    return "\n".join(lines)
