#!/usr/bin/env bash
# The CUDA kernel tests on a lent GPU, in two steps.
#   here:   bash kernels/cuda/device_check.sh build   (test binary into device-bin/, ignored by git)
#   device: run(command="bash kernels/cuda/device_check.sh run", carry=["device-bin"])
# On the device a missing GPU or NVRTC is a failure, not a skip; the log goes to $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    # A target dir of its own: one shared with other clones (CI's) can hold a binary
    # built from their sources that cargo still calls fresh here.
    export CARGO_TARGET_DIR="$HOME/.cache/saestream-device-target"
    bin=$(cargo test -p kernels --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    mkdir -p device-bin && cp "$bin" device-bin/cuda-tests && echo "device-bin/cuda-tests from $bin"
    ;;
run)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    # NVRTC: the CUDA install's, else the one PyTorch's wheels bring.
    lib=$(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
    export LD_LIBRARY_PATH="${lib:+$lib:}${LD_LIBRARY_PATH:-}"
    out="${OUT:-/tmp}"
    SAESTREAM_REQUIRE_NVRTC=1 SAESTREAM_REQUIRE_CUDA=1 device-bin/cuda-tests --test-threads 1 \
        > "$out/cuda-tests.log" 2>&1 && rc=0 || rc=$?
    tail -40 "$out/cuda-tests.log"
    exit "$rc"
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
