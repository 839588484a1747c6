#!/usr/bin/env bash
# GPU acceptance: run on the first GPU machine available, from the repo root.
#
#   bash benchmarks/gpu_acceptance.sh [OUT_DIR]
#
# Each check prints PASS / FAIL / SKIP (with the reason) into OUT_DIR/gpu_acceptance.md; the logs of
# every step go to OUT_DIR/gpu_acceptance.log. Checks that need Transformer Engine report SKIP when
# megatron-core cannot use TE. On a host without the Python packages, the offline kit is installed
# first (wheels in .gpukit/: megatron-core, hydra-core, omegaconf, antlr4 runtime).
set -u
OUT=${1:-${OUT:-gpu-acceptance}}
mkdir -p "$OUT"
TABLE=$OUT/gpu_acceptance.md
LOG=$OUT/gpu_acceptance.log
WORK=$(mktemp -d /tmp/pma-gpu-XXXX)
: >"$LOG"
if [ -d .gpukit ] && ls .gpukit/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .gpukit/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=$PWD:$WORK/site
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONWARNINGS=ignore
PY=python3
TRAIN="$PY -m pma_train.cli.train logging.progress_bar=false logging.wandb.mode=disabled"
echo "| check | result | figures / reason |" >"$TABLE"
echo "|---|---|---|" >>"$TABLE"

row() { echo "| $1 | $2 | $3 |" >>"$TABLE"; echo "== $1: $2 $3" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log everything; returns the command's status
    local name=$1 limit=$2; shift 2
    echo "---- $name: $*" >>"$LOG"
    timeout "$limit" bash -c "$*" >"$WORK/$name.log" 2>&1
    local status=$?
    cat "$WORK/$name.log" >>"$LOG"
    return $status
}
metric() {  # metric RUN_DIR KIND KEY: the last value of KEY in records of KIND
    $PY - "$1" "$2" "$3" <<'EOF'
import json, sys
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
vals = [r[sys.argv[3]] for r in rows if r.get("kind") == sys.argv[2] and sys.argv[3] in r]
print(vals[-1] if vals else "none")
EOF
}
losses() {  # losses RUN_DIR: the train-loss history, one "step loss" per line
    $PY - "$1" <<'EOF'
import sys
from pma_train.metrics import read_metrics
for r in read_metrics(sys.argv[1] + "/metrics.jsonl", "train"):
    print(r["step"], repr(r["loss"]))
EOF
}

# 1. environment
step env 120 "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY - <<'EOF'
import torch
print('torch', torch.__version__, 'cuda build', torch.version.cuda, 'available', torch.cuda.is_available())
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import transformer_engine  # noqa: F401
    print('transformer_engine import: ok')
except Exception as err:
    print('transformer_engine import:', type(err).__name__)
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER
import megatron.core
print('megatron-core', megatron.core.__version__, 'HAVE_TE', HAVE_TE, 'torch optimizer', USING_PYTORCH_OPTIMIZER)
EOF"
HAVE_TE=$($PY -c "from megatron.core.extensions.transformer_engine import HAVE_TE; print(HAVE_TE)" 2>/dev/null)
row environment "$(grep -q 'available True' "$WORK/env.log" && echo PASS || echo FAIL)" "$(grep -E '^(device|torch |megatron-core)' "$WORK/env.log" | tr '\n' ';')"

# 2. tiny and tiny_moe on one GPU (bf16 by default there): banner, loss finite and falling
for model in tiny tiny_moe; do
    run=$WORK/$model
    if step "$model" 240 "$TRAIN model=$model run.dir=$run train.iters=40 checkpoint.interval=10 train.eval_interval=20 train.log_interval=10"; then
        banner=$(grep -m1 "^pma-train:" "$WORK/$model.log" | grep -o "cuda/nccl" || true)
        first=$($PY -c "import json;r=[json.loads(l) for l in open('$run/metrics.jsonl') if '\"train\"' in l];print(r[0]['loss'], r[-1]['loss'])")
        row "$model on GPU" "$([ -n "$banner" ] && echo PASS || echo FAIL)" "cuda/nccl: ${banner:-no}; loss first/last $first; tokens/s $(metric $run train tokens_per_s)"
    else
        row "$model on GPU" FAIL "see log"
    fi
done
if [ "$HAVE_TE" = "True" ]; then row "TE spec in use" "see log" "HAVE_TE True"; else row "TE spec, TE optimizer resume" SKIP "no Transformer Engine"; fi

