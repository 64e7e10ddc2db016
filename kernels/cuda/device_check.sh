#!/usr/bin/env bash
# Issue 6's GPU checks on a lent device, in two steps.
#   here:   bash kernels/cuda/device_check.sh build
#           (test binaries and the sae-trainer binary into device-bin/, ignored by git)
#   device: run(command="bash kernels/cuda/device_check.sh run", carry=["device-bin"])
#           with SAELens's step times: first `bash benches/saelens_wheels.sh` here, then
#           carry=["device-bin", ".whl"].
# On the device a missing GPU or NVRTC is a failure, not a skip; logs go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    # A target dir of its own: one shared with other clones (CI's) can hold a binary
    # built from their sources that cargo still calls fresh here.
    export CARGO_TARGET_DIR="$HOME/.cache/saestream-device-target"
    exe() { # TARGET cargo-args... -> the executable cargo built for target TARGET
        local target=$1
        shift
        cargo "$@" --message-format=json 2>/dev/null | TARGET=$target python3 -c 'import json,os,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == os.environ["TARGET"]:
        print(m["executable"])'
    }
    rm -rf device-bin && mkdir -p device-bin
    cp "$(exe cuda test -p kernels --features cuda --test cuda --no-run)" device-bin/cuda-tests
    cp "$(exe cuda_step test -p sae-trainer --features cuda --test cuda_step --no-run)" device-bin/cuda-step-tests
    cp "$(exe sae-trainer build -p sae-trainer --features cuda --bin sae-trainer)" device-bin/sae-trainer
    # Debug info is most of their size; the carry limit is 64 MiB in all.
    strip --strip-debug device-bin/*
    du -ch device-bin/* | tail -1
    ;;
run)
    out="${OUT:-/tmp}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    # cudarc opens libnvrtc.so / libcublas.so (or .so.12): point those names at the
    # image's CUDA libraries, whatever their major version.
    mkdir -p /tmp/cudalibs
    for lib in nvrtc cublas; do
        f=$(find /usr/local/cuda*/ /opt /usr/lib -name "lib$lib.so*" 2>/dev/null | grep -v alt | sort | head -1 || true)
        if [ -n "$f" ]; then
            ln -sf "$f" "/tmp/cudalibs/lib$lib.so"
            export LD_LIBRARY_PATH="$(dirname "$f"):${LD_LIBRARY_PATH:-}"
            echo "lib$lib: $f"
        fi
    done
    export LD_LIBRARY_PATH="/tmp/cudalibs:${LD_LIBRARY_PATH:-}"
    export SAESTREAM_REQUIRE_NVRTC=1 SAESTREAM_REQUIRE_CUDA=1
    rc=0
    # Each step has its own time limit, so that a hang costs one step, not the call.
    timeout 150 device-bin/cuda-tests --test-threads 1 > "$out/cuda-tests.log" 2>&1 || rc=1
    tail -25 "$out/cuda-tests.log"
    timeout 120 device-bin/cuda-step-tests --test-threads 1 > "$out/cuda-step-tests.log" 2>&1 || rc=1
    tail -8 "$out/cuda-step-tests.log"
    # The bench table: ours, then SAELens's own step on the same shapes and GPU.
    for f in benches/gpu/*.yaml; do
        timeout 60 device-bin/sae-trainer bench --config "$f" --device cuda --steps 10 --warmup 3 \
            | tee -a "$out/bench.jsonl" || rc=1
    done
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    fi
    if python3 -c 'import sae_lens' 2>/dev/null; then
        for s in "standard 768 24576 4096" "topk 768 24576 4096" \
            "standard 2304 65536 16384" "topk 2304 65536 16384"; do
            set -- $s
            timeout 60 python3 benches/saelens_step.py --arch "$1" --d-in "$2" --d-sae "$3" --k 32 \
                --batch "$4" --device cuda | tee -a "$out/saelens.jsonl" || rc=1
        done
    else
        echo "SAELens is not importable here: carry its wheels in .whl for its step times"
    fi
    # The README's training run on the GPU against the same run on the CPU: the final
    # losses agree up to the drift that rounding (summation order, near-tied top-k picks)
    # builds over 152 steps: 2e-2 relative.
    cp tests/fixtures/tiny-acts/tiny-topk.yaml /tmp/tiny-topk-cuda.yaml && echo "device: cuda" >> /tmp/tiny-topk-cuda.yaml
    acts=tests/fixtures/tiny-acts/tiny-gpt2.blocks.1.hook_resid_pre.safetensors
    timeout 60 device-bin/sae-trainer train --config tests/fixtures/tiny-acts/tiny-topk.yaml --activations $acts \
        --output /tmp/run-cpu --overwrite > "$out/train-cpu.json" || rc=1
    timeout 60 device-bin/sae-trainer train --config /tmp/tiny-topk-cuda.yaml --activations $acts \
        --output /tmp/run-cuda --overwrite > "$out/train-cuda.json" || rc=1
    python3 -c 'import json,sys
a, b = (json.load(open(f))["final_loss"] for f in sys.argv[1:])
print(f"train final_loss cpu {a} cuda {b}")
sys.exit(abs(a - b) > 2e-2 * abs(a))' "$out/train-cpu.json" "$out/train-cuda.json" || rc=1
    exit "$rc"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
