#!/usr/bin/env bash
# Take a fresh Debian/Ubuntu machine with an NVIDIA GPU to a ready virtual environment.
# Safe to run again: every step checks before it acts.
#
#   ./init_debian.sh            # needs the NVIDIA driver (nvidia-smi); stops with advice if absent
#   ./init_debian.sh --cpu      # CPU-only machine: skip the GPU checks
set -euo pipefail
cd "$(dirname "$0")"

cpu_only=0
[[ "${1:-}" == "--cpu" ]] && cpu_only=1
venv=${VENV:-.venv}
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"

# 1. The driver: never installed blindly (the right one depends on the card and the kernel).
if [[ $cpu_only -eq 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    echo "No working NVIDIA driver (nvidia-smi failed). Install the driver for your card first," >&2
    echo "e.g. 'sudo apt-get install nvidia-driver' on Debian (non-free) and reboot," >&2
    echo "or run './init_debian.sh --cpu' for a CPU-only setup." >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

# 2. System packages, only those missing.
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
if [[ ${#need[@]} -gt 0 ]]; then
  $sudo apt-get update -q
  $sudo apt-get install -y -q "${need[@]}"
fi

# 3. The virtual environment and the project's dependencies (pip skips what is installed).
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet -r requirements.txt

# 4. Check what we got.
"$venv/bin/python" - "$cpu_only" <<'PY'
import sys, torch
cpu_only = sys.argv[1] == "1"
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if not cpu_only and not torch.cuda.is_available():
    sys.exit("torch cannot see the GPU: install a torch build for your CUDA driver (see README)")
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
PY
echo "Ready: source $venv/bin/activate"
