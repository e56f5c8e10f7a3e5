#!/usr/bin/env bash
# Train with DeepSpeed on every GPU of every node of the job, the mining sidecar beside it.
#
#   sbatch slurm/train.sh                                  # quickstart recipe, one node
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh optim.lr=1e-5    # arguments: trainer overrides
#   RECIPE=training/recipes/conan_finetune.yaml SIDECAR=step sbatch --nodes=5 slurm/train.sh
#
# Settings (slurm/settings.env, each overridable from the environment): RECIPE, RUN_DIR, SIDECAR
# (auto | gpu | step | off), SIDECAR_ARGS, RESUME, CPU_RANKS_PER_NODE, MASTER_PORT, CONAN_VENV,
# CONAN_REPO, CONAN_SETTINGS, DRY_RUN.
#
# Ranks: one srun task per GPU (per CPU rank on nodes without GPUs: CPU_RANKS_PER_NODE), each running
# training/main.py, which starts DeepSpeed from RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (the first
# node) and MASTER_PORT, all derived here from SLURM's environment (slurm/lib.sh). srun starts the
# processes on every node, so no ssh or pdsh is needed, unlike the deepspeed launcher's multi-node mode.
#
# Sidecar: `python -m mining sidecar` re-mines hard negatives with each new export (SIDECAR in
# settings.env says where). It is stopped with SIGTERM when training ends. It needs
# RUN/mining/spec.json, which slurm/mine.sh writes (mine once with the base model first).
#
# Time limit: SLURM sends SIGUSR1 to this script 120 s before the limit (--signal below); the trap
# passes it to the trainer ranks, which finish the current step, save a checkpoint and exit with
# RUN/run.json saying "preempted". The script then requeues the job (--requeue), and the new start
# (SLURM_RESTART_COUNT > 0) runs the trainer with --resume. Raise the 120 s if saving takes longer.
# A job cancelled with scancel (SIGTERM) also checkpoints but is not requeued.
#
#SBATCH --job-name=conan-train
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-train-%j.out
set -euo pipefail

SCRIPT_NAME=train.sh
# shellcheck source=slurm/lib.sh
source "${CONAN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
load_settings

WARNED=0      # the time-limit warning arrived: checkpoint, then requeue
TERMINATED=0  # the job is being cancelled: checkpoint, do not requeue
TRAIN_PID=
SIDECAR_PID=

start_sidecar() {
    local log_file=$RUN_DIR/mining/sidecar.log pin=()
    log "sidecar ($SIDECAR) on $SIDECAR_NODE${SIDECAR_GPU:+ GPU $SIDECAR_GPU}, log $log_file"
    if [[ -n $SIDECAR_GPU ]]; then pin=(env "CUDA_VISIBLE_DEVICES=$SIDECAR_GPU"); fi
    if [[ $SIDECAR == gpu ]]; then
        # This script runs on the first node: the sidecar is simply its child.
        "${pin[@]}" "${sidecar_cmd[@]}" >>"$log_file" 2>&1 &
    else
        # --overlap: the step shares the node with the trainer's step instead of waiting for it.
        srun --overlap --nodes=1 --ntasks=1 --nodelist="$SIDECAR_NODE" --output="$log_file" --open-mode=append \
            "${pin[@]}" "${sidecar_cmd[@]}" &
    fi
    SIDECAR_PID=$!
}

stop_sidecar() {
    [[ -n $SIDECAR_PID ]] || return 0
    log "training ended: stopping the sidecar"
    kill -TERM "$SIDECAR_PID" 2>/dev/null || true
    wait_for "$SIDECAR_PID" || true
    SIDECAR_PID=
}

# shellcheck disable=SC2317  # called by trap
on_warning() {
    WARNED=1
    log "time-limit warning (SIGUSR1): the trainer checkpoints, then the job is requeued"
    [[ -z $TRAIN_PID ]] || kill -USR1 "$TRAIN_PID" 2>/dev/null || true  # srun passes it to every rank
}

# shellcheck disable=SC2317  # called by trap
on_terminate() {
    TERMINATED=1
    log "SIGTERM: the trainer checkpoints and the job ends (no requeue)"
    [[ -z $TRAIN_PID ]] || kill -TERM "$TRAIN_PID" 2>/dev/null || true
}

trap on_warning USR1
trap on_terminate TERM
trap stop_sidecar EXIT

