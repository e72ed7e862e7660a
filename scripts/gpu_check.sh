#!/usr/bin/env bash
# One-shot GPU check of lungsam on a bare Linux machine with one NVIDIA GPU, Python 3.12 and PyTorch+CUDA
# installed, and no network: install from the carried kit (scripts/prepare_gpu_bundle.sh), then
#   1. short decoder fine-tune on cuda   (lungsam train --device cuda --folds 1 --epochs $EPOCHS)
#   2. export with --fp16 (and --trt when tensorrt imports)
#   3. lungsam bench on cuda, every backend that exists here (skipped ones say why)
#   4. lungsam bench --sweep on cuda: accuracy/latency by encoder input size and precision
#   5. (LORA_RANK > 0) the same fine-tune with encoder LoRA (--lora-rank), and lungsam compare against step 1
# in at most $BUDGET_S seconds (default 480), everything written under $OUT (default ./gpu_check_out).
# Each step is timed; a failing step is logged and the script goes on with what it can.
#
#   bash gpu_check.sh                         # from inside the kit (gpu_kit/gpu_check.sh)
#   KIT=gpu_kit bash scripts/gpu_check.sh     # from the repo
#   bash scripts/gpu_check.sh --dry-run       # environment report + install + plan, no GPU work
#   DEVICE=cpu BACKBONE=tiny EPOCHS=2 LIMIT=3 SKIP_INSTALL=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#                                             # the same steps on CPU with the tiny backbone (a test here)
#
# Environment: KIT, OUT, WORK (run + bundle; default $OUT/work, or /tmp/lungsam_gpu_check when OUT is set), PYTHON (python3), DEVICE (cuda), BACKBONE (mobile_sam),
# EPOCHS (20), LIMIT (bench images; default all of the test split), BATCHES (1,8,32,128), REPEATS (5), WARMUP (5),
# SWEEP_SIZES (1024,768,512,384,256), SWEEP_BATCHES (1,64), BUDGET_S (480), SKIP_INSTALL (0), SKIP_SWEEP (0),
# LORA_RANK (4; 0 skips step 5).
set -uo pipefail

DRY_RUN=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
if [[ -z "${KIT:-}" ]]; then
  if [[ -d "$HERE/wheels" ]]; then KIT=$HERE; else KIT=$HERE/../gpu_kit; fi
fi
KIT=$(cd "$KIT" 2>/dev/null && pwd || echo "$KIT")
if [[ -n "${OUT:-}" ]]; then DEFAULT_WORK=${TMPDIR:-/tmp}/lungsam_gpu_check; else DEFAULT_WORK=; fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-${DEFAULT_WORK:-$OUT/work}}  # run + bundle (scratch); only results go to $OUT when OUT is set
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BACKBONE=${BACKBONE:-mobile_sam}
EPOCHS=${EPOCHS:-20}
LIMIT=${LIMIT:-}
BATCHES=${BATCHES:-1,8,32,128}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-5}
SWEEP_SIZES=${SWEEP_SIZES:-1024,768,512,384,256}
SWEEP_BATCHES=${SWEEP_BATCHES:-1,64}
BUDGET_S=${BUDGET_S:-480}
SKIP_INSTALL=${SKIP_INSTALL:-0}
SKIP_SWEEP=${SKIP_SWEEP:-0}
LORA_RANK=${LORA_RANK:-4}
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
START=$(date +%s)
export PYTHONUNBUFFERED=1 LUNGSAM_CACHE=${LUNGSAM_CACHE:-$WORK/cache} MPLBACKEND=Agg

