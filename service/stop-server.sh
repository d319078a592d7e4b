#!/usr/bin/env bash
# Stop the server that `mlx-local start` or the installed service runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/mlx-local" ]; then
    echo "error: $ROOT/.venv is not set up; run make run (or make venv) first" >&2
    exit 1
fi
exec "$ROOT/.venv/bin/mlx-local" stop "$@"
