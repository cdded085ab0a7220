#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one go (about 7 minutes on an H100):
# the CUDA tests, OPT (float16) and Flan-T5 (bfloat16) side by side with
# transformers at batch 1, 8, 32 and 256 (COMPARE adds ours-int8,ours-int4), then the open questions'
# A/B (AB: sections of scripts/gpu_ab.py, default where a batch of images stalls; empty: none) and where Flan-T5's
# and then OPT's time goes at batch 256. Logs and raw JSON go to OUTDIR; each step has a time limit, and the whole
# run stops starting steps after BUDGET seconds (default 540).
#
#     bash scripts/gpu_bench.sh OUTDIR
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
dir=${BLIP2_BENCH_DIR:-/tmp/blip2-bench}
end=$((SECONDS + ${BUDGET:-540}))

run() {  # name, time limit (s), command...
    local name=$1 limit=$2 left=$((end - SECONDS)) start=$SECONDS
    shift 2
    ((left < limit)) && limit=$left
    ((limit < 10)) && { echo "== $name: skipped (out of time)"; return; }
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    echo "== $name: rc=$? in $((SECONDS - start)) s (limit $limit)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run cuda_tests 120 python3 -m pytest -q -m cuda tests/test_cuda.py
tail -3 "$out/cuda_tests.log"
run make 120 blip2 bench make --model opt-2.7b --dir "$dir"
run bench_opt 200 blip2 bench run --model opt-2.7b --device cuda --dtype float16 --repeat 1 \
    --batches 8,32,256 --compare "${COMPARE:-transformers}" --dir "$dir" --json "$out/bench_opt.json"
grep '^|' "$out/bench_opt.log"
[[ -n ${AB-stall} ]] && run ab 90 python3 scripts/gpu_ab.py --model "$dir/opt-2.7b" --only "${AB-stall}" --json "$out/ab.json"
[[ -n ${AB-stall} ]] && grep -E '"(prep_encode_s|done_s|no_pinned_memory_s|chunks_of_64_s)"' "$out/ab.log"
mv "$dir/opt-2.7b" "$dir/opt-2.7b.later"
run make 120 blip2 bench make --model flan-t5-xl --dir "$dir"
run bench_t5 150 blip2 bench run --model flan-t5-xl --device cuda --dtype bfloat16 --repeat 1 \
    --batches 8,32,256 --dir "$dir" --json "$out/bench_t5.json"
grep '^|' "$out/bench_t5.log"
run profile_t5 90 python3 scripts/gpu_profile.py --model "$dir/flan-t5-xl" --dtype bfloat16 --batch 256 \
    --json "$out/profile_t5.json"
run profile_opt 90 python3 scripts/gpu_profile.py --model "$dir/opt-2.7b.later" --dtype float16 --batch 256 \
    --json "$out/profile_opt.json"
