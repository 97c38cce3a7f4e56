#!/usr/bin/env bash
# Set up mhla-dist in .venv/ at the repo root. Idempotent: a second run only checks.
#
#   bash launch/setup.sh          # creates .venv, installs torch, then the project (+dev)
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0, a CPU build
# on this kind of machine): without the pin pip resolves a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.mhla-dist-installed"
fingerprint="$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1) $torch_spec"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
    exit 0
fi
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip setuptools wheel
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet "$torch_spec"
fi
# deepspeed builds from source and imports torch in setup.py: build it against the torch
# already installed instead of letting pip pull another one into an isolated build env.
"$py" -m pip install --quiet --no-build-isolation -e ".[dev]"
echo "$fingerprint" > "$stamp"
echo "mhla-dist set up in $venv" >&2
