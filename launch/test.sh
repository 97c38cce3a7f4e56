#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (slow tests included).
#
#   bash launch/test.sh              # everything, as CI runs it
#   bash launch/test.sh -m "not slow" -x   # extra pytest arguments pass through
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
