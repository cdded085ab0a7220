#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one go, for a lent GPU (about 6 minutes on an H100):
# parity on CUDA, where the time goes (profile), then OPT (float16) and Flan-T5 (bfloat16) side by
# side with transformers at batch 1, 8, 32 and 256. Logs and raw JSON go to OUTDIR.
#
#     bash scripts/gpu_bench.sh OUTDIR
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
dir=${BLIP2_BENCH_DIR:-/tmp/blip2-bench}

run() {  # name, time limit (s), command...
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "== $name: rc=$? in $(($(date +%s) - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run cuda_check 150 python3 scripts/cuda_check.py
grep -o '"check": "[^"]*"[^}]*"ok": [a-z]*' "$out/cuda_check.log" | sed 's/"relative_error": [^,]*, //'
run make 120 python3 -m blip2.bench make --model opt-2.7b --dir "$dir"
run profile 150 python3 scripts/gpu_profile.py --model "$dir/opt-2.7b" --dtype float16 --batch 256 \
    --json "$out/profile_opt.json"
run bench_opt 300 python3 -m blip2.bench run --model opt-2.7b --device cuda --dtype float16 --repeat 1 \
    --batches 8,32,256 --dir "$dir" --json "$out/bench_opt.json"
grep '^|' "$out/bench_opt.log"
rm -rf "$dir/opt-2.7b"
run make 120 python3 -m blip2.bench make --model flan-t5-xl --dir "$dir"
run bench_t5 300 python3 -m blip2.bench run --model flan-t5-xl --device cuda --dtype bfloat16 --repeat 1 \
    --batches 8,32,256 --dir "$dir" --json "$out/bench_t5.json"
grep '^|' "$out/bench_t5.log"
