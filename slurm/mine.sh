#!/usr/bin/env bash
# Mine hard negatives once, with one rank per GPU (per CPU rank on nodes without GPUs) on every node.
#
#   MINE_MODEL=runs/quickstart/exports/step_00001000 sbatch --nodes=2 --gpus-per-node=8 slurm/mine.sh
#   MINE_MODEL=/models/bge-base-en sbatch slurm/mine.sh --k 100 --index ivf   # arguments: more flags
#                                                                             # of python -m mining mine
# Settings (slurm/settings.env, each overridable from the environment): MINE_MODEL (required),
# MINE_CORPUS, MINE_QUERIES, MINE_RUN_DIR, MINE_LAUNCHER (torch | mpi), CPU_RANKS_PER_NODE,
# MASTER_PORT, CONAN_VENV, CONAN_REPO, CONAN_SETTINGS, DRY_RUN.
#
# Every rank encodes and searches one shard of the corpus; rank 0 merges, publishes
# MINE_RUN_DIR/negatives/vNNNNNN and writes MINE_RUN_DIR/mining/spec.json, which the sidecar of
# slurm/train.sh reads: run this once with the base model before training with a sidecar.
# MINE_LAUNCHER=torch: the ranks are srun tasks meeting through torch.distributed (gloo) at the first
# node. mpi: MPI's own mpiexec (Hydra, from the venv's mpich wheel) starts them for mpi4py, its proxies
# launched through srun; srun --mpi=pmi2 with this MPI corrupts long PMI values.
#
#SBATCH --job-name=conan-mine
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm-mine-%j.out
set -euo pipefail

SCRIPT_NAME=mine.sh
# shellcheck source=slurm/lib.sh
source "${CONAN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
load_settings

[[ -n $MINE_MODEL ]] || die "MINE_MODEL is not set: an export (RUN/exports/step_...) or a model directory"
case $MINE_LAUNCHER in
    torch | mpi) ;;
    *) die "MINE_LAUNCHER must be torch or mpi, not '$MINE_LAUNCHER'" ;;
esac

job_nodes
gpus=$(gpus_per_node)
per_node=$gpus
((gpus > 0)) || per_node=$CPU_RANKS_PER_NODE
RANK_NODES=("${NODES[@]}")
RANKS_ON=()
for _ in "${NODES[@]}"; do RANKS_ON+=("$per_node"); done

mine_cmd=(python -m mining mine --model "$MINE_MODEL" --corpus "$MINE_CORPUS" --queries "$MINE_QUERIES"
          --run-dir "$MINE_RUN_DIR")
log "job ${SLURM_JOB_ID:-?}: mining $MINE_QUERIES against $MINE_CORPUS with $MINE_MODEL into $MINE_RUN_DIR"
if [[ $MINE_LAUNCHER == torch ]]; then
    srun_ranks "${mine_cmd[@]}" --launcher torchrun "$@"
else
    world=$((per_node * ${#NODES[@]}))
    threads=$((${SLURM_CPUS_ON_NODE:-$per_node} / per_node))
    ((threads >= 1)) || threads=1
    cmd=(mpiexec -launcher slurm -hosts "$(IFS=,; echo "${NODES[*]}")" -ppn "$per_node" -n "$world"
         -genv OMP_NUM_THREADS "$threads" "${mine_cmd[@]}" --launcher mpi "$@")
    if [[ $DRY_RUN == 1 ]]; then
        echo "LAUNCH: ${cmd[*]@Q}"
        exit 0
    fi
    log "$world MPI ranks on ${NODES[*]} ($per_node per node)"
    # srun (Hydra's launcher) would take a --ntasks-per-node given to sbatch from the environment.
    env -u SLURM_NTASKS_PER_NODE "${cmd[@]}"
fi
