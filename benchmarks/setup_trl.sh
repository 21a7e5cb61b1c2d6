#!/usr/bin/env bash
# Make the two TRL reference environments the benchmark compares against (idempotent):
#   benchmarks/.venv-trl112  TRL 1.12.0 (PPO)    from benchmarks/requirements.txt
#   benchmarks/.venv-trl116  TRL 1.16.0 (RLOO)   from benchmarks/requirements-trl116.txt
# They are separate because the two TRL releases cannot share one environment; our side runs in
# the project's own environment. Usage: bash benchmarks/setup_trl.sh [python]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-python3}"
make_venv() {  # make_venv DIR REQUIREMENTS
    local dir="$here/$1" req="$here/$2"
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import trl" 2>/dev/null; then
        echo "$1: ready ($("$dir/bin/python" -c 'import trl; print("trl", trl.__version__)'))"
        return
    fi
    "$python" -m venv "$dir"
    "$dir/bin/pip" install --quiet --upgrade pip
    "$dir/bin/pip" install --quiet -r "$req"
    echo "$1: installed ($("$dir/bin/python" -c 'import trl; print("trl", trl.__version__)'))"
}
make_venv .venv-trl112 requirements.txt
make_venv .venv-trl116 requirements-trl116.txt
