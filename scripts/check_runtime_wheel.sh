#!/usr/bin/env bash
# The install a hospital gets: build the wheel, install it with the runtime's dependencies only (no torch) into a
# fresh venv, segment the packaged demo images with a bundle (and set a site flag line from them), and check that
# `lungsam train` names its extra.
# Usage: scripts/check_runtime_wheel.sh DEV_PYTHON WORK_DIR   (DEV_PYTHON: the dev venv's python, for the bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
dev_python=$1
work=$2
start=$(date +%s)
rm -rf "$work" && mkdir -p "$work"
"$dev_python" -m build --wheel --outdir "$work/dist" . >/dev/null
"$dev_python" scripts/make_tiny_bundle.py "$work/tiny" >/dev/null
python3 -m venv "$work/rt"
wheel=$(ls "$work"/dist/lungsam-*.whl)
"$work/rt/bin/pip" install --quiet "${wheel}[cpu]"
cd "$work"  # away from the source tree: the installed package is the one imported
if "$work/rt/bin/python" -c "import torch" 2>/dev/null; then echo "torch is installed in the runtime venv" >&2; exit 1; fi
"$work/rt/bin/lungsam" --version
"$work/rt/bin/python" -m lungsam --version
images=$("$work/rt/bin/python" -c "import lungsam, pathlib; print(pathlib.Path(lungsam.__file__).parent / 'demo_data/montgomery/images')")
"$work/rt/bin/lungsam" predict "$work/tiny/bundle" "$images" --out "$work/pred" -q
test "$(wc -l < "$work/pred/predictions.jsonl")" -eq 16
# a site's own flag line from that run, then used (torch-free as well)
"$work/rt/bin/lungsam" qc-site "$work/tiny/bundle" "$work/pred" --flag-share 0.25 --min-images 16 --out "$work/site.json"
"$work/rt/bin/lungsam" predict "$work/tiny/bundle" "$images" --out "$work/pred_site" --qc-site "$work/site.json" -q
grep -q '"source": "site"' "$work/pred_site/predict.json"
set +e
"$work/rt/bin/lungsam" train --folds 1 --out "$work/train_run" 2> "$work/train.err"
rc=$?
set -e
cat "$work/train.err"
test "$rc" -eq 1 && grep -q "pip install 'lungsam\[train\]'" "$work/train.err" && test ! -e "$work/train_run"
echo "runtime-only wheel check passed in $(( $(date +%s) - start )) s"