exec > >(tee -a "$LOG") 2>&1
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
# the CLI through the chosen interpreter (no reliance on where pip put the `lungsam` script)
# (-P: the installed lungsam, never a source tree that happens to be the current directory)
LUNGSAM=("$PYTHON" -P -c 'import sys; sys.argv[0] = "lungsam"; from lungsam.cli import main; main()')
declare -A STATUS
step() {  # step NAME MIN_SECONDS_LEFT COMMAND...
  local name=$1 need=$2; shift 2
  if (( $(left) < need )); then
    echo "== [$name] skipped: $(left) s left of the ${BUDGET_S} s budget, needs ~${need} s"
    STATUS[$name]="skipped (time budget)"; return 1
  fi
  local shown="$*"; shown=${shown/"${LUNGSAM[*]}"/lungsam}
  echo "== [$name] $(date -u +%H:%M:%S) ($(elapsed) s elapsed): $shown"
  local t0; t0=$(date +%s)
  if [[ $DRY_RUN == 1 ]]; then echo "   (dry run: not run)"; STATUS[$name]="dry run"; return 0; fi
  # the step gets the time that is left (minus a margin) so the whole check stays inside the budget
  timeout --kill-after=10 $(( $(left) > 20 ? $(left) - 10 : 10 )) "$@"
  local rc=$?
  STATUS[$name]="rc=$rc, $(( $(date +%s) - t0 )) s"
  echo "== [$name] ${STATUS[$name]}"
  return $rc
}

echo "# lungsam GPU check  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "kit: $KIT   out: $OUT   work: $WORK   python: $PYTHON   device: $DEVICE   backbone: $BACKBONE"
[[ -d "$KIT" ]] && echo "kit size: $(du -sh "$KIT" | cut -f1)"

echo "== what exists here"
uname -a
nproc
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || nvidia-smi
else
  echo "nvidia-smi: not found"
