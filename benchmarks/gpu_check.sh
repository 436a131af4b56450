#!/usr/bin/env bash
# The GPU check: on a lent GPU machine (no network, one command of at most 600 s, up to 8 files back from
# $OUT), build mdlm-ctc from this tree, measure the SPEC §6 rows G1-G4 with every provider present, run
# the GPU tests, the Triton chunk-length sweep and the static CUDA report, all within a budget, every
# row streamed to $OUT/rows.jsonl as it is measured and $OUT/report.md rendered from the rows.
#
#   bash benchmarks/gpu_prep.sh                      # first, here: provenance + wheels (see README)
#   bash benchmarks/gpu_check.sh                     # there: budget 480 s
#   bash benchmarks/gpu_check.sh --dry-run --budget 60   # a CPU machine: tiny shapes (CI runs this)
#
# Everything is benchmarks/gpu_run.py (its --help says how steps are sliced, killed and resumed). Exit
# status: the number of steps that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_run.py "$@"
