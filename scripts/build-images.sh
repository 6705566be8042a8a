#!/usr/bin/env bash
# Build kernelbox's images: scripts/build-images.sh [all|kernel|service|local]   (default: all)
#
#   kernel   the Docker backend's kernel image (Dockerfile.kernel)  -> $KERNEL_IMAGE
#   service  the service image (Dockerfile), for docker-compose.yml -> $SERVICE_IMAGE
#   all      both of those (what `make test` and CI build)
#   local    the service image for where it runs kernels itself     -> $LOCAL_IMAGE
#            (Dockerfile with build arguments: the local backend's kernels and their data stack,
#            bubblewrap, Ray $RAY_VERSION; KERNELBOX_BACKEND=local): the image of the Kubernetes
#            manifests (deploy/kubernetes/service/ and ray/). Not part of `all`: Ray alone is
#            a large download and build.
#
# All are built on the same base, with or without a registry:
#   - if the base image (BASE, default python:3.12-slim) is present or can be pulled, use it;
#   - otherwise make a Debian base from the host's own apt sources with mmdebstrap (installed
#     with apt-get when missing) and `docker import` it as kernelbox-base:<suite>, once;
#     later builds reuse it without trying the registry again.
# The classic builder with `--network host` (apt and pip reach the host's network during the
# build, never at run time); the host's extra CA certificates are passed for pip behind a
# TLS-intercepting proxy. A rebuild with nothing changed reuses every cached layer: seconds.
#
# Environment:
#   KERNEL_IMAGE     kernel image name                         (kernelbox-kernel:latest)
#   SERVICE_IMAGE    service image name                        (kernelbox:latest)
#   LOCAL_IMAGE      local-backend service image name          (kernelbox-local:latest)
#   RAY_VERSION      Ray in the local image: the RayCluster's rayVersion (deploy/kubernetes/ray/)
#   BASE             public base image to try first            (python:3.12-slim)
#   LOCAL_BASE       name of the mmdebstrap-made base          (kernelbox-base:bookworm)
#   DEBIAN_SUITE     suite for mmdebstrap                      (bookworm)
#   APT_SOURCES      deb822 sources file for mmdebstrap        (/etc/apt/sources.list.d/debian.sources)
#   FORCE_LOCAL_BASE=1  skip the public base, always use the Debian one
#   EXTRA_CA_CERTS_FILE  PEM file of extra CAs for pip (default: /usr/local/share/ca-certificates/*.crt)
set -euo pipefail

WHAT="${1:-all}"
case "$WHAT" in
    all | kernel | service | local) ;;
    *) echo "usage: $0 [all|kernel|service|local]" >&2; exit 2 ;;
esac
KERNEL_IMAGE="${KERNEL_IMAGE:-kernelbox-kernel:latest}"
SERVICE_IMAGE="${SERVICE_IMAGE:-kernelbox:latest}"
LOCAL_IMAGE="${LOCAL_IMAGE:-kernelbox-local:latest}"
# Equal to rayVersion in deploy/kubernetes/ray/raycluster.yaml (tests/test_kubernetes_manifests.py
# checks): every Ray node and Ray Client must run the same Ray, and KubeRay adapts to it.
RAY_VERSION="${RAY_VERSION:-2.60.0}"
BASE="${BASE:-python:3.12-slim}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
LOCAL_BASE="${LOCAL_BASE:-kernelbox-base:${DEBIAN_SUITE}}"
APT_SOURCES="${APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf 'build-images: %s\n' "$*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

make_local_base() {
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        log "installing mmdebstrap"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
    fi
    local sources="$APT_SOURCES"
    if [ ! -f "$sources" ]; then
        # No deb822 file (older hosts): fall back to Debian's own mirror.
        sources="http://deb.debian.org/debian"
        log "no $APT_SOURCES; using $sources"
    fi
    local tmp status=0
    tmp="$(mktemp -d)"
    log "making $LOCAL_BASE from Debian $DEBIAN_SUITE packages (mmdebstrap)"
    as_root mmdebstrap --quiet --variant=apt \
        --include=python3,python3-venv,ca-certificates,tini \
        "$DEBIAN_SUITE" "$tmp/base.tar" "$sources" \
        && docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' \
            "$tmp/base.tar" "$LOCAL_BASE" >/dev/null \
        || status=$?
    as_root rm -rf "$tmp"
    [ "$status" -eq 0 ] || { log "could not make $LOCAL_BASE"; exit "$status"; }
    log "imported $LOCAL_BASE"
}

