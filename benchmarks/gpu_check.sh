#!/usr/bin/env bash
# One check of a GPU machine, printed as ONE table: the CUDA test subset, DiT-XL/2 training images/s
# (plain fp32 eager loop; ours in fp32/TF32, bf16, bf16 + torch.compile), SD-VAE-sized latent
# extraction at batch 1 and 64, DDPM-250 / DDIM-50 / DPM-Solver-25 sampling images/s of DiT-XL/2,
# and the peak memory of each row (each row runs in its own process). Every row shows its exact command.
#
#   bash benchmarks/gpu_check.sh                  # one H100/H200: at most --budget seconds (default 470)
#   bash benchmarks/gpu_check.sh --tiny           # tiny models and sizes, on any device (a CPU too)
#   bash benchmarks/gpu_check.sh --wheels DIR     # first: pip install --no-index --find-links DIR diffusers
#                                                 # (DIR: diffusers' wheel and those of its needs missing there)
#
# Options: --out DIR keeps every row's log and JSON there (default: a temporary folder, removed);
# --budget SECONDS caps the whole run (a row that would start after it is reported as skipped);
# --rows N[,N...] runs only those rows (numbered from 1 as printed), the others are reported as skipped.
# Environment: PYTHON, the interpreter (default python3). Needs torch, numpy, PyYAML, safetensors,
# tqdm, pillow, einops, timm, accelerate and pytest; rows that need diffusers (extraction, DPM-Solver)
# are reported as "skipped (diffusers missing)" without it.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TINY=0
WHEELS=""
OUT=""
BUDGET=470
ONLY=""

