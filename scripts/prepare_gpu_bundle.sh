#!/usr/bin/env bash
# Gather everything scripts/gpu_check.sh needs on a GPU machine without network, into one git-ignored
# folder (default gpu_kit/, < 64 MiB): the lungsam wheel, cp312 wheels of the few dependencies that a
# PyTorch+CUDA image usually lacks, mobile_sam.pt, and a small real data subset (Montgomery pairs at
# 256x256). Runs HERE (network for `pip download`, ../shared for data and weights).
#
#   bash scripts/prepare_gpu_bundle.sh            # -> gpu_kit/
#   KIT=/tmp/kit N_PAIRS=24 bash scripts/prepare_gpu_bundle.sh
#
# Environment: PYTHON (default .venv/bin/python), KIT (gpu_kit), N_PAIRS (138: all of Montgomery), SIZE (256),
# DATA (../shared/data/montgomery), WEIGHTS (../shared/weights/mobile_sam.pt), PYVER (3.12),
# EXTRA_WHEELS (more requirement specs to download, space separated), MAX_MB (64).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
KIT=${KIT:-$REPO/gpu_kit}
N_PAIRS=${N_PAIRS:-138}
SIZE=${SIZE:-256}
DATA=${DATA:-$REPO/../shared/data/montgomery}
WEIGHTS=${WEIGHTS:-$REPO/../shared/weights/mobile_sam.pt}
PYVER=${PYVER:-3.12}
MAX_MB=${MAX_MB:-64}
# Not carried (already in the PyTorch+CUDA image, and too big for the 64 MiB kit): torch, numpy,
# scipy, matplotlib, pillow, onnx, onnxruntime. gpu_check.sh reports any that are missing.
WHEELS=${WHEELS:-"segment-anything monai onnxconverter-common safetensors click tqdm psutil pydicom"}

echo "== preparing $KIT"
rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/data/montgomery/images" "$KIT/data/montgomery/masks" "$KIT/weights"

echo "== lungsam wheel"
"$PYTHON" -m pip wheel --no-deps --no-build-isolation --quiet -w "$KIT/wheels" "$REPO"
rm -rf "$REPO/build"  # setuptools' scratch folder

echo "== dependency wheels for Python $PYVER: $WHEELS ${EXTRA_WHEELS:-}"
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
  --platform manylinux1_x86_64 -d "$KIT/wheels" $WHEELS ${EXTRA_WHEELS:-}

echo "== weights: $WEIGHTS"
cp "$WEIGHTS" "$KIT/weights/"

echo "== data: $N_PAIRS pairs of $DATA at ${SIZE}x${SIZE}"
"$PYTHON" - "$DATA" "$KIT/data/montgomery" "$N_PAIRS" "$SIZE" <<'PY'
import sys
from pathlib import Path

from PIL import Image

src, dst, n, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stems = sorted(p.stem for p in (src / "images").glob("*.png") if (src / "masks" / p.name).exists())
if len(stems) < n:
    sys.exit(f"{src}: only {len(stems)} pairs, {n} asked for")
step = len(stems) / n  # spread over the data set (both Montgomery classes: *_0 normal, *_1 TB)
for k in range(n):
    s = stems[int(k * step)]
    Image.open(src / "images" / f"{s}.png").convert("L").resize((size, size), Image.BILINEAR).save(
        dst / "images" / f"{s}.png", optimize=True)
    Image.open(src / "masks" / f"{s}.png").convert("L").resize((size, size), Image.NEAREST).save(
        dst / "masks" / f"{s}.png", optimize=True)
print(f"{n} pairs written to {dst}")
PY
cp "$REPO/scripts/gpu_check.sh" "$KIT/"
( cd "$KIT" && sha256sum weights/* wheels/* > SHA256SUMS )

bytes=$(du -sb "$KIT" | cut -f1)
mb=$(( (bytes + 1048575) / 1048576 ))
echo "== $KIT: $(du -sh "$KIT" | cut -f1) ($bytes bytes)"
du -sh "$KIT"/* | sed 's/^/   /'
if (( mb > MAX_MB )); then
  echo "ERROR: the kit is ${mb} MiB, over ${MAX_MB} MiB" >&2
  exit 1
fi
echo "ok: under ${MAX_MB} MiB; on the GPU machine run:  bash gpu_check.sh   (or bash scripts/gpu_check.sh with KIT=$KIT)"
