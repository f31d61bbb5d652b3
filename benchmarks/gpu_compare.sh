#!/usr/bin/env bash
# One GPU call that measures an earlier checkout ("base") against this tree ("ours"), same machine, same run.
#
#   bash benchmarks/gpu_compare.sh [BASE_TREE] [STEPS]
#
# BASE_TREE (default .bench_base): a copy of an earlier commit's tree, e.g.
#   mkdir .bench_base && git archive 8689d92 src | tar -x -C .bench_base
# (git-ignored; pass it to the GPU machine with the working tree). If .bench_authors/MPAE (a clone of
# github.com/Jiahao-UTS/MPAE) and .bench_authors/dinov2 (facebookresearch/dinov2) exist, or
# AUTHORS_REPO / DINOV2_REPO point at such clones, the fp32 runs time the authors' code too.
#
# Every benchmark process builds each implementation once and alternates their steps, so
# the ratios compare like with like even on a shared or throttling GPU. Each prints one JSON
# line; all lines go to $OUT/gpu_compare.jsonl (when $OUT is set) and a summary table ends the
# output. Budget: about 5 minutes on one H100/H200 (torch.compile run last, capped at 150 s).
#
# Smoke run on a CPU (tiny sizes):  PYTHON=.venv/bin/python DEVICE=cpu BATCH=1 SIZE=56 LARGE=112 STEPS=1 WARMUP=1 LIMIT_SCALE=10 \
#   bash benchmarks/gpu_compare.sh /tmp/bench_base
set -u
cd "$(dirname "$0")/.."
BASE=${1:-.bench_base}
STEPS=${2:-${STEPS:-10}}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-64}
SIZE=${SIZE:-224}
LARGE=${LARGE:-448}
WARMUP=${WARMUP:-3}
LIMIT_SCALE=${LIMIT_SCALE:-1}
OUT_DIR=${OUT:-/tmp}
LOG="$OUT_DIR/gpu_compare.jsonl"
: > "$LOG"

if [ ! -d "$BASE/src/mpae_lightning/models" ]; then
  echo "gpu_compare: $BASE/src/mpae_lightning/models not found (copy the earlier commit's tree to $BASE)" >&2
  exit 2
fi
AUTHORS=${AUTHORS_REPO:-.bench_authors/MPAE}
DINOV2=${DINOV2_REPO:-.bench_authors/dinov2}
AUTHORS_ARGS=()
if [ -f "$AUTHORS/MPAE.py" ] && [ -d "$DINOV2/dinov2" ]; then
  AUTHORS_ARGS=(--authors-repo "$AUTHORS" --dinov2-repo "$DINOV2")
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"

run() {  # run <timeout seconds> <script> <args...>
  local limit=$(( $1 * LIMIT_SCALE )); shift
  local script=$1; shift
  echo "== $script $*" >&2
  timeout "$limit" $PY -W ignore "benchmarks/$script" --device "$DEVICE" --batch-size "$BATCH" --base-src "$BASE/src" \
    --steps "$STEPS" --warmup "$WARMUP" "$@" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then echo "gpu_compare: $script $* ran over its ${limit}s limit" >&2
  elif [ "$rc" != 0 ]; then echo "gpu_compare: $script $* failed (exit $rc)" >&2; fi
}

run 90 train_step.py --precision bf16 --image-size "$SIZE"
run 90 train_step.py --precision bf16 --image-size "$LARGE"
run 90 train_step.py --precision fp32 --image-size "$SIZE" ${AUTHORS_ARGS[@]+"${AUTHORS_ARGS[@]}"}
run 60 predict.py --precision bf16 --image-size "$SIZE"
run 60 predict.py --precision fp32 --image-size "$SIZE" ${AUTHORS_ARGS[@]+"${AUTHORS_ARGS[@]}"}
run 60 components.py --precision bf16 --image-size "$SIZE"
run 60 predict.py --compare-dtypes --image-size "$SIZE"   # opt-in bf16 inference vs float32, with label agreement
run 150 train_step.py --precision bf16 --image-size "$SIZE" --compile

$PY - "$LOG" <<'EOF'
import json, sys
print(f"\n{'benchmark':<11}{'prec':<6}{'px':>5}{'compile':>8}  {'impl':<8}{'s/step':>9}{'img/s':>9}{'GiB':>7}  speed-up")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["benchmark"] == "components":  # parts of the bf16 step, ours against base
        for part, res in r["results"].items():
            print(f"{'part':<11}{r['precision']:<6}{r['image_size']:>5}{'':>8}  {part:<12}{res['ours_seconds']:>9.4f}"
                  f"  base {res['base_seconds']:.4f}  ours x{res['paired_ours_vs_base']} (paired)")
        continue
    if r["benchmark"] == "predict_dtypes":  # this tree's map: float32 (default) against the opt-in bf16
        sp = r["speedup"]
        print(f"{'predict':<11}{'32/bf16':<8}{r['image_size']:>3}{'':>8}  fp32 {r['results']['fp32']['seconds']:.4f}"
              f"  bf16 {r['results']['bf16']['seconds']:.4f}  bf16 x{sp['paired_bf16_vs_fp32']} (paired), labels "
              f"{r['label_agreement_percent']} % equal, max prob diff {r['max_prob_diff']}")
        continue
    for name, res in r["results"].items():
        if "error" in res:
            print(f"{r['benchmark']:<11}{r['precision']:<6}{r['image_size']:>5}{str(r['compile']):>8}  {name:<8}  {res['error'][:60]}")
            continue
        ratio = r["speedup"].get(f"ours_vs_{name}", "")
        paired = r["speedup"].get(f"paired_ours_vs_{name}")
        ratio = f"{ratio} (paired {paired})" if paired else ratio
        print(f"{r['benchmark']:<11}{r['precision']:<6}{r['image_size']:>5}{str(r['compile']):>8}  {name:<8}"
              f"{res['seconds']:>9.4f}{res['images_per_second']:>9.1f}{res['peak_memory_gib'] or 0:>7.2f}  "
              f"{'ours x' + str(ratio) if ratio else ''}")
EOF
