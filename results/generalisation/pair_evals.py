"""Pair two ``lungsam eval`` results image by image (cross-dataset: every image of the other set).

``lungsam compare`` pairs training runs on their test splits; a cross-dataset score is an eval of a run on
another data set, so this pairs two eval ``metrics.json`` (baseline first) on their common image ids:
mean / min F1 of each, the paired mean difference with a bootstrap 95 % CI (10 000 resamples, seeded),
images better / worse, the two-sided sign test (scipy ``binomtest``) and Wilcoxon signed-rank p, and the
tuberculosis images (``pairs.csv``'s ``tb_label_from_filename``) with the lowest baseline F1.

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


def lowest_tb(base: dict[str, float], option: dict[str, float], labels: dict[str, int], k: int = 10) -> list[dict]:
    """The ``k`` tuberculosis images with the lowest baseline F1, with both scores."""
    tb = [i for i in base if labels.get(i.split("/")[-1]) == 1 and i in option]
    return [{"id": i, "base": base[i], "option": option[i]} for i in sorted(tb, key=base.get)[:k]]


def markdown(stats: dict, worst: list[dict], names: tuple[str, str]) -> str:
    b, o = stats["base"], stats["option"]
    p = stats["sign_test_p"]
    lines = [f"| | {names[0]} | {names[1]} |", "|---|---|---|",
             f"| mean F1 ({stats['n']} images) | {b['mean']:.4f} | {o['mean']:.4f} |",
             f"| min F1 | {b['min']:.4f} | {o['min']:.4f} |",
             f"| images < 0.90 / < 0.80 | {b['below_0.90']} / {b['below_0.80']} | "
             f"{o['below_0.90']} / {o['below_0.80']} |", "",
             f"Paired Δ F1 {stats['delta_mean']:+.4f} (bootstrap 95 % CI {stats['delta_ci95'][0]:+.4f} to "
             f"{stats['delta_ci95'][1]:+.4f}); {stats['better']} images better, {stats['worse']} worse; sign test p "
             + (f"{p:.2g}" if p is not None else "n/a") + ".", "",
             "| lowest-scoring TB images (baseline) | base F1 | option F1 |", "|---|---|---|"]
    lines += [f"| {w['id']} | {w['base']:.4f} | {w['option']:.4f} |" for w in worst]
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
    stats = paired(base, option)
    worst = lowest_tb(base, option, tb_labels(args.pairs))
    write_json_atomic(args.out.with_suffix(".json"), {"stats": stats, "lowest_tb": worst,
                                                      "base": str(args.base), "option": str(args.option)})
    text = markdown(stats, worst, tuple(args.names))
    write_text_atomic(args.out.with_suffix(".md"), text)
    print(text, end="")


if __name__ == "__main__":
    main()
