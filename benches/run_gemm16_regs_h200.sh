#!/usr/bin/env bash
# One device call for kernels/gemm16_regs_gluon.py on the H200: the probe, one configuration
# set per process (a fault ends its process's CUDA context, not the next set's), then Nsight
# Compute on the configurations that passed. Outputs under $OUT.
#   OUT=DIR bash benches/run_gemm16_regs_h200.sh "f128s4,f64s3" "f128s4x" ...   (probe_gemm16_regs.parse)
set -u
cd "$(dirname "$0")"
export PYTHONPATH=$PWD/../python PYTHONUNBUFFERED=1
SHAPES=${SHAPES:-14336x4096,8192x8192,4096x4096}
ROWS=${ROWS:-256,128}
DTYPE=${DTYPE:-bf16}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ok=()
for cfgs in "$@"; do
    echo "=== $cfgs"
    dir=$OUT/${DTYPE}_${cfgs//,/_}
    mkdir -p "$dir"
    OUT=$dir timeout 200 python3 probe_gemm16_regs.py --rows "$ROWS" --shapes "$SHAPES" \
        --configs "$cfgs" --repeat 2 --dtype "$DTYPE" 2>&1 | grep -v "^\s*$" | tail -30
    if grep -q -- "-> ok" "$dir/probe_gemm16_regs.txt" 2>/dev/null; then ok+=("$cfgs"); fi
done
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null && [ ${#ok[@]} -gt 0 ]; then
    first=${ok[0]%%,*}
    echo "=== ncu $first"
    timeout 150 ncu --clock-control none -k regex:gemm16_regs -c 2 --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section MemoryWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" python3 probe_gemm16_regs.py --ncu --rows 256 \
        --shapes 14336x4096 --configs "$first" > "$OUT/ncu.txt" 2>&1
    grep -v "^==PROF==" "$OUT/ncu.txt" | tail -120
fi
