#!/usr/bin/env bash
# Run pma-train (or pma-merge / pma-plan / any of our console scripts) under torchrun, on one node or
# as one node of a multi-node job. Hydra overrides are passed through exactly as given.
#
#   launch/torchrun.sh [COMMAND] [key=value ...]        COMMAND: pma-train (default), pma-merge, ...
#
# One node, every visible GPU (one process on a host without GPUs):
#   launch/torchrun.sh model=tiny train.iters=100
#   NPROC_PER_NODE=2 launch/torchrun.sh parallel.tp=2 'run.name=tp2 run'
#   launch/torchrun.sh pma-merge root=ckpt/run1 n=10 method=sma output=ckpt/run1-pma
# Several nodes: the same command on every node, each with its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 MASTER_PORT=29500 launch/torchrun.sh model=dense_411m ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node001 MASTER_PORT=29500 launch/torchrun.sh model=dense_411m ...
#
# Environment (defaults in brackets):
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500; on a single node without
#   MASTER_PORT, torchrun --standalone picks a free port], NPROC_PER_NODE or GPUS_PER_NODE [the GPUs in
#   CUDA_VISIBLE_DEVICES, else those nvidia-smi lists, else 1], TORCHRUN_ARGS [extra torchrun options,
#   split on spaces, e.g. "--max-restarts=1"], PYTHON [the python next to COMMAND, else python3].
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

cmd=pma-train
# A first argument that is not an override (key=value, +key=..., ~key) or an option is the command.
if [[ $# -gt 0 && $1 != *=* && $1 != -* && $1 != +* && $1 != "~"* ]]; then
    cmd=$1
    shift
fi
if [[ $cmd == */* ]]; then
    exe=$cmd
elif exe=$(command -v "$cmd"); then
    :
elif [[ -x $here/../.venv/bin/$cmd ]]; then
    exe=$here/../.venv/bin/$cmd
else
    echo "torchrun.sh: '$cmd' not found on PATH (activate the environment pma-train is installed in)" >&2
    exit 127
fi
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(dirname "$exe")/python
    [[ -x $PYTHON ]] || PYTHON=python3
fi

nproc=${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}
if [[ -z $nproc ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
        nproc=${#devices[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ ${nproc:-0} -gt 0 ]] || nproc=1
fi

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
if [[ $nnodes == 1 && -z ${MASTER_PORT:-} ]]; then
    rendezvous=(--standalone)
    where="standalone"
else
    if [[ $nnodes != 1 && -z ${MASTER_ADDR:-} ]]; then
        echo "torchrun.sh: NNODES=$nnodes needs MASTER_ADDR (the address of the node with NODE_RANK=0)" >&2
        exit 2
    fi
    rendezvous=(--nnodes="$nnodes" --node-rank="$node_rank"
                --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}")
    where="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
fi
read -ra extra <<<"${TORCHRUN_ARGS:-}"

echo "torchrun.sh: node $node_rank of $nnodes, $nproc process(es) per node, rendezvous $where: $cmd$(printf ' %q' "$@")" >&2
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node="$nproc" ${extra[@]+"${extra[@]}"} \
    "$exe" "$@"
