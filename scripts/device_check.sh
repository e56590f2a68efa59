#!/usr/bin/env bash
# Run on the GPU machine (the `device` tool), from the repository root: the device check of
# scripts/device_check.py, results in $OUT (or ./device_out). Needs torch with CUDA and transformers there.
set -euo pipefail
out="${OUT:-device_out}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia_smi.txt" 2>&1 || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 scripts/device_check.py --out "$out" 2>&1 | tee "$out/device_check.log"
