#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent GPU machine (its python3 holds torch, transformers,
# accelerate and pytest; nothing else is needed): the GPU tests (every method's Triton kernels against the CPU
# engine, a live model split between GPU and CPU), then the merge benchmark's GPU tables with one candidate per
# method profiled. Each step has its own time limit, so one slow step leaves the others their time.
#
#     OUT=/tmp/gpu-checks bash experiments/gpu_checks.sh      # log and tables in $OUT
set -uo pipefail
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi -L
    python3 -c "import torch, transformers, accelerate as a; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', a.__version__)"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_prepared_methods.py tests/test_engine.py -k gpu
    timeout 200 python3 experiments/bench_merge.py --device cuda --work /tmp/gpu-bench --name bench_merge_gpu --profile
    timeout 140 python3 experiments/bench_merge.py --device cuda --shape smol-1.7b --dtype bfloat16 --skip-oneshot \
        --work /tmp/gpu-bench --name bench_merge_gpu_1.7b
} 2>&1 | tee "$out/gpu_checks.log"
cp results/bench_merge_gpu*.md results/bench_merge_gpu*.json results/bench_merge_gpu*.png "$out"/
