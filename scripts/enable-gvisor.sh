#!/usr/bin/env bash
# Make gVisor's runsc a runtime of the local Docker engine, as kernelbox's kernels need it:
#   scripts/enable-gvisor.sh [NAME]       (default NAME: runsc; then KERNELBOX_DOCKER_RUNTIME=NAME)
#
# Idempotent: when the engine already has a runtime NAME that passes the backend's own check
# (sandbox/backends/docker_runtime.py), nothing changes. Otherwise it installs Debian's
# `runsc` package if missing, merges the runtime into /etc/docker/daemon.json (every other key
# and the runtime's other arguments kept; the file is rewritten whole, so it must be JSON), and
# sends dockerd SIGHUP, which reloads runtimes without restarting the engine or any container;
# then waits until `docker info` lists it.
set -euo pipefail

NAME="${1:-runsc}"
# The engine's configuration and process (another engine: also DOCKER_HOST)
DAEMON_JSON="${DAEMON_JSON:-/etc/docker/daemon.json}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'enable-gvisor: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Exit 0 when the engine's runtime NAME is what kernels need; else say why on stderr.
engine_ok() {
    docker info --format '{{json .}}' | PYTHONPATH="$ROOT" python3 -c '
import json, sys
from kernelbox_server.sandbox.backends.docker_runtime import check
try:
    check(json.load(sys.stdin), sys.argv[1])
except RuntimeError as exc:
    sys.exit(str(exc))
' "$NAME"
}

if engine_ok 2>/dev/null; then
    log "the engine's runtime $NAME is ready"
    exit 0
fi

if ! command -v runsc >/dev/null 2>&1; then
    log "installing runsc (gVisor)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runsc >/dev/null
fi

log "registering $NAME in $DAEMON_JSON"
as_root env PYTHONPATH="$ROOT" python3 - "$DAEMON_JSON" "$NAME" "$(command -v runsc)" <<'EOF'
import json, os, sys
from kernelbox_server.sandbox.backends.docker_runtime import Runtime, missing_args

path, name, runsc = sys.argv[1:]
config = {}
if os.path.exists(path) and os.path.getsize(path):
    with open(path) as f:
        config = json.load(f)
spec = config.setdefault("runtimes", {}).setdefault(name, {"path": runsc})
spec.setdefault("path", runsc)
args = spec.get("runtimeArgs", [])
spec["runtimeArgs"] = args + missing_args(Runtime(name, spec["path"], tuple(args)))
tmp = f"{path}.kernelbox-tmp"
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
EOF

pid="${DOCKERD_PID:-$(cat /var/run/docker.pid 2>/dev/null || pidof dockerd)}"
log "reloading the engine's runtimes (SIGHUP to dockerd $pid)"
as_root kill -HUP "$pid"
for _ in $(seq 100); do
    if engine_ok 2>/dev/null; then
        log "the engine's runtime $NAME is ready"
        exit 0
    fi
    sleep 0.3
done
engine_ok  # says why, and fails
