"""Print the CPU table (issue 19) over several ``lungsam bench`` results: one row per backbone x size x backend x
precision, the machine's ISA flags, the Pareto front of F1 vs end-to-end p50 marked across all of them.

Usage: python scripts/cpu_table.py results/cpu/2026-12-01_*/results.json > table.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lungsam.benchmarks.report import cpu_table


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    results = [json.loads(Path(p).read_text()) for p in paths]
    sys.stdout.write(cpu_table(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
