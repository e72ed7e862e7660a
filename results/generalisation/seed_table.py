"""One table of the same recipe trained with several seeds (each seed its own 60/20/20 split) and scored on another
hospital: in-domain test F1, the validation threshold, the cross-hospital mean / worst F1, masks below 0.90, HD95
and the quality flag as a detector there (AUROC, share flagged at the bundle's line, bad masks caught).

Usage: python results/generalisation/seed_table.py --out OUT RUN:EVAL [RUN:EVAL ...]

``RUN``: a one-split ``lungsam train`` folder; ``EVAL``: its ``lungsam eval`` on the other hospital. Writes
``OUT.json`` (strict JSON) and ``OUT.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lungsam.artifacts import read_json, write_json_atomic, write_text_atomic


def row(run: Path, ev: Path) -> dict:
    r, f, e = read_json(run / "run.json"), read_json(run / "folds" / "fold_0" / "metrics.json"), read_json(
        ev / "metrics.json")
    f1 = np.asarray([x["f1"] for x in e["per_image"]])
    q = e.get("qc_detection") or {}
    return {"run": run.name, "seed": r["config"]["seed"], "threshold": f["threshold"],
            "test_f1": f["test"]["f1"]["mean"], "n_test": f["test"]["f1"]["n"], "other_n": int(len(f1)),
            "other_f1": float(f1.mean()), "other_min": float(f1.min()), "below_090": int((f1 < 0.90).sum()),
            "below_080": int((f1 < 0.80).sum()), "hd95": e["hd95"]["mean"], "qc_auroc": q.get("auroc"),
            "qc_flagged_share": q.get("flagged_share"), "qc_bad": q.get("bad"), "qc_caught": q.get("bad_caught")}


def markdown(rows: list[dict]) -> str:
    lines = ["| run (seed) | threshold | in-domain test F1 | other hospital: mean / min F1 | < 0.90 / < 0.80 | HD95 px "
             "| flag AUROC | flagged at the line | bad caught |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} ({r['seed']}) | {r['threshold']:.2f} | {r['test_f1']:.4f} | {r['other_f1']:.4f} / "
                     f"{r['other_min']:.3f} | {r['below_090']} / {r['below_080']} | {r['hd95']:.2f} | "
                     f"{r['qc_auroc']:.3f} | {100 * r['qc_flagged_share']:.1f} % | {r['qc_caught']} of {r['qc_bad']} |")
    m = np.asarray([r["other_f1"] for r in rows])
    lines += ["", f"Across the {len(rows)} seeds: other-hospital mean F1 {m.mean():.4f} (sd {m.std(ddof=1):.4f}, range "
              f"{m.min():.4f}-{m.max():.4f}); flagged share {min(r['qc_flagged_share'] for r in rows) * 100:.1f}-"
              f"{max(r['qc_flagged_share'] for r in rows) * 100:.1f} %."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="RUN:EVAL")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rows = [row(Path(p.split(":")[0]), Path(p.split(":")[1])) for p in a.pairs]
    write_json_atomic(a.out + ".json", {"rows": rows})
    write_text_atomic(a.out + ".md", markdown(rows))


if __name__ == "__main__":
    main()