pick_base() {
    # No network for a rebuild: a base already here wins (the public one first); a pull is
    # tried only when neither is.
    if [ "${FORCE_LOCAL_BASE:-0}" != 1 ]; then
        if have_image "$BASE"; then echo "$BASE"; return; fi
        if have_image "$LOCAL_BASE"; then echo "$LOCAL_BASE"; return; fi
        # A registry may be unreachable (air-gapped machines): do not let a pull hang long.
        if timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then echo "$BASE"; return; fi
        log "$BASE is neither present nor pullable; using a Debian base"
    fi
    have_image "$LOCAL_BASE" || make_local_base
    echo "$LOCAL_BASE"
}

extra_ca_certs() {
    # CAs the host trusts beyond the system set (e.g. a TLS-intercepting egress proxy), so
    # pip inside the build can reach PyPI the way the host does.
    if [ -n "${EXTRA_CA_CERTS_FILE:-}" ]; then
        cat "$EXTRA_CA_CERTS_FILE"
    else
        find /usr/local/share/ca-certificates -name '*.crt' -type f -print0 2>/dev/null \
            | sort -z | xargs -0 -r cat
    fi
}

base="$(pick_base)"
build_args=(--build-arg "BASE=$base")
ca="$(extra_ca_certs)"
if [ -n "$ca" ]; then build_args+=(--build-arg "EXTRA_CA_CERTS=$ca"); fi
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    if [ -n "${!var:-}" ]; then build_args+=(--build-arg "$var=${!var}"); fi
done

# BuildKit needs the buildx plugin with a recent client; the classic builder works
# everywhere, caches layer by layer, and `--network host` lets apt and pip reach the
# host's network during the build (never at run time).
if docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=1
else
    export DOCKER_BUILDKIT=0
fi

# Both images carry the hash of the boot files they were built from (kernel_boot.py and
# forkserver_boot.py, copied into the kernel image): the backend compares it with its own copies
# and warns when the kernel image is stale. In the service image, those copies are the ones it runs.
boot_sha="$(cat sandbox/kernel_boot.py sandbox/forkserver_boot.py | sha256sum | cut -d' ' -f1)"
build_args+=(--label "kernelbox.boot.sha256=$boot_sha")

build() {  # build DOCKERFILE IMAGE [DOCKER-BUILD-ARGUMENTS...]
    log "building $2 ($1) on $base"
    local start dockerfile="$1" image="$2"
    shift 2
    start=$(date +%s)
    docker build --network host -f "$dockerfile" -t "$image" "${build_args[@]}" "$@" . >&2
    log "built $image in $(( $(date +%s) - start )) s"
}

case "$WHAT" in
    all | kernel) build Dockerfile.kernel "$KERNEL_IMAGE" ;;
esac
case "$WHAT" in
    all | service) build Dockerfile "$SERVICE_IMAGE" ;;
esac
if [ "$WHAT" = local ]; then
    # The Docker image minus its leanness: the local backend runs kernels with the service's
    # interpreter (KERNEL_ONLY= keeps ipykernel and the data stack), inside bubblewrap; the Ray
    # mode's pods need Ray, pinned.
    build Dockerfile "$LOCAL_IMAGE" \
        --build-arg "KERNEL_ONLY=" \
        --build-arg "EXTRA_APT_PACKAGES=bubblewrap" \
        --build-arg "EXTRAS=ray" \
        --build-arg "EXTRA_PINS=ray==$RAY_VERSION" \
        --build-arg "SERVICE_BACKEND=local" \
        --label "kernelbox.variant=local"
fi
