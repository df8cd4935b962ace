#!/usr/bin/env bash
# Everything a GPU session measures, in ONE call of the device tool (its machines start bare, each start
# costs minutes of a 30-minute budget, and one call may run 10 minutes). Run from the repository root on the
# GPU machine, with `.whl` (wheels the machine lacks, e.g. omegaconf and a cp312 torchcodec) and `.benchdata`
# (the converted bench set) carried:
#
#   bash scripts/device_session.sh "$OUT" [quick]
#
# Prepare here first:
#   python scripts/make_bench_images.py --out /tmp/bench_imgs --n 600 && \
#     fastssl-convert /tmp/bench_imgs .benchdata/imgs     # ~33 MB, under the 64 MiB a call carries
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl omegaconf==2.4.0 'torchcodec==0.16.*'       # torchcodec 0.16 matches the machine's torch 2.11
#
# DALI (~300 MB of wheels: nvidia-dali-cuda130, nvidia-nvimgcodec-cu13, nvidia-libnvcomp-cu13 and small pure-Python
# deps) does not fit the 64 MiB one call carries, and its GPU pipeline has never run. A machine keeps /tmp while
# it is warm (30 s idle), so bring it in pieces, calls back to back:
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#            -d /tmp/daliwhl nvidia-dali-cuda130==2.4.0 'nvidia-nvimgcodec-cu13[all]<0.10' \
#            nvidia-libnvcomp-cu13==5.3.0.16 astunparse gast optree nvtx makefun 'libcst~=1.8'
#          tar cf - -C /tmp/daliwhl . | split -b 60M - /tmp/dali.tar.part   # then per part N:
#          rm -rf .carry && mkdir .carry && cp /tmp/dali.tar.partN .carry/   (.carry ignored via .git/info/exclude)
#   there: each call, carry [".carry"]:  mkdir -p /tmp/parts && cp .carry/* /tmp/parts/
#          last call: cat /tmp/parts/dali.tar.part* | tar xf - -C /tmp/dwhl && python3 -m pip install -q \
#            --no-index --no-deps --target /tmp/site /tmp/dwhl/*.whl   (then this script: its pytest step runs
#            test_dali_loader's CUDA test, and bench_loader.py --device cuda measures dali against torch)
#
# Writes into OUT: gpu_tests.txt, profile.txt, bench_train_<decoder>.{json,png,txt}. Steps keep going when
# one fails; the exit status is the number of failed steps.
set -uo pipefail
out=${1:?usage: device_session.sh OUT [quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
failed=0
step() {  # step NAME LOGFILE COMMAND...: run, keep the log, count a failure
    local name=$1 log=$2
    shift 2
    printf '\n=== %s: %s\n' "$name" "$*"
    "$@" 2>&1 | grep --line-buffered -v ' it/s\]' | tee "$log"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        printf '=== %s FAILED (exit %d)\n' "$name" "$rc"
        failed=$((failed + 1))
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/machine.txt"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' \
    | tee -a "$out/machine.txt"
nproc | sed 's/^/cpus /' | tee -a "$out/machine.txt"

step "GPU tests" "$out/gpu_tests.txt" python3 -m pytest -q -m gpu tests
step "device-decode profile" "$out/profile.txt" python3 scripts/profile_device_decode.py --batches 8
[[ $quick == quick ]] && exit "$failed"

workers=$(($(nproc) - 2))
common=(--method swav --config swav_resnet50_imagenet --window 5 --repeats 2 --workers $((workers + 1))
        data.path=.benchdata/imgs train.batch_size=128 "data.num_workers=$workers" data.cache=none
        data.decode=device)
reference=()
for decoder in torchcodec torchvision; do
    step "bench_train ($decoder)" "$out/bench_train_$decoder.txt" env FASTSSL_JPEG_DECODER=$decoder \
        python3 scripts/bench_train.py "${reference[@]}" --json "$out/bench_train_$decoder.json" \
        --plot "$out/bench_train_$decoder.png" "${common[@]}"
    reference=(--skip-reference)  # the reference loop runs once, beside the first decoder
done
exit "$failed"
