"""Pair two ``lungsam eval`` results image by image (cross-dataset: every image of the other set).

``lungsam compare`` pairs training runs on their test splits; a cross-dataset score is an eval of a run on
another data set, so this pairs two eval ``metrics.json`` (baseline first) on their common image ids:
mean / min F1 of each, the paired mean difference with a bootstrap 95 % CI (10 000 resamples, seeded),
images better / worse, the two-sided sign test (scipy ``binomtest``) and Wilcoxon signed-rank p, the same
summaries per label (normal / tuberculosis, ``pairs.csv``'s ``tb_label_from_filename``), the mean HD95 of each
(px, the eval's working frame), and the tuberculosis images with the lowest F1 of each model.

Usage::

    python results/generalisation/pair_evals.py BASE/metrics.json OPTION/metrics.json \
        --pairs ../shared/data/shenzhen/pairs.csv --out results/generalisation/mc_to_sz_acq_opa
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from lungsam.artifacts import read_json, write_json_atomic, write_text_atomic


def f1_by_id(metrics_path: Path) -> dict[str, float]:
    """``{image id: F1}`` of one eval's ``metrics.json`` (its ``per_image`` list)."""
    return {r["id"]: float(r["f1"]) for r in read_json(metrics_path)["per_image"]}


def hd95_by_id(metrics_path: Path) -> dict[str, float]:
    """``{image id: HD95 in px}`` of one eval's ``metrics.json`` (images whose HD95 is undefined left out)."""
    return {r["id"]: float(r["hd95"]) for r in read_json(metrics_path)["per_image"] if r.get("hd95") is not None}


def tb_labels(pairs_csv: Path) -> dict[str, int]:
    """``{stem: 0 normal | 1 tuberculosis}`` from a data set's ``pairs.csv``."""
    with open(pairs_csv, newline="") as f:
        return {row["stem"]: int(row["tb_label_from_filename"]) for row in csv.DictReader(f)}


