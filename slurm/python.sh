# Sourced by slurm/pipeline.sh and slurm/launch.sh: which Python runs the trainer.
#
#   tdg_python REPO  ->  prints the interpreter: $TDG_PYTHON if set, else the active virtualenv's
#                        ($VIRTUAL_ENV), else REPO/.venv/bin/python if there is one, else python3 on PATH; exits 2 naming what it tried when that Python cannot
#                        import the trainer (run from REPO, so an uninstalled checkout works too).
tdg_python() {
    local repo=$1 python=${TDG_PYTHON:-}
    if [ -z "${python}" ]; then
        if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "${VIRTUAL_ENV}/bin/python" ]; then
            python=${VIRTUAL_ENV}/bin/python
        elif [ -x "${repo}/.venv/bin/python" ]; then
            python=${repo}/.venv/bin/python
        else
            python=$(command -v python3 || command -v python || true)
        fi
    fi
    if [ -z "${python}" ] || ! (cd "${repo}" && "${python}" -c "import train" 2>/dev/null); then
        echo "tdg: no Python that imports the trainer (tried ${python:-python3 on PATH}, from ${repo});" \
             "set TDG_PYTHON to the interpreter of the environment tdg-trainer is installed in" >&2
        return 2
    fi
    echo "${python}"
}
