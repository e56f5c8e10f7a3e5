#!/usr/bin/env bash
# Generate training pairs with an LLM: an array job, one corpus shard per array task.
#
#   # a running OpenAI-compatible server (vLLM, SGLang, TGI, a hosted API; key in OPENAI_API_KEY)
#   LLM_MODEL=Qwen/Qwen2.5-7B-Instruct LLM_BASE_URL=http://node17:8000/v1 sbatch --array=0-15 slurm/data_gen.sh
#   # a server started inside every task, on its GPU
#   LLM_MODEL=/models/qwen2.5-7b LLM_SERVER_CMD='vllm serve /models/qwen2.5-7b --port $LLM_PORT' \
#       sbatch --array=0-7 --gpus=1 slurm/data_gen.sh
#   # arguments are more flags of python -m data_gen:  sbatch slurm/data_gen.sh --samples 2 --concurrency 64
#
# Settings (slurm/settings.env, each overridable from the environment): GEN_CORPUS, GEN_OUTPUT,
# LLM_MODEL (required), LLM_BASE_URL, LLM_SERVER_CMD, LLM_PORT, LLM_READY_TIMEOUT, CONAN_VENV,
# CONAN_REPO, CONAN_SETTINGS.
#
# The shard is the array task (python -m data_gen reads SLURM_ARRAY_TASK_ID, _MIN and _COUNT), so
# --array=0-15 splits the corpus 16 ways, each task writing its own files in GEN_OUTPUT. A task run
# again (requeued, or the same array submitted again) skips the work already written.
# With LLM_SERVER_CMD the task starts the server, waits until it answers at LLM_BASE_URL (any HTTP
# reply to GET .../models but 502-504), generates, then stops the server's whole process group.
#
#SBATCH --job-name=conan-data-gen
#SBATCH --array=0-3
#SBATCH --ntasks=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-data_gen-%A_%a.out
set -euo pipefail

SCRIPT_NAME=data_gen.sh
# shellcheck source=slurm/lib.sh
source "${CONAN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/lib.sh"
load_settings

[[ -n $LLM_MODEL ]] || die "LLM_MODEL is not set: the model name the server serves"
LLM_BASE_URL=${LLM_BASE_URL:-http://127.0.0.1:$LLM_PORT/v1}
SERVER_PID=

# Exit status 0 once the server answers, 1 while it does not (yet).
server_answers() {
    python - "$LLM_BASE_URL/models" <<'EOF'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError as error:  # it answered; 502-504: a proxy or a server still loading
    sys.exit(1 if error.code in (502, 503, 504) else 0)
except OSError:
    sys.exit(1)
EOF
}

start_server() {
    export LLM_PORT
    log "starting the LLM server on port $LLM_PORT: $LLM_SERVER_CMD"
    # Its own process group (setsid), so that stopping it also stops the workers it forks.
    setsid bash -c "$LLM_SERVER_CMD" &
    SERVER_PID=$!
    local waited=0
    until server_answers; do
        kill -0 "$SERVER_PID" 2>/dev/null || die "the LLM server exited before answering (its output is above)"
        ((waited < LLM_READY_TIMEOUT)) || die "the LLM server did not answer at $LLM_BASE_URL within $LLM_READY_TIMEOUT s"
        sleep 5
        waited=$((waited + 5))
    done
    log "the LLM server answers at $LLM_BASE_URL after about $waited s"
}

# shellcheck disable=SC2317  # called by trap
stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 60); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 1
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT

log "task ${SLURM_ARRAY_TASK_ID:-none} of array job ${SLURM_ARRAY_JOB_ID:-none}: $GEN_CORPUS -> $GEN_OUTPUT"
if [[ -n $LLM_SERVER_CMD ]]; then
    start_server
fi
status=0
python -m data_gen --corpus "$GEN_CORPUS" --output "$GEN_OUTPUT" --model "$LLM_MODEL" \
    --base-url "$LLM_BASE_URL" "$@" || status=$?
log "data_gen exited with status $status (0 complete, 1 some items failed: submit again to retry, 2 stopped early or bad input)"
exit "$status"
