#!/usr/bin/env bash
# Create the process work pool the deployments in prefect.yaml use, register them, start a worker.
# Run from the project root with the project's virtual environment active.
set -euo pipefail
pool="${1:-character}"
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
prefect deploy --all
exec prefect worker start --pool "$pool"
