#!/usr/bin/env bash
# Run tests/reliability while every core also runs a competing busy process, as on a
# shared CI machine. The busy processes are started here and always stopped.
#   usage: tests/reliability/under_load.sh [PYTHON] [PYTEST ARGS (default: tests/reliability)]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${1:-.venv/bin/python}"
shift || true
busy=()
stop_busy() { for pid in "${busy[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_busy EXIT INT TERM
for _ in $(seq "$(nproc)"); do
    sh -c 'while :; do :; done' &
    busy+=("$!")
done
echo "under load: ${#busy[@]} busy processes (one per core)"
start=$(date +%s)
status=0
"$PYTHON" -m pytest -q "${@:-tests/reliability}" || status=$?
echo "under load: $(( $(date +%s) - start )) s wall"
exit "$status"