usage_error() {
    echo "gpu_check.sh: $1 (options: --tiny, --wheels DIR, --out DIR, --budget SECONDS, --rows N[,N...])" >&2
    exit 2
}
while (($#)); do
    case $1 in
        --tiny) TINY=1 ;;
        --wheels) (($# >= 2)) || usage_error "--wheels needs a folder"; WHEELS=$2; shift ;;
        --out) (($# >= 2)) || usage_error "--out needs a folder"; OUT=$2; shift ;;
        --budget) (($# >= 2)) && [[ $2 =~ ^[0-9]+$ ]] || usage_error "--budget needs a whole number of seconds"
                  BUDGET=$2; shift ;;
        --rows) (($# >= 2)) && [[ $2 =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "--rows needs row numbers, e.g. 2 or 2,8"
                ONLY=",$2,"; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
    shift
done
[[ -z $WHEELS || -d $WHEELS ]] || usage_error "--wheels $WHEELS is not a folder"
command -v "$PY" >/dev/null || usage_error "no Python interpreter '$PY' (set PYTHON)"

if [[ -n $OUT ]]; then
    mkdir -p "$OUT" || usage_error "cannot create --out $OUT"
    WORK=$(cd "$OUT" && pwd)
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS

if [[ -n $WHEELS ]]; then
    if ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" diffusers >"$WORK/wheels.log" 2>&1; then
        echo "gpu_check.sh: pip could not install diffusers from $WHEELS (see $WORK/wheels.log); going on" >&2
    fi
fi
PROBE=$("$PY" -c 'import torch
gpu = torch.cuda.is_available()
print("cuda" if gpu else "cpu", torch.__version__, torch.cuda.get_device_name(0) if gpu else "CPU", sep="\t")') || {
    echo "gpu_check.sh: $PY cannot import torch" >&2; exit 2; }
IFS=$'\t' read -r DEVICE TORCH_VERSION DEVICE_NAME <<<"$PROBE"
if [[ $DEVICE == cpu && $TINY == 0 ]]; then
    echo "gpu_check.sh: no CUDA device here; the full check needs one GPU (run with --tiny for a quick run on CPU)" >&2
    exit 2
fi
HAVE_DIFFUSERS=0
"$PY" -c 'import diffusers' >/dev/null 2>&1 && HAVE_DIFFUSERS=1

if ((TINY)); then
    MODEL=DiT-T/2 LATENT=8 TRAIN_BATCH=2 TRAIN_STEPS=2 WARMUP=1 MATMUL=256 LIMIT_SCALE=3
    IMAGE=16 SD_IMAGES=4 BIG_BATCH=4 WORKERS=0
    SAMPLERS=(ddpm-4 ddim-2 dpm-solver-2) SAMPLE_IMAGES=2
else
    MODEL=DiT-XL/2 LATENT=32 TRAIN_BATCH=64 TRAIN_STEPS=10 WARMUP=3 MATMUL=8192 LIMIT_SCALE=1
    IMAGE=256 SD_IMAGES=64 BIG_BATCH=64 WORKERS=4
    SAMPLERS=(ddpm-250 ddim-50 dpm-solver-25) SAMPLE_IMAGES=32
fi

# Runs a benchmark script in its place and records the peak memory it reached: CUDA's
# max_memory_allocated when the script used the GPU, else the process's peak resident set size.
PEAK_RUNNER="$WORK/run_recording_peak_memory.py"
cat >"$PEAK_RUNNER" <<'EOF_RUNNER'
import json, resource, runpy, sys
peak_file, script, *args = sys.argv[1:]
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    import torch
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    with open(peak_file, "w") as f:
        json.dump({"gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
                   "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
sys.exit(code)
EOF_RUNNER

ROWS="$WORK/rows.tsv"
: >"$ROWS"
N=0

# row KIND LABEL LIMIT_S [--skip REASON] -- PYTHON ARGS...
# KIND tells the table how to read the row's JSON (pytest, train, extract, sample); a benchmark row's
# command runs under the peak-memory recorder (the table shows the command without it).
row() {
    local kind=$1 label=$2 limit=$(($3 * LIMIT_SCALE)) skip=""
    shift 3
    if [[ $1 == --skip ]]; then skip=$2; shift 2; fi
    shift  # --
    N=$((N + 1))
    local id
    id=$(printf 'row%02d' "$N")
    local shown="$*"
    shown=${shown//$WORK/\$WORK}
    local py=$1
    shift
    local cmd=("$py" "$@")
    [[ $kind == pytest ]] || cmd=("$py" "$PEAK_RUNNER" "$WORK/$id.peak.json" "$@")
    local left=$((BUDGET - (SECONDS - START)))
    local status
    if [[ -n $ONLY && $ONLY != *",$N,"* ]]; then
        status="skipped (not in --rows)"
    elif [[ -n $skip ]]; then
        status="skipped ($skip)"
    elif ((left < 15)); then
        status="skipped (time budget of ${BUDGET} s spent)"
    else
        ((limit > left)) && limit=$left
        echo "[$(date +%H:%M:%S)] $label: $shown" >&2
        local t0=$SECONDS rc=0
        timeout --kill-after=10 "$limit" "${cmd[@]}" >"$WORK/$id.log" 2>&1 || rc=$?
        if ((rc == 124 || rc == 137)); then
            status="timed out after ${limit} s"
        elif ((rc != 0)); then
            status="failed (exit $rc): $(grep -v '^\s*$' "$WORK/$id.log" | tail -n 1 | tr '\t' ' ' | cut -c1-120)"
        else
            status="ok"
        fi
        status="$status	$((SECONDS - t0))"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$kind" "$label" "$shown" "$status" >>"$ROWS"
}

next_id() { printf 'row%02d' "$((N + 1))"; }

NO_DIFFUSERS=()
((HAVE_DIFFUSERS)) || NO_DIFFUSERS=(--skip "diffusers missing; give --wheels DIR")

# 1. the CUDA test subset
row pytest "CUDA tests (pytest -m cuda)" 150 -- \
    "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda_paths.py

# 2-5. training, each variant in its own process (its own peak memory); speed-up against the plain loop
TF32=""
[[ $DEVICE == cuda ]] && TF32="/TF32"
TRAIN=(--device "$DEVICE" --models "$MODEL" --latent-size "$LATENT" --batch-size "$TRAIN_BATCH"
       --steps "$TRAIN_STEPS" --warmup "$WARMUP" --matmul-size "$MATMUL")
id=$(next_id)
row train "train $MODEL plain fp32$TF32 eager loop" 90 -- \
    "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --plain-only --json "$WORK/$id.json"
id=$(next_id)
row train "train $MODEL ours fp32$TF32" 90 -- \
    "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --no-plain \
    --mixed-precision no --compile off --json "$WORK/$id.json"
id=$(next_id)
row train "train $MODEL ours bf16" 90 -- \
    "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --no-plain \
    --mixed-precision bf16 --compile off --json "$WORK/$id.json"
id=$(next_id)
COMPILE_SKIP=()
[[ $DEVICE == cpu ]] && COMPILE_SKIP=(--skip "CPU: compiling takes minutes there")
row train "train $MODEL ours bf16 + compile" 180 "${COMPILE_SKIP[@]}" -- \
    "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --no-plain \
    --mixed-precision bf16 --compile on --json "$WORK/$id.json"

# 6-7. SD-VAE-sized extraction (random weights), batch 1 and the large batch, against the per-image baseline
for batch in 1 "$BIG_BATCH"; do
    id=$(next_id)
    row extract "extract SD-VAE-sized ${IMAGE}², batch $batch" 90 "${NO_DIFFUSERS[@]}" -- \
        "$PY" benchmarks/bench_extract.py --device "$DEVICE" --skip bundled \
        --image-size "$IMAGE" --sd-images "$SD_IMAGES" --batch-sizes "$batch" --num-workers "$WORKERS" \
        --matmul-size "$MATMUL" --json "$WORK/$id.json"
done

# 8-10. sampling a random model of the training size, one sampler per process, cfg 1.5
for spec in "${SAMPLERS[@]}"; do
    id=$(next_id)
    skip=()
    [[ $spec == dpm-solver-* ]] && skip=("${NO_DIFFUSERS[@]}")
    row sample "sample $MODEL $spec, cfg 1.5" 90 "${skip[@]}" -- \
        "$PY" benchmarks/bench_sample.py --device "$DEVICE" --model "$MODEL" \
        --samplers "$spec" --num-images "$SAMPLE_IMAGES" --batch-size "$SAMPLE_IMAGES" --cfg-scale 1.5 \
        --json "$WORK/$id.json"
done

"$PY" "$ROOT/benchmarks/gpu_check_table.py" "$WORK" "$ROWS" "$DEVICE_NAME" "$TORCH_VERSION" "$TINY" \
    "$((SECONDS - START))"
