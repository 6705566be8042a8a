#!/bin/sh
# Entrypoint of the service image (Dockerfile), run under tini.
#
#   serve | exec | agent | --help ...   run `kernelbox ...`
#   anything else                       run it as given (e.g. `sh`)
#
# Before `kernelbox serve`, with the data directory (KERNELBOX_DATA_DIR) on the volume the
# kernels' directories are bound from:
#   1. take an exclusive lock on it for the life of the service: two services on one data
#      directory would delete each other's files, so a second one refuses to start;
#   2. delete the session directories a previous service left (it was killed or crashed; its
#      sessions are gone with it, and the lock says it is not running). Its kernel containers
#      are removed by the service itself at start (the Docker backend's orphan reaping);
#   3. as root: give the directory to the `kernelbox` user, then drop to that user with the
#      Docker socket's group as its only extra group (no capabilities are kept). A socket
#      that only root can use (no group access) keeps the service root, with a warning.
# Started as another user (`user:` in compose), steps 2-3 do what that user can.
set -eu

SERVICE_UID=1000
SERVICE_GID=1000

log() { printf 'kernelbox-entrypoint: %s\n' "$*" >&2; }

[ "$#" -gt 0 ] || set -- serve
case "$1" in
    serve | exec | agent | -h | --help) set -- kernelbox "$@" ;;
esac

if [ "$1" = kernelbox ] && [ "${2:-}" = serve ]; then
    DATA="${KERNELBOX_DATA_DIR:-/var/lib/kernelbox}"
    mkdir -p "$DATA"
    # fd 9 stays open through setpriv and exec: the lock lives as long as the service does.
    exec 9>>"$DATA/.service.lock"
    if ! flock -n 9; then
        log "another kernelbox service is using $DATA; refusing to start"
        exit 1
    fi
    for stale in "$DATA"/instance-*; do
        [ -e "$stale" ] || continue
        log "removing $stale, left by a service that did not shut down"
        rm -rf "$stale" || log "could not remove all of $stale"
    done
fi

if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi

# -- root: find the Docker socket's group, then drop to the service user ----------------------
docker_host="${DOCKER_HOST:-unix:///var/run/docker.sock}"
groups="--clear-groups"
case "$docker_host" in
    unix:*)
        sock="${docker_host#unix:}"
        sock="/${sock#"${sock%%[!/]*}"}"  # unix:///path and unix:/path alike
        if [ ! -S "$sock" ]; then
            # Serving on the Docker backend: kernels need the engine (the local variant's
            # local backend runs them itself and needs no socket).
            if [ -n "${DATA:-}" ] && [ "${KERNELBOX_BACKEND:-docker}" = docker ]; then
                log "no Docker socket at $sock: mount it (see docker-compose.yml) or set DOCKER_HOST"
            fi
        else
            gid="$(stat -c %g "$sock")"
            mode="$(stat -c %a "$sock")"
            # The group's permission digit (the last but one) must allow read and write.
            case "$(printf '%s' "$mode" | tail -c 2 | head -c 1)" in
                6 | 7) groups="--groups=$gid" ;;
                *)
                    log "the Docker socket $sock (mode $mode) is usable by its owner only:" \
                        "the service runs as root. Make it group-accessible to run as a user."
                    exec "$@"
                    ;;
            esac
        fi
        ;;
    *) ;;  # tcp:// or ssh:// (e.g. a socket proxy): no local group needed
esac

if [ -n "${DATA:-}" ]; then
    # What a root service left (or a new bind mount) becomes the service user's. Cheap: the
    # session directories are gone; what remains is the runtime directory of locks and sockets.
    chown -R "$SERVICE_UID:$SERVICE_GID" "$DATA"
fi
export HOME=/home/kernelbox USER=kernelbox LOGNAME=kernelbox
exec setpriv --reuid="$SERVICE_UID" --regid="$SERVICE_GID" "$groups" --inh-caps=-all -- "$@"
