#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (no network, its own python with a CUDA torch):
# the GPU check, the compile / CUDA-graph bench, the serving round trip with the real openpi-client
# and the libgomp thread probe, each under its own time limit, every output under $OUT (default
# runs/gpu_round). At most 560 s of steps: run it with the device tool's timeout_s=600.
#
#   make gpu-wheels                      # here, before: .gpu_wheels/ (websockets, msgpack, openpi-client, ...)
#   OUT=$OUT bash scripts/gpu_round.sh   # there: the device tool's run, with carry [".gpu_wheels"]
#
# The wheels are unpacked into a folder on PYTHONPATH (a wheel is a zip of its installed files), so
# neither pip nor a venv is needed there. DEVICE=cpu QUICK=1 runs the same steps on tiny sizes on CPU
# (tests/test_gpu_round.py). A step that fails is recorded in $OUT/steps.txt and the next one runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_round}
PY=${GPU_PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
CLIENT_PYTHON=${CLIENT_PYTHON:-$PY}  # a python that imports openpi_client (after the unpacking below)
mkdir -p "$OUT"
SITE=$(mktemp -d /tmp/fmpolicy_gpu_site.XXXXXX)
# only what the machine's python cannot import already (its own packages are not shadowed)
"$PY" - "$SITE" .gpu_wheels/*.whl <<'UNPACK'
import importlib.util, sys, zipfile
site, wheels = sys.argv[1], [w for w in sys.argv[2:] if w.endswith(".whl")]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        tops = [n for n in z.namelist() if n.endswith(".dist-info/top_level.txt")]
        names = z.read(tops[0]).decode().split() if tops else []
        names = names or sorted({n.split("/")[0].removesuffix(".py") for n in z.namelist()
                                 if not n.split("/")[0].endswith((".dist-info", ".data"))})
        if names and all(importlib.util.find_spec(m) is not None for m in names):
            print(f"{wheel}: {names} already importable, skipped")
        else:
            z.extractall(site)
            print(f"{wheel}: unpacked ({names})")
UNPACK
mkdir -p .gpu_path && ln -sfn ../envs .gpu_path/fmpolicy_envs
export PYTHONPATH="$PWD:$PWD/.gpu_path:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...: run it, its output to $OUT/NAME.txt, its status to steps.txt
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit: $*" | tee -a "$OUT/steps.txt"
}

date -u +"%Y-%m-%dT%H:%M:%SZ" > "$OUT/steps.txt"
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
    >> "$OUT/steps.txt" 2>&1
if [ -n "$QUICK" ]; then
    step gpu_check 300 "$PY" scripts/gpu_check.py --device "$DEVICE" --quick --out "$OUT/gpu_check.json"
    step bench 300 "$PY" scripts/bench.py --device "$DEVICE" --quick --only chunk --json
    step serving 300 "$PY" scripts/bench_serving.py --device "$DEVICE" --clients 1,2 --requests 5 --warmup 1 \
        --modes window,protocol --client-python "$CLIENT_PYTHON" --out "$OUT/serving.json"
    step thread_probe 120 "$PY" scripts/thread_probe.py --calls 50 --chunks 2 --json
else
    step gpu_check 160 "$PY" scripts/gpu_check.py --device "$DEVICE" --cap 150 --out "$OUT/gpu_check.json"
    step bench_graphs 110 "$PY" scripts/bench.py --device "$DEVICE" --only cuda_graph --json
    step bench_compile 140 "$PY" scripts/bench.py --device "$DEVICE" --only compile --json
    step serving 110 "$PY" scripts/bench_serving.py --device "$DEVICE" --cuda-graphs --clients 1,2,4 \
        --requests 100 --modes off,window,protocol --client-python "$CLIENT_PYTHON" --out "$OUT/serving.json"
    step thread_probe 40 "$PY" scripts/thread_probe.py --json
fi
rm -rf "$SITE"