def bootstrap_ci(d: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``d`` (float64, one value per image)."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired(base: dict[str, float], option: dict[str, float]) -> dict:
    """The paired statistics of two ``{id: F1}`` maps on their common ids."""
    from scipy.stats import binomtest, wilcoxon

    ids = sorted(set(base) & set(option))
    a = np.array([base[i] for i in ids])
    b = np.array([option[i] for i in ids])
    d = b - a
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    lo, hi = bootstrap_ci(d)
    return {"n": len(ids), "base": _summary(a), "option": _summary(b), "delta_mean": float(d.mean()),
            "delta_ci95": [lo, hi], "better": better, "worse": worse,
            "sign_test_p": float(binomtest(better, better + worse).pvalue) if better + worse else None,
            "wilcoxon_p": float(wilcoxon(d).pvalue) if np.any(d != 0) else None}


def _summary(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "min": float(x.min()), "below_0.90": int((x < 0.90).sum()),
            "below_0.80": int((x < 0.80).sum())}


def label_of(image_id: str, labels: dict[str, int]) -> int | None:
    """The ``pairs.csv`` label of an eval image id (``"<set>/<stem>"``)."""
    return labels.get(image_id.split("/")[-1])


def lowest_tb(base: dict[str, float], option: dict[str, float], labels: dict[str, int], k: int = 10,
              by: str = "base") -> list[dict]:
    """The ``k`` tuberculosis images with the lowest F1 of ``by`` (``"base"`` or ``"option"``), with both scores."""
    tb = [i for i in base if label_of(i, labels) == 1 and i in option]
    key = base.get if by == "base" else option.get
    return [{"id": i, "base": base[i], "option": option[i]} for i in sorted(tb, key=key)[:k]]


def by_label(base: dict[str, float], option: dict[str, float], labels: dict[str, int]) -> dict[str, dict]:
    """:func:`paired` on the normal (label 0) and the tuberculosis (label 1) images separately."""
    out = {}
    for name, lab in (("normal", 0), ("tb", 1)):
        keep = {i for i in base if label_of(i, labels) == lab}
        if keep:
            out[name] = paired({i: base[i] for i in keep}, {i: v for i, v in option.items() if i in keep})
    return out


def mean_hd95(hd: dict[str, float], ids: set[str]) -> float | None:
    """Mean HD95 over ``ids`` that have one (``None`` when none has)."""
    v = [hd[i] for i in ids if i in hd]
    return float(np.mean(v)) if v else None


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def label_rows(groups: dict[str, dict]) -> list[str]:
    """Markdown rows: mean / min F1 and paired Δ of each label group."""
    rows = []
    for name, g in groups.items():
        lo, hi = g["delta_ci95"]
        rows.append(f"| {name} ({g['n']}): mean / min F1 | {g['base']['mean']:.4f} / {g['base']['min']:.3f} | "
                    f"{g['option']['mean']:.4f} / {g['option']['min']:.3f} (Δ {g['delta_mean']:+.4f}, "
                    f"CI {lo:+.4f}..{hi:+.4f}) |")
    return rows


def markdown(stats: dict, worst: list[dict], names: tuple[str, str], groups: dict[str, dict] | None = None,
             worst_option: list[dict] | None = None) -> str:
    """The comparison as a Markdown table, the paired line and the lowest TB images of each model."""
    b, o = stats["base"], stats["option"]
    p = stats["sign_test_p"]
    lines = [f"| | {names[0]} | {names[1]} |", "|---|---|---|",
             f"| mean F1 ({stats['n']} images) | {b['mean']:.4f} | {o['mean']:.4f} |",
             f"| min F1 | {b['min']:.4f} | {o['min']:.4f} |",
             f"| images < 0.90 / < 0.80 | {b['below_0.90']} / {b['below_0.80']} | "
             f"{o['below_0.90']} / {o['below_0.80']} |",
             f"| mean HD95 (px) | {_fmt(stats.get('base_hd95'), '.2f')} | {_fmt(stats.get('option_hd95'), '.2f')} |",
             *label_rows(groups or {}), "",
             f"Paired Δ F1 {stats['delta_mean']:+.4f} (bootstrap 95 % CI {stats['delta_ci95'][0]:+.4f} to "
             f"{stats['delta_ci95'][1]:+.4f}); {stats['better']} images better, {stats['worse']} worse; sign test p "
             + (f"{p:.2g}" if p is not None else "n/a") + ".", "",
             "| lowest-scoring TB images (baseline) | base F1 | option F1 |", "|---|---|---|"]
    lines += [f"| {w['id']} | {w['base']:.4f} | {w['option']:.4f} |" for w in worst]
    if worst_option:
        lines += ["", "| lowest-scoring TB images (option) | base F1 | option F1 |", "|---|---|---|"]
        lines += [f"| {w['id']} | {w['base']:.4f} | {w['option']:.4f} |" for w in worst_option]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("option", type=Path)
    ap.add_argument("--pairs", type=Path, required=True, help="pairs.csv of the scored set (tb labels)")
    ap.add_argument("--names", nargs=2, default=("baseline", "option"))
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    base, option = f1_by_id(args.base), f1_by_id(args.option)
    labels = tb_labels(args.pairs)
    stats = paired(base, option)
    common = set(base) & set(option)
    stats["base_hd95"] = mean_hd95(hd95_by_id(args.base), common)
    stats["option_hd95"] = mean_hd95(hd95_by_id(args.option), common)
    groups = by_label(base, option, labels)
    worst = lowest_tb(base, option, labels)
    worst_option = lowest_tb(base, option, labels, by="option")
    write_json_atomic(args.out.with_suffix(".json"), {"stats": stats, "by_label": groups, "lowest_tb": worst,
                                                      "lowest_tb_option": worst_option,
                                                      "base": str(args.base), "option": str(args.option)})
    text = markdown(stats, worst, tuple(args.names), groups, worst_option)
    write_text_atomic(args.out.with_suffix(".md"), text)
    print(text, end="")


if __name__ == "__main__":
    main()
