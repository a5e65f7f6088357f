#!/usr/bin/env bash
# Every GPU measurement of issue 16 in one short run, for a session that is lent a GPU for minutes:
#   1. benchmarks/gpu_check.py          correctness against the CPU, host synchronisations, loop overhead;
#   2. benchmarks/snapshot_scale.py     per-matrix snapshot kernels on the device, 1B / 8B / 70B layer shapes;
#   3. benchmarks/smollm2_trainer_overhead.py   SmolLM2-135M's architecture with the HF Trainer on CUDA.
# Each part has its own time limit, so one that hangs leaves the others' results. JSON and logs go to $1
# (default: ./gpu-results). PARTS names the parts to run (default: all three); GPU_CHECK_ARGS adds arguments to
# gpu_check.py. Usage: [PARTS="gpu_check smollm2_cuda"] bash benchmarks/gpu_session.sh OUT_FOLDER
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())" \
  2>&1 | tee "$out/env.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/env.log"
status=0
parts=" ${PARTS:-gpu_check snapshot_scale smollm2_cuda} "
part() {  # part SECONDS NAME COMMAND...: run with a limit, log to $out/NAME.log, remember a failure
  local limit=$1 name=$2; shift 2
  [[ $parts == *" $name "* ]] || return 0
  echo "== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== $name: exit $rc"; status=1; }
}
part 200 gpu_check python3 benchmarks/gpu_check.py --json "$out/gpu_check.json" ${GPU_CHECK_ARGS:-}
part 150 snapshot_scale python3 benchmarks/snapshot_scale.py --device cuda --json "$out/snapshot_scale_cuda.json"
part 180 smollm2_cuda python3 benchmarks/smollm2_trainer_overhead.py --device cuda --random-weights --steps 200 \
  --batch 8 --seq 256 --order baseline,stats,defaults,baseline --json "$out/smollm2_cuda.json"
exit $status