# The run directory: from the setting, else the recipe's (with the overrides applied), read by the
# trainer's own config loader, which also checks recipe and overrides before any node is busy.
overrides=("$@")
if [[ -n $RUN_DIR ]]; then
    overrides+=("run_dir=$RUN_DIR")
fi
RUN_DIR=$(python - "$RECIPE" "${overrides[@]}" <<'EOF'
import sys
from training.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).run_dir)
except ConfigError as error:
    sys.exit(f"error: {error}")
EOF
) || die "bad recipe or overrides (above)"

restarts=${SLURM_RESTART_COUNT:-0}
resume=()
if ((restarts > 0)) || [[ $RESUME == 1 ]]; then
    resume=(--resume)
fi

# The layout: RANK_NODES and RANKS_ON for the trainer, SIDECAR_NODE and SIDECAR_GPU for the sidecar.
job_nodes
gpus=$(gpus_per_node)
per_node=$gpus
((gpus > 0)) || per_node=$CPU_RANKS_PER_NODE
if [[ $SIDECAR == auto ]]; then
    if [[ -f $RUN_DIR/mining/spec.json ]]; then SIDECAR=gpu; else SIDECAR=off; fi
    log "SIDECAR=auto: $SIDECAR ($RUN_DIR/mining/spec.json is the sidecar's input)"
fi
case $SIDECAR in
    gpu | step | off) ;;
    *) die "SIDECAR must be auto, gpu, step or off, not '$SIDECAR'" ;;
esac
if [[ $SIDECAR != off && ! -f $RUN_DIR/mining/spec.json ]]; then
    die "SIDECAR=$SIDECAR needs $RUN_DIR/mining/spec.json: run slurm/mine.sh for this run first, or SIDECAR=off"
fi
RANK_NODES=("${NODES[@]}")
RANKS_ON=()
for _ in "${NODES[@]}"; do RANKS_ON+=("$per_node"); done
SIDECAR_NODE=${NODES[0]}
SIDECAR_GPU=
if [[ $SIDECAR == step && ${#NODES[@]} -gt 1 ]]; then
    SIDECAR_NODE=${NODES[-1]}  # a node of its own; all its GPUs visible
    unset 'RANK_NODES[-1]' 'RANKS_ON[-1]'
elif [[ $SIDECAR != off ]] && ((gpus > 0)); then
    ((gpus > 1)) || die "SIDECAR=$SIDECAR on a one-GPU node leaves the trainer no GPU there: SIDECAR=off, or step with a node more"
    SIDECAR_GPU=$(last_gpu_id "$gpus")
    RANKS_ON[0]=$((gpus - 1))
fi

sidecar_cmd=(python -m mining sidecar --run-dir "$RUN_DIR")
# shellcheck disable=SC2206  # SIDECAR_ARGS is a list of flags, split on purpose
sidecar_cmd+=($SIDECAR_ARGS)
train_cmd=(python training/main.py --config "$RECIPE" "${resume[@]}" "${overrides[@]}")

if [[ $DRY_RUN == 1 ]]; then
    echo "RUN_DIR=$RUN_DIR RESTARTS=$restarts SIDECAR=$SIDECAR SIDECAR_NODE=$SIDECAR_NODE SIDECAR_GPU=$SIDECAR_GPU"
    srun_ranks "${train_cmd[@]}"
    exit 0
fi

log "job $SLURM_JOB_ID start $((restarts + 1)) on ${NODES[*]}: $RECIPE, run dir $RUN_DIR${resume:+, resuming}"
if [[ $SIDECAR != off ]]; then start_sidecar; fi

SRUN_BG=1
srun_ranks "${train_cmd[@]}"
TRAIN_PID=$SRUN_PID
status=0
wait_for "$TRAIN_PID" || status=$?
TRAIN_PID=
rm -f "$SRUN_HOSTFILE"
stop_sidecar

run_status=$(python -c 'import json, sys
try:
    print(json.load(open(sys.argv[1])).get("status"))
except (OSError, ValueError):
    print("unknown")' "$RUN_DIR/run.json")
log "trainer exited with status $status; run.json status: $run_status"

if ((status == 0)) && [[ $run_status == preempted && $TERMINATED == 0 ]]; then
    # Also when the ranks got the signal straight from SLURM (--signal without B:, or scancel --signal
    # to the steps) rather than through this script.
    log "requeueing job $SLURM_JOB_ID: the next start resumes from the checkpoint (warned: $WARNED)"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed: submit again with RESUME=1"
fi
exit "$status"
