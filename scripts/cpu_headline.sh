#!/usr/bin/env bash
# Issue 19's headline figure: end-to-end seconds per image (file read to mask written) with `lungsam predict` on the
# CPU, for the recommended workstation bundle. Run it on a quiet machine; it prints the load average with the figure.
# Usage: scripts/cpu_headline.sh BUNDLE [N=20] [BACKEND=auto] [PRECISION=int8] [IMAGES=../shared/data/montgomery/images]
# Per image: the interval between consecutive masks written (so images 2..N: file read, preprocess, encoder,
# decoder, post-process, PNG written); "loop" is predict.json's seconds over all N (the first image's warm-up in).
# Model loading is outside both (it happens once, before the first image).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=$1
n=${2:-20}
backend=${3:-auto}
precision=${4:-int8}
images=${5:-../shared/data/montgomery/images}
lungsam=${LUNGSAM:-lungsam}
work=$(mktemp -d -t lungsam-headline-XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in"
find "$images" -maxdepth 1 -type f -name '*.png' | sort | head -n "$n" | while read -r f; do ln -s "$(realpath "$f")" "$work/in/"; done
test "$(ls "$work/in" | wc -l)" -ge 2 || { echo "need at least 2 images in $images" >&2; exit 2; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$lungsam" predict "$bundle" "$work/in" --out "$work/out" --backend "$backend" --precision "$precision" -qq
echo "load average after:  $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work/out" <<'PY'
import json, os, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
state = json.loads((out / "predict.json").read_text())
seg = state["segmenter"]
masks = sorted(out.glob("*_mask.png"), key=lambda p: p.stat().st_mtime_ns)
t = [p.stat().st_mtime_ns / 1e9 for p in masks]
per = [b - a for a, b in zip(t, t[1:])]
for p, s in zip(masks[1:], per):
    print(f"{p.name[:-9]}\t{s:.3f} s")
print(f"bundle {seg.get('bundle')}: backend {seg.get('backend')}, precision {seg.get('precision')}, "
      f"{state['ok']} ok / {state['failed']} failed")
print(f"per image (images 2..{len(masks)}): median {statistics.median(per):.3f} s, mean {statistics.mean(per):.3f} s, "
      f"max {max(per):.3f} s; loop over all {len(masks)}: {state['seconds'] / len(masks):.3f} s per image; "
      f"{os.cpu_count()} CPUs")
PY
