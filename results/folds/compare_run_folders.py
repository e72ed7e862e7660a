"""Behaviour check for issue 20 item 1 (one fold loop): the run folders that main's code and this branch's code
write for the same tiny runs have the same files, the same JSON key trees and the same values apart from timings.

    python results/folds/compare_run_folders.py produce CODE_ROOT OUT     # runs the CLI with PYTHONPATH=CODE_ROOT
    python results/folds/compare_run_folders.py diff OUT_MAIN OUT_BRANCH  # prints the differences, exit 1 if any
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PY = "/work/main/.venv/bin/python"
TINY = ["--backbone", "tiny", "--data", "demo:montgomery", "--epochs", "2", "--lr", "1e-3", "--size", "64"]
STEPS = {
    "sam": ["train", *TINY, "--folds", "3"],
    "sam_part": ["train", *TINY, "--folds", "3", "--only-fold", "1"],
    "sam_part+resume": ["train", *TINY, "--folds", "3", "--resume"],
    "lora": ["train", *TINY, "--folds", "3", "--lora-rank", "2", "--epochs", "1"],
    "augment": ["train", *TINY, "--folds", "3", "--augment", "1", "--epochs", "1"],
    "unet": ["train-unet", "--data", "demo:montgomery", "--folds", "3", "--epochs", "2", "--size", "64",
             "--channels", "4,8"],
    "unet_part": ["train-unet", "--data", "demo:montgomery", "--folds", "3", "--epochs", "2", "--size", "64",
                  "--channels", "4,8", "--only-fold", "0"],
    "unet_part+resume": ["train-unet", "--data", "demo:montgomery", "--folds", "3", "--epochs", "2", "--size", "64",
                         "--channels", "4,8", "--resume"],
    "eval_test": ["eval", "@sam", "--data", "demo:montgomery", "--split", "test"],
    "eval_zeroshot": ["eval", "--backbone", "tiny", "--data", "demo:montgomery", "--size", "64"],
}
# values that may differ between two sittings of the same code: clocks, paths, versions, cache use
VOLATILE = ("_s", "time", "started", "finished", "created", "resumed", "versions", "cache_dir", "until", "hits",
            "computed", "seconds", "checkpoint", "data", "source", "model")  # model: eval names the run folder


def produce(code: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": code, "LUNGSAM_CACHE": str(out / "cache")}
    for name, args in STEPS.items():
        folder = out / name.split("+")[0]
        args = [str(out / a[1:]) if a.startswith("@") else a for a in args]
        cmd = [PY, "-m", "lungsam", *args, "--out", str(out / name if args[0] == "eval" else folder), "-q"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)


def key_tree(x, path: str = "") -> set[str]:
    """Every key path of a JSON value (list items merged under ``[]``)."""
    if isinstance(x, dict):
        return {path} | {p for k, v in x.items() for p in key_tree(v, f"{path}.{k}")}
    if isinstance(x, list):
        return {path} | {p for v in x for p in key_tree(v, f"{path}[]")}
    return {path}


def values(x, path: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            if not any(t in k for t in VOLATILE):
                yield from values(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from values(v, f"{path}[{i}]")
    else:
        yield path, x


def diff(a: Path, b: Path) -> int:
    problems = 0
    for step in STEPS:
        da, db = a / step.split("+")[0] if not step.startswith("eval") else a / step, \
            b / step.split("+")[0] if not step.startswith("eval") else b / step
        fa = {str(p.relative_to(da)) for p in da.rglob("*") if p.is_file()}
        fb = {str(p.relative_to(db)) for p in db.rglob("*") if p.is_file()}
        if fa != fb:
            problems += 1
            print(f"{step}: files only in main {sorted(fa - fb)}, only in branch {sorted(fb - fa)}")
        n_json = 0
        for f in sorted(x for x in fa & fb if x.endswith(".json")):
            ja, jb = json.loads((da / f).read_text()), json.loads((db / f).read_text())
            n_json += 1
            ka, kb = key_tree(ja), key_tree(jb)
            if ka != kb:
                problems += 1
                print(f"{step}/{f}: keys only in main {sorted(ka - kb)}, only in branch {sorted(kb - ka)}")
            va, vb = dict(values(ja)), dict(values(jb))
            bad = [k for k in va.keys() & vb.keys() if va[k] != vb[k]]
            if bad:
                problems += 1
                print(f"{step}/{f}: {len(bad)} values differ, e.g. " +
                      "; ".join(f"{k}: {va[k]!r} != {vb[k]!r}" for k in sorted(bad)[:5]))
        print(f"{step}: {len(fa)} files, {n_json} JSON files compared")
    print("no differences" if problems == 0 else f"{problems} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(diff(Path(sys.argv[2]), Path(sys.argv[3])))
