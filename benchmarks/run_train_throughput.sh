#!/usr/bin/env bash
# The cases of benchmarks/results/train_throughput.md. On a 2-core machine: 2 threads for one
# rank, 1 thread per rank for two. Extra arguments go to every case (e.g. --rounds 10).
# Takes about 12 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BENCH=benchmarks/train_throughput.py
LARGER=(model.name=h256x4 model.hidden_size=256 model.ffn_hidden_size=704 model.num_layers=4)

# 1 rank: tiny (the default), tiny with the bare loop reading its batches live, a larger model
OMP_NUM_THREADS=2 "$PY" "$BENCH" --fresh "$@"
OMP_NUM_THREADS=2 "$PY" "$BENCH" --bare-data live --label tiny-tp1-pp1-dp1-live "$@"
OMP_NUM_THREADS=2 "$PY" "$BENCH" --label h256x4-tp1-pp1-dp1 --rounds 40 "$@" "${LARGER[@]}"
# 2 ranks: tensor parallel (+ sequence parallel), data parallel (distributed optimizer)
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 "$BENCH" --tp 2 "$@"
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 "$BENCH" "$@"
# MoE (tiny_moe, 4 experts top-2): 1 rank; 2 ranks with experts replicated (EP=1, DP=2) and split (EP=2)
OMP_NUM_THREADS=2 "$PY" "$BENCH" --model tiny_moe "$@"
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 "$BENCH" --model tiny_moe "$@"
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc-per-node 2 "$BENCH" --model tiny_moe --label tiny_moe-ep2-dp2 "$@" parallel.ep=2
