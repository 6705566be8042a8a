#!/usr/bin/env bash
# Build the Docker backend's kernel image: scripts/build-kernel-image.sh [IMAGE]
# (default kernelbox-kernel:latest, or $IMAGE). Kept for `make image` and older notes; the
# work is done by scripts/build-images.sh, which builds the service image too (see there for
# the base image, the no-registry path and the environment it reads).
set -euo pipefail
export KERNEL_IMAGE="${1:-${IMAGE:-${KERNEL_IMAGE:-kernelbox-kernel:latest}}}"
exec "$(dirname "${BASH_SOURCE[0]}")/build-images.sh" kernel
