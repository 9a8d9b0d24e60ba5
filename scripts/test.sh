#!/usr/bin/env bash
# The test command: sets up .venv, lints, then runs the unit and the integration suites.
# Integration tests talk to a real PostgreSQL (RD_TEST_PG, default 127.0.0.1:5432 trust auth, db test),
# a real Redis (127.0.0.1:6379, started by the tests if absent) and a real S3 server (weed mini, started).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
