#!/usr/bin/env bash
# Shared launcher, sourced by slurm/<stage>.sbatch after it sets STAGE.
# Arguments (passed through sbatch): CONFIG [key=value ...]
#
# One training process per task: `srun` starts them on every node of the allocation, and the
# trainer reads its rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. We use srun rather than
# torchrun or DeepSpeed's launcher: no SSH, no hostfile, Slurm itself tracks, signals and kills
# every process. On GPU nodes ask for one task per GPU: --ntasks-per-node=<GPUs per node>.
#
# Preemption: `#SBATCH --signal=B:USR1@<seconds>` sends USR1 to this script before the time
# limit; we forward it to the training tasks, which all-reduce the request, checkpoint and exit
# 75 ("checkpointed, not finished"). On 75 the job requeues itself; the next run resumes.
#
# Environment: TDG_REPO (default: the submit dir, which must be the repository root), TDG_PYTHON
# (default: $TDG_REPO/.venv/bin/python if it exists, else python3 on PATH), TDG_DEVICE=cpu for CPU-only clusters (DeepSpeed's CPU
# accelerator, gloo), TDG_MASTER_PORT to pin the rendezvous port.
set -uo pipefail

: "${STAGE:?STAGE must be set by the sbatch script}"
if [ $# -lt 1 ]; then
    echo "usage: sbatch [sbatch flags] slurm/${STAGE}.sbatch CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
REPO_DIR=${TDG_REPO:-${SLURM_SUBMIT_DIR:-.}}
# shellcheck source=slurm/python.sh
. "${REPO_DIR}/slurm/python.sh"
PYTHON=$(tdg_python "${REPO_DIR}") || exit 2
EXIT_CHECKPOINTED=75

echo "[tdg] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) stage ${STAGE}, restart count ${SLURM_RESTART_COUNT:-0}," \
     "nodes ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS:-1} tasks, $(date -u +%FT%TZ)"

# sbatch exports the submitting shell's environment: rank variables from there would be wrong here.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MASTER_PORT=${TDG_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
if [ "${TDG_DEVICE:-gpu}" = "cpu" ]; then
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# --wait: once one task exits, the rest get 60 s before srun kills them. Not --kill-on-bad-exit:
# on a stop request every rank exits 75 within moments, and killing the slower ones would turn
# "checkpointed, requeue me" (75) into "killed" (143).
srun --wait=60 --export=ALL "${PYTHON}" -m train "${STAGE}" --config "${CONFIG}" "$@" &
srun_pid=$!

forward() {
    echo "[tdg] $1 received: asking training to checkpoint and stop"
    kill -USR1 "${srun_pid}" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives: keep waiting until srun itself has exited.
while true; do
    wait "${srun_pid}"
    rc=$?
    kill -0 "${srun_pid}" 2>/dev/null || break
done

if [ "${rc}" -eq "${EXIT_CHECKPOINTED}" ]; then
    echo "[tdg] checkpointed before finishing: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
echo "[tdg] stage ${STAGE} exited with status ${rc}"
exit "${rc}"
