#!/usr/bin/env bash
# The one command of a GPU session (issue 15): every GPU check of the CuPy backend, run from
# this checkout (no install, no network), results under $OUT (the device tool's output folder)
# or the folder given first. Options go to `gpu_report.py run` (see its --help), e.g.
#   bash tools/gpu_run.sh --commit 0123abc --budget 480
#   bash tools/gpu_run.sh --steps smoke,gpu-tests          # a rerun of what failed
# Steps, time limits and output files: tools/gpu_report.py; docs/gpu-validation.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
if [[ $# -gt 0 && "$1" != -* ]]; then
  out="$1"
  shift
fi
mkdir -p "$out"
exec "${PYTHON:-python3}" tools/gpu_report.py run --out "$out" "$@"
