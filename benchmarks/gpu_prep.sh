#!/usr/bin/env bash
# Before a GPU call, on the development machine (git and PyPI here, neither there): write
# .gpu_check/provenance.json (commit, dirty flag, the hash of every file that travels) and download the
# pure-Python wheels of the G4 yardsticks (liger-kernel, cut-cross-entropy; setuptools >= 64 in case the
# image's is older) into wheelhouse/. Both folders are git-ignored and travel as the call's carry list.
#
#   bash benchmarks/gpu_prep.sh                          # before the first call
#   bash benchmarks/gpu_prep.sh --resume path/rows.jsonl # before a second call: skip the rows already measured
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_run.py prep "$@"
