#!/usr/bin/env bash
# The whole service on one machine with nothing else to install: API on http://127.0.0.1:8000 and one
# Celery worker. Defaults are embedded: SQLite, a folder broker (kombu filesystem:// under var/broker)
# and a folder object store, all under var/. RD_* variables point it at real servers instead, e.g.
# RD_BROKER_URL=redis://127.0.0.1:6379/0 RD_DATABASE_URL=postgresql+psycopg://... (see docs/service-design.md).
# Ctrl-C stops the API and the worker; a job that was running resumes from its last checkpoint next time.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh   # creates .venv on first use: torch, then the project with [service,dev]

export RD_VAR_DIR="${RD_VAR_DIR:-$PWD/var}"
# One local worker: a job whose worker stopped is taken up again 30 s after its last heartbeat
# (worker/lease.py; the default of 120 s suits fleets of workers).
export RD_HEARTBEAT_S="${RD_HEARTBEAT_S:-5}" RD_STALE_AFTER_S="${RD_STALE_AFTER_S:-30}"
mkdir -p "$RD_VAR_DIR"
host="${RD_HOST:-127.0.0.1}"
port="${RD_PORT:-8000}"
queue="${RD_QUEUE:-distill}"

echo "== migrations" >&2
.venv/bin/alembic upgrade head

key=$(.venv/bin/python - <<'EOF'
from service.auth import ensure_dev_key
from service.db import make_engine, make_session_factory
from service.settings import get_settings

settings = get_settings()
path = settings.var_dir / "dev-api-key"
if settings.is_sqlite:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        ensure_dev_key(session, settings.var_dir)
    engine.dispose()
print(path.read_text().strip() if path.is_file() else "")
EOF
)

worker_log="$RD_VAR_DIR/worker.log"
echo "== worker (queue $queue, log $worker_log)" >&2
# Its own session: Ctrl-C in the terminal reaches only the API; the trap below stops the worker.
setsid .venv/bin/celery -A worker.celery_app worker -Q "$queue" --concurrency 1 --pool prefork \
    -l info --logfile "$worker_log" &
worker=$!

stop_worker() {
    kill -0 "$worker" 2>/dev/null || return 0
    echo "== stopping the worker" >&2
    kill -TERM "$worker" 2>/dev/null || true           # warm: finish the message loop
    for _ in $(seq 20); do kill -0 "$worker" 2>/dev/null || return 0; sleep 0.5; done
    kill -QUIT "$worker" 2>/dev/null || true           # cold: the running job is requeued (acks_late)
    for _ in $(seq 20); do kill -0 "$worker" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL -- "-$worker" 2>/dev/null || true       # the process group: parent and children
}
trap stop_worker EXIT
trap 'exit 130' INT TERM

echo "== API on http://$host:$port  (docs: http://$host:$port/docs)" >&2
if [ -n "$key" ]; then
    echo "== dev API key: $key" >&2
    echo "   try: .venv/bin/distill-client run TEACHER.pt --arch ARCH --dataset cifar10 --out results/" >&2
else
    echo "== API keys exist already: create one with '.venv/bin/distill-admin' if you have none" >&2
fi
.venv/bin/uvicorn --factory api.app:create_app --host "$host" --port "$port"
