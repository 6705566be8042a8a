#!/usr/bin/env bash
# Refresh the Swagger UI and Redoc files that /docs and /redoc serve (service/static/), from
# the PyPI package drf-spectacular-sidecar, which ships the upstream builds of swagger-ui-dist
# and redoc (with their licences) and is released monthly. Only the files pages need are
# copied, with each project's LICENSE and the licences of what its bundle includes; source
# maps are left out. Usage: scripts/vendor-docs-assets.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" "drf-spectacular-sidecar${version:+==$version}"
python3 -m zipfile -e "$tmp"/drf_spectacular_sidecar-*.whl "$tmp/wheel"
src="$tmp/wheel/drf_spectacular_sidecar/static/drf_spectacular_sidecar"
dst=service/static
mkdir -p "$dst/swagger-ui" "$dst/redoc"
cp "$src"/swagger-ui-dist/{LICENSE,swagger-ui-bundle.js,swagger-ui-bundle.js.LICENSE.txt,swagger-ui.css,favicon-32x32.png} "$dst/swagger-ui/"
cp "$src"/redoc/LICENSE "$src"/redoc/bundles/{redoc.standalone.js,redoc.standalone.js.LICENSE.txt} "$dst/redoc/"
ls "$tmp"/drf_spectacular_sidecar-*.whl | sed 's/.*drf_spectacular_sidecar-\([^-]*\)-.*/vendored from drf-spectacular-sidecar \1/'
