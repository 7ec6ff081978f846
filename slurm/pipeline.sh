#!/usr/bin/env bash
# Submit every stage that has a config in CONFIG_DIR, each depending on the one before
# (--dependency=afterok, and --kill-on-invalid-dep so a failure cancels what follows).
#
#   slurm/pipeline.sh [--dry-run] [--model-config FILE|SHAPE] CONFIG_DIR [sbatch flags ...] [-- key=value ...]
#   e.g. slurm/pipeline.sh configs/llama7b -N 2 --ntasks-per-node 8 --gpus-per-node 8 \
#            -- base_model=mistralai/Mistral-7B-v0.1 run_dir=/scratch/$USER/mistral optim.lr=2e-4
#
# Overrides after `--` go to every stage they are for: a shared value of CONFIG_DIR/run.yaml
# (base_model, run_dir, ...: every config refers to them as ${name}) goes to all, a dotted key to
# the stages whose configs have its section (optim.lr: the training stages). One that no stage
# takes stops the pipeline. --dry-run prints, per stage, the sbatch command and the resolved
# model, input and output paths, and submits nothing.
#
# Stage order, by config file name: pretrain.yaml (stage sft), sft.yaml, neg.yaml, nat.yaml,
# score.yaml, distill.yaml, ranker.yaml, eval.yaml.
# Each job's log goes to <engine.output_dir>/logs/<job name>-<job id>.out. Resubmitting after
# a failure is safe: finished stages find their DONE.json and exit 0 at once.
#
# Before submitting anything it runs `tdg plan` on every stage config with the job's size (nodes and
# GPUs per node read from the sbatch flags; GPU memory from TDG_GPU_MEM, default 80 GiB) and stops if
# a stage will not fit or its global batch cannot be split over the ranks. TDG_PLAN=0 skips the check;
# --model-config (or TDG_MODEL_CONFIG: a config.json or a shape name such as llama-2-7b) gives the plan the
# shape of a model path it cannot read here. Python: TDG_PYTHON, else the active virtualenv, else the
# repository's .venv, else python3 on PATH.
set -euo pipefail

dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --model-config)
            [ $# -ge 2 ] || { echo "pipeline.sh: --model-config needs a config.json or a shape name" >&2; exit 2; }
            export TDG_MODEL_CONFIG=$2; shift 2 ;;
        --model-config=*) export TDG_MODEL_CONFIG=${1#--model-config=}; shift ;;
        *) break ;;
    esac
done
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: slurm/pipeline.sh [--dry-run] [--model-config FILE|SHAPE] CONFIG_DIR [sbatch flags ...]" \
         "[-- key=value ...]" >&2
    exit 2
fi
config_dir=$(cd "$1" && pwd)
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/python.sh
. "${repo}/slurm/python.sh"
python=$(tdg_python "${repo}") || exit 2

# sbatch flags before `--`, overrides after it
sbatch_flags=() overrides=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then
        shift
        overrides=("$@")
        break
    fi
    sbatch_flags+=("$1")
    shift
done

# the job's size, from the sbatch flags: nodes, and ranks (one per GPU) per node
nodes=1 per_node="" gpus="" ntasks=""
args=("${sbatch_flags[@]}")
for ((i = 0; i < ${#args[@]}; i++)); do
    a=${args[i]} next=${args[i + 1]:-}
    case "${a}" in
        -N | --nodes) nodes=${next%%-*} ;;
        --nodes=*) nodes=${a#*=}; nodes=${nodes%%-*} ;;
        --ntasks-per-node) per_node=${next} ;;
        --ntasks-per-node=*) per_node=${a#*=} ;;
        --gpus-per-node) gpus=${next##*:} ;;
        --gpus-per-node=*) gpus=${a#*=}; gpus=${gpus##*:} ;;
        --gres=gpu:*) gpus=${a##*:} ;;
        -n | --ntasks) ntasks=${next} ;;
        --ntasks=*) ntasks=${a#*=} ;;
    esac
done
per_node=${per_node:-${gpus:-$(( ${ntasks:-${nodes}} / nodes ))}}

configs=()
for name in pretrain sft neg nat score distill ranker eval; do
    [ -f "${config_dir}/${name}.yaml" ] && configs+=(--config "${config_dir}/${name}.yaml")
done
if [ "${TDG_PLAN:-1}" != 0 ] && [ ${#configs[@]} -gt 0 ]; then
    model_config=()
    [ -n "${TDG_MODEL_CONFIG:-}" ] && model_config=(--model-config "${TDG_MODEL_CONFIG}")
    if ! (cd "${repo}" && "${python}" -m train plan "${configs[@]}" --nodes "${nodes}" \
            --gpus-per-node "${per_node}" --gpu-mem "${TDG_GPU_MEM:-80}" "${model_config[@]}" \
            -- "${overrides[@]}"); then
        echo "pipeline: not submitted (tdg plan above; TDG_PLAN=0 skips the check)" >&2
        exit 2
    fi
fi

prev=""
info=$(mktemp -d)
trap 'rm -rf "${info}"' EXIT
# every stage resolved in one Python process: its stage, output dir and overrides, and its paths
if ! (cd "${repo}" && "${python}" -m train pipeline-stages --into "${info}" "${config_dir}" -- "${overrides[@]}"); then
    echo "pipeline: not submitted (see the error above)" >&2
    exit 2
fi
mapfile -t names <"${info}/order"
for name in "${names[@]}"; do
    cfg="${config_dir}/${name}.yaml"
    # NUL-separated: the stage, engine.output_dir, then the overrides that are for it (values may hold newlines)
    mapfile -d '' fields <"${info}/${name}.fields"
    stage=${fields[0]}
    out=${fields[1]}
    stage_overrides=("${fields[@]:2}")
    case "${out}" in /*) ;; *) out="${repo}/${out}" ;; esac
    dep=()
    if [ -n "${prev}" ]; then
        dep=(--dependency="afterok:${prev}" --kill-on-invalid-dep=yes)
    fi
    cmd=(sbatch --parsable --job-name="tdg-${name}" "${dep[@]}" --output="${out}/logs/%x-%j.out" \
         "${sbatch_flags[@]}" "slurm/${stage}.sbatch" "${cfg}" "${stage_overrides[@]}")
    if [ "${dry_run}" = 1 ]; then
        echo "${name}:"
        printf '  %s\n' "$(printf '%q ' "${cmd[@]}")"
        cat "${info}/${name}.paths"
        prev="<${name} job>"
        continue
    fi
    mkdir -p "${out}/logs"
    jid=$(cd "${repo}" && "${cmd[@]}")
    jid=${jid%%;*}
    echo "${name}: job ${jid} -> ${out}"
    prev=${jid}
done
if [ -z "${prev}" ]; then
    echo "no stage configs (pretrain/sft/neg/nat/score/distill/ranker/eval .yaml) in ${config_dir}" >&2
    exit 2
fi
if [ "${dry_run}" = 1 ]; then
    echo "dry run: nothing submitted"
fi
