#!/usr/bin/env bash
# The accelerator path on one CUDA GPU in under 8 minutes, self-checking: real-width VAE + DiT with random
# weights, encode generated 29x480x640 clips in bf16, train 5 steps at TP=1 on NCCL with a checkpoint and a
# resume (one checkpoint kept), sample 2 steps; prints the SDPA kernel used, warm step time, MFU (model FLOPs)
# with HFU beside it and peak memory beside the dry run's prediction. Exit 0 = every step passed its check ("SMOKE OK").
#
#   bash bench/gpu/smoke.sh [OUT_DIR]            # needs a CUDA torch in .venv (make setup VENV_ARGS=--system-site-packages)
#   bash bench/gpu/smoke.sh OUT_DIR --device cpu --tiny    # the CPU rehearsal of the same steps
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/osp-smoke}
shift || true
# OUT must be new, empty, or an earlier smoke's folder (smoke.py refuses anything else; nothing is deleted here)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec timeout 480 "$PY" bench/gpu/smoke.py --out "$OUT" "$@"
