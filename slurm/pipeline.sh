#!/usr/bin/env bash
# Submit every stage that has a config in CONFIG_DIR, each depending on the one before
# (--dependency=afterok, and --kill-on-invalid-dep so a failure cancels what follows).
#
#   slurm/pipeline.sh CONFIG_DIR [sbatch flags ...]
#   e.g. slurm/pipeline.sh configs/llama7b -N 2 --ntasks-per-node 8 --gpus-per-node 8
#
# Stage order, by config file name: pretrain.yaml (stage sft), sft.yaml, neg.yaml, nat.yaml,
# score.yaml, distill.yaml, ranker.yaml, eval.yaml.
# Each job's log goes to <engine.output_dir>/logs/<job name>-<job id>.out. Resubmitting after
# a failure is safe: finished stages find their DONE.json and exit 0 at once.
set -euo pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: slurm/pipeline.sh CONFIG_DIR [sbatch flags ...]" >&2
    exit 2
fi
config_dir=$(cd "$1" && pwd)
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${TDG_PYTHON:-${repo}/.venv/bin/python}

prev=""
for entry in pretrain:sft sft:sft neg:neg nat:nat score:score distill:distill ranker:ranker eval:eval; do
    name=${entry%%:*}
    stage=${entry##*:}
    cfg="${config_dir}/${name}.yaml"
    [ -f "${cfg}" ] || continue
    out=$(cd "${repo}" && "${python}" -m train "${stage}" --config "${cfg}" --print engine.output_dir)
    case "${out}" in /*) ;; *) out="${repo}/${out}" ;; esac
    mkdir -p "${out}/logs"
    dep=()
    if [ -n "${prev}" ]; then
        dep=(--dependency="afterok:${prev}" --kill-on-invalid-dep=yes)
    fi
    jid=$(cd "${repo}" && sbatch --parsable --job-name="tdg-${name}" "${dep[@]}" \
        --output="${out}/logs/%x-%j.out" "$@" "slurm/${stage}.sbatch" "${cfg}")
    jid=${jid%%;*}
    echo "${name}: job ${jid} -> ${out}"
    prev=${jid}
done
if [ -z "${prev}" ]; then
    echo "no stage configs (pretrain/sft/neg/nat/score/distill/ranker/eval .yaml) in ${config_dir}" >&2
    exit 2
fi