# 3. checkpoints across devices (fp32: the same optimizer on both sides), with the optimizer
g=$WORK/gpu-ckpt; c=$WORK/cpu-ckpt
common="model=tiny train.precision=fp32 train.iters=12 checkpoint.interval=10 train.eval_interval=100 train.eval_iters=1 train.log_interval=1 seed=7"
step gpu-write 180 "$TRAIN $common run.dir=$g train.iters=10"
step cpu-resume 240 "CUDA_VISIBLE_DEVICES= $TRAIN $common run.dir=$WORK/g2c checkpoint.dir=$g/checkpoints parallel.backend=gloo"
row "GPU checkpoint resumes on CPU" "$([ "$(metric $WORK/g2c train loss)" != none ] && echo PASS || echo FAIL)" "loss at 12: $(metric $WORK/g2c train loss)"
step cpu-write 240 "CUDA_VISIBLE_DEVICES= $TRAIN $common run.dir=$c train.iters=10 parallel.backend=gloo"
step gpu-resume 180 "$TRAIN $common run.dir=$WORK/c2g checkpoint.dir=$c/checkpoints"
row "CPU checkpoint resumes on GPU" "$([ "$(metric $WORK/c2g train loss)" != none ] && echo PASS || echo FAIL)" "loss at 12: $(metric $WORK/c2g train loss)"

# 4. a run stopped at 6 and restarted equals the uninterrupted one (bit for bit, or the largest difference)
step uninterrupted 180 "$TRAIN $common run.dir=$WORK/u"
step stop-at-6 180 "$TRAIN $common run.dir=$WORK/r checkpoint.interval=6 train.exit_after_iters=6"
step resume 180 "$TRAIN $common run.dir=$WORK/r checkpoint.interval=6"
diff=$($PY - "$WORK/u" "$WORK/r" <<'EOF'
import sys
from pma_train.metrics import read_metrics
a = {r["step"]: r["loss"] for r in read_metrics(sys.argv[1] + "/metrics.jsonl", "train")}
b = {r["step"]: r["loss"] for r in read_metrics(sys.argv[2] + "/metrics.jsonl", "train")}
print(max(abs(a[k] - b[k]) for k in a) if a and sorted(a) == sorted(b) else "steps differ")
EOF
)
row "stop + resume = uninterrupted" "$([ "$diff" = "0.0" ] && echo PASS || echo "FAIL")" "max train-loss difference $diff"

# 5. PMA on GPU checkpoints: pma-merge, PMA-init from the merge, an annealing branch
step merge 180 "$PY -m pma_train.cli.merge root=$WORK/tiny/checkpoints n=3 v_iterations=10 method=sma output=$WORK/merged progress_bar=false"
row "pma-merge of GPU checkpoints" "$([ -f $WORK/merged/latest_checkpointed_iteration.txt ] && echo PASS || echo FAIL)" "$(tail -1 "$WORK/merge.log")"
step pma-init 180 "$TRAIN model=tiny run.dir=$WORK/init checkpoint.init_from=$WORK/merged train.iters=10 train.eval_at_start=true train.eval_interval=10"
row "PMA-init from the merge" "$([ "$(metric $WORK/init val loss)" != none ] && echo PASS || echo FAIL)" "val loss $(metric $WORK/init val loss)"
step anneal 180 "$TRAIN model=tiny run.dir=$WORK/anneal schedule=anneal checkpoint.load=$WORK/tiny/checkpoints/iter_0000030 checkpoint.dir=$WORK/anneal/ckpt train.iters=40 train.eval_interval=10"
row "annealing branch" "$([ "$(metric $WORK/anneal val loss)" != none ] && echo PASS || echo FAIL)" "val loss $(metric $WORK/anneal val loss)"

# 6. throughput of a dense_411m-shaped run (byte vocabulary), seq 4096, bf16
big=$WORK/dense411m
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$WORK/mem.csv" 2>/dev/null &
smi=$!
step dense_411m 300 "$TRAIN model=dense_411m run.dir=$big train.seq_length=4096 model.max_position_embeddings=4096 train.micro_batch_size=1 train.global_batch_size=8 train.iters=15 train.log_interval=5 train.eval_interval=1000 train.eval_iters=1 checkpoint.interval=1000 checkpoint.save_at_end=false"
kill $smi 2>/dev/null
peak=$(sort -n "$WORK/mem.csv" 2>/dev/null | tail -1)
row "dense_411m-shaped, seq 4096, bf16, 1 GPU" "$([ "$(metric $big train tokens_per_s)" != none ] && echo PASS || echo FAIL)" \
    "tokens/s $(metric $big train tokens_per_s); TFLOP/s $(metric $big train tflops_per_rank); MFU $(metric $big train mfu); peak GPU memory ${peak:-?} MiB (nvidia-smi)"
cat "$TABLE"