fi
"$PYTHON" -P - <<'PY'
import importlib, importlib.metadata, sys
print("python", sys.version.split()[0], sys.executable)
for name in ["torch", "torchvision", "numpy", "scipy", "PIL", "matplotlib", "onnx", "onnxruntime", "tensorrt",
             "cuda.bindings", "segment_anything", "monai", "safetensors", "onnxconverter_common", "click", "tqdm",
             "psutil", "pydicom", "peft", "lungsam"]:
    try:
        m = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" cuda={m.version.cuda} available={m.cuda.is_available()}"
            if m.cuda.is_available():
                extra += f" device={m.cuda.get_device_name(0)} bf16={m.cuda.is_bf16_supported()}"
        if name == "onnxruntime":
            extra = f" providers={m.get_available_providers()}"
        if name == "lungsam":
            extra = f" ({m.__file__})"
        try:
            version = importlib.metadata.version({"PIL": "pillow", "cuda.bindings": "cuda-bindings",
                                                  "segment_anything": "segment-anything"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = getattr(m, "__version__", "?")
        print(f"  {name:22s} {version}{extra}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name:22s} MISSING ({type(e).__name__}: {str(e)[:80]})")
PY

# ------------------------------------------------------------------------------------------------
if [[ $SKIP_INSTALL != 1 ]]; then
  echo "== install lungsam from $KIT/wheels (no network)"
  if [[ ! -d "$KIT/wheels" ]]; then echo "no $KIT/wheels: run scripts/prepare_gpu_bundle.sh first" >&2; exit 1; fi
  if [[ $DRY_RUN == 1 ]]; then
    ls "$KIT/wheels"
  else
    "$PYTHON" -m pip install --quiet --no-index --no-cache-dir --find-links "$KIT/wheels" "lungsam[export]" \
      || { echo "resolver install failed; installing the carried wheels without dependency checks";
           "$PYTHON" -m pip install --quiet --no-index --no-cache-dir --no-deps "$KIT"/wheels/*.whl; }
    "$PYTHON" -P -c "import lungsam.cli, segment_anything, monai, scipy, matplotlib; print('lungsam imports ok')" \
      || { echo "lungsam cannot be imported with what is installed here; stopping" >&2; exit 1; }
  fi
fi

DATA_DIR=${DATA_DIR:-$KIT/data/montgomery}
CKPT=${CHECKPOINT:-$KIT/weights/mobile_sam.pt}
BASE_TRAIN_ARGS=(--data "$DATA_DIR" --backbone "$BACKBONE" --prompt points --folds 1 --epochs "$EPOCHS"
                 --patience "$EPOCHS" --lr 1e-4 --device "$DEVICE" --quiet)
[[ $BACKBONE != tiny ]] && BASE_TRAIN_ARGS+=(--checkpoint "$CKPT")
TRAIN_ARGS=("${BASE_TRAIN_ARGS[@]}" --out "$WORK/run")
EXPORT_ARGS=(--out "$WORK/bundle" --fp16 --max-batch 32)
if "$PYTHON" -c "import tensorrt" 2>/dev/null && [[ $DEVICE == cuda ]]; then EXPORT_ARGS+=(--trt); fi
PRECISIONS=fp32,fp16; [[ $DEVICE == cuda ]] && PRECISIONS=fp32,fp16,bf16
LIMIT_ARGS=(); [[ -n $LIMIT ]] && LIMIT_ARGS=(--limit "$LIMIT")
rm -rf "$WORK/run" "$WORK/bundle" "$WORK/run_lora"
mkdir -p "$WORK"

step train 120 "${LUNGSAM[@]}" train "${TRAIN_ARGS[@]}"
step export 60 "${LUNGSAM[@]}" export "$WORK/run" "${EXPORT_ARGS[@]}"
step bench 45 "${LUNGSAM[@]}" bench "$WORK/bundle" --out "$OUT/bench" --device "$DEVICE" \
  --backends torch,onnxruntime,tensorrt --precisions "$PRECISIONS" --batch "$BATCHES" --warmup "$WARMUP" \
  --repeats "$REPEATS" "${LIMIT_ARGS[@]}"
if [[ $SKIP_SWEEP != 1 ]]; then
  SW_SIZES=$SWEEP_SIZES; [[ $BACKBONE == tiny ]] && SW_SIZES=128,64
  step sweep 30 "${LUNGSAM[@]}" bench --sweep --run "$WORK/run" --out "$OUT/sweep" --device "$DEVICE" \
    --sizes "$SW_SIZES" --precisions "$PRECISIONS" --batch "$SWEEP_BATCHES" --warmup 3 --repeats 3 "${LIMIT_ARGS[@]}"
fi

if (( LORA_RANK > 0 )); then
  step lora 90 "${LUNGSAM[@]}" train "${BASE_TRAIN_ARGS[@]}" --lora-rank "$LORA_RANK" --out "$WORK/run_lora" \
    && step compare 10 "${LUNGSAM[@]}" compare "$WORK/run" "$WORK/run_lora" --out "$OUT/lora_compare"
fi

# ------------------------------------------------------------------------------------------------
{
  echo "# lungsam GPU check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s)"
  echo
  for s in train export bench sweep lora compare; do echo "- $s: ${STATUS[$s]:-not run}"; done
  echo
  [[ -f "$WORK/run/report.md" ]] && { echo "## training"; echo; head -n 30 "$WORK/run/report.md"; echo; }
  [[ -f "$OUT/bench/results.md" ]] && { cat "$OUT/bench/results.md"; echo; }
  [[ -f "$OUT/sweep/sweep.md" ]] && { cat "$OUT/sweep/sweep.md"; echo; }
  [[ -f "$WORK/run_lora/report.md" ]] && { echo "## training with encoder LoRA (rank $LORA_RANK)"; echo;
                                           head -n 30 "$WORK/run_lora/report.md"; echo; }
  [[ -f "$OUT/lora_compare.md" ]] && { echo "## decoder only vs + encoder LoRA (paired, same test images)"; echo;
                                       cat "$OUT/lora_compare.md"; }
} > "$SUMMARY"
echo "== done in $(elapsed) s; outputs:"
find "$OUT" -maxdepth 2 -type f -not -path "$WORK/*" | sort
echo "summary: $SUMMARY"
