#!/usr/bin/env bash
# GPU checks for a lent GPU machine, as one prepared call (about 3 minutes).
#
# The machine has python3 with torch, cupy and numpy but no network. faiss-cpu
# and hypothesis travel as wheels in .whl/ (git-ignored), made on the dev box:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl faiss-cpu==1.13.2 hypothesis sortedcontainers attrs
# then, through the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
#
# What it checks: the cupy kernels and torch's CUDA GEMM path give the same labels
# and distances as numpy (tests), their speed against faiss on the same data, and a
# k-means fit on the GPU backends, the stage actors' GPU paths against the CPU
# (benchmarks/gpu_stages.py), and `actclust run` end to end (extraction, clustering,
# evaluation on GPU actors) on tiny:llama and on the embedded model. The
# end-to-end runs need ray, transformers, pyarrow, pyyaml and safetensors on the
# machine (or as wheels in .whl/); without them they are reported as not run.
# Results land in $OUT (or /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, torch.cuda.is_available(), 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"

status=0
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_hamming.py tests/test_scored.py tests/test_kmeans.py \
    2>&1 | tee "$OUT/tests.log" || status=1
# Paper scale: Mistral-7B's d_ff = 14336, many masks, thousands of centroids.
timeout 240 python3 benchmarks/hamming_assign.py --n 200000 --k 4096 --d 14336 --repeats 3 \
    --backends cupy,torch 2>&1 | tee "$OUT/assign_paper_scale.log" || status=1
timeout 120 python3 benchmarks/hamming_assign.py --repeats 5 2>&1 | tee "$OUT/assign_default.log" || status=1
timeout 120 python3 benchmarks/kmeans_fit.py --skip-kmodes --n 200000 --k 1024 --seeds 1 \
    2>&1 | tee "$OUT/kmeans.log" || status=1
# The stage actors' GPU paths in one process (no Ray needed): extraction, k-means and
# evaluation on CUDA against the CPU on the same windows.
timeout 300 python3 benchmarks/gpu_stages.py --models tiny:llama,tiny:opt 2>&1 \
    | tee "$OUT/stages.log" || status=1
# End to end through Ray: extraction, clustering and evaluation actors each take a GPU.
if python3 -c "import ray, transformers, pyarrow, yaml, safetensors" 2>/dev/null; then
    for model in tiny:llama embedded:smollm2-135m; do
        name=${model//[:]/_}
        printf 'k: [16]\ntheta: [0.5]\nseq_len: 64\nmax_tokens: 4096\neval_max_tokens: 1024\nworkers: 1\n' \
            > "$OUT/run_$name.yaml"
        timeout 300 python3 -m actclust run --config "$OUT/run_$name.yaml" --model "$model" \
            --out "/tmp/gpu_run_$name" 2>&1 | tee "$OUT/run_$name.log" || status=1
        cp "/tmp/gpu_run_$name/results.csv" "$OUT/run_$name.csv" 2>/dev/null || status=1
    done
else
    echo "actclust run not checked end to end: ray, transformers, pyarrow, pyyaml or" \
        "safetensors missing (carry them as wheels in .whl/)" | tee "$OUT/run_skipped.txt"
fi
timeout 240 python3 benchmarks/sparse_ffn.py --device cuda --dtypes bfloat16 --dims 4096x14336 --prefill-dims 4096x14336 --skip-e2e --calls 50 2>&1 | tee "$OUT/sparse_ffn.log" || status=1
exit $status
