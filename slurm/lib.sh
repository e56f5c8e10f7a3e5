# shellcheck shell=bash
# Shared by slurm/train.sh, mine.sh and data_gen.sh: settings, the job's nodes and GPUs, and srun
# launches in which every task is one torch.distributed rank.
#
# sbatch runs a copy of the batch script from a spool directory, so the scripts find the checkout
# through CONAN_REPO, by default the directory sbatch was run in (SLURM_SUBMIT_DIR).

log() { echo "[$(date -u +%H:%M:%S)] ${SCRIPT_NAME}: $*" >&2; }
die() { log "error: $*"; exit 2; }

# Source the settings, go to the checkout, put the virtualenv first on PATH.
load_settings() {
    CONAN_REPO=${CONAN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f $CONAN_REPO/training/main.py ]] ||
        die "CONAN_REPO=$CONAN_REPO is not the checkout: submit from its root or set CONAN_REPO"
    local settings=${CONAN_SETTINGS:-$CONAN_REPO/slurm/settings.env}
    [[ -f $settings ]] || die "settings file $settings not found"
    # shellcheck source=slurm/settings.env
    source "$settings"
    cd "$CONAN_REPO" || die "cannot cd to $CONAN_REPO"
    if [[ -d $CONAN_VENV/bin ]]; then
        PATH=$CONAN_VENV/bin:$PATH
    fi
    # Nothing is fetched from a hub at run time; caches live in the checkout, as in the Makefile.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
    export HF_HOME=${HF_HOME:-$CONAN_REPO/.cache/huggingface}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$CONAN_REPO/.cache/torch_extensions}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export PATH CONAN_REPO
}

# NODES: the job's hostnames in order (the batch script runs on NODES[0]).
job_nodes() {
    [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "not inside a SLURM job (SLURM_JOB_NODELIST is unset); use sbatch"
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#NODES[@]})) || die "could not expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
}

# GPUs per node, assuming the job's nodes are alike: what SLURM allocated (--gpus-per-node and
# friends), else what nvidia-smi sees on this node (clusters without GPU gres), else 0.
gpus_per_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

# The device id of the last GPU this node gives the job (SLURM may remap or restrict ids).
last_gpu_id() {
    local gpus=$1 ids
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${ids[-1]}"
    else
        echo $((gpus - 1))
    fi
}

# Runs "$@" as one srun job step with RANKS_ON[i] tasks on RANK_NODES[i], in that order, each task
# one rank: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR (RANK_NODES[0]) and MASTER_PORT set from
# SLURM's task ids, which is what torch.distributed, DeepSpeed and torchrun-style code read. On a GPU
# node local rank i uses GPU i. CPUs are split evenly between a node's ranks.
# Prints the plan instead when DRY_RUN=1. With SRUN_BG=1 it starts srun in the background and sets
# SRUN_PID, and the caller removes SRUN_HOSTFILE once srun has ended.
srun_ranks() {
    local world=0 i n cpus_per_rank rank_env
    local cpus_on_node=${SLURM_CPUS_ON_NODE:-1} most=1
    for n in "${RANKS_ON[@]}"; do
        world=$((world + n))
        if ((n > most)); then most=$n; fi
    done
    cpus_per_rank=$((cpus_on_node / most))
    ((cpus_per_rank >= 1)) || cpus_per_rank=1
    SRUN_HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/conan-hosts.XXXXXX")
    for i in "${!RANK_NODES[@]}"; do
        for ((n = 0; n < RANKS_ON[i]; n++)); do echo "${RANK_NODES[i]}"; done
    done >"$SRUN_HOSTFILE"
    # Expanded by each task's shell, not here.
    # shellcheck disable=SC2016
    rank_env='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_STEP_NUM_TASKS OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}; exec "$@"'
    local cmd=(srun --ntasks="$world" --nodes="${#RANK_NODES[@]}" --distribution=arbitrary
               --cpus-per-task="$cpus_per_rank" --kill-on-bad-exit=1
               bash -c "$rank_env" rank "$@")
    export MASTER_ADDR=${RANK_NODES[0]} MASTER_PORT
    if [[ $DRY_RUN == 1 ]]; then
        echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT WORLD_SIZE=$world CPUS_PER_RANK=$cpus_per_rank"
        echo "HOSTFILE: $(tr '\n' ' ' <"$SRUN_HOSTFILE")"
        echo "LAUNCH: ${cmd[*]@Q}"
        rm -f "$SRUN_HOSTFILE"
        return 0
    fi
    log "$world ranks on ${RANK_NODES[*]} (${RANKS_ON[*]} per node), rank 0 at $MASTER_ADDR:$MASTER_PORT"
    # srun would take a --ntasks-per-node given to sbatch from the environment and refuse the
    # uneven layout; the hostfile says it all.
    if [[ ${SRUN_BG:-0} == 1 ]]; then
        SLURM_HOSTFILE=$SRUN_HOSTFILE env -u SLURM_NTASKS_PER_NODE "${cmd[@]}" &
        # shellcheck disable=SC2034  # read by the caller
        SRUN_PID=$!
    else
        local status=0
        SLURM_HOSTFILE=$SRUN_HOSTFILE env -u SLURM_NTASKS_PER_NODE "${cmd[@]}" || status=$?
        rm -f "$SRUN_HOSTFILE"
        return "$status"
    fi
}

# Waits for a background process while signal traps run; returns its exit status.
wait_for() {
    local pid=$1
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true  # a trapped signal interrupts wait; go on waiting
    done
    wait "$pid"
}
