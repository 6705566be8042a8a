#!/usr/bin/env bash
# Refresh the Ace editor files that the playground at / serves (service/static/playground/ace/),
# from the PyPI package django-ace, which ships the upstream ace-builds release unchanged (with
# Ace's BSD licence in its LICENCE file) and follows Ace's releases. Only what the page loads is
# copied: the editor, the Python mode, a theme, the search box, the static highlighter.
# Usage: scripts/vendor-playground-assets.sh [VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" "django-ace${version:+==$version}"
python3 -m zipfile -e "$tmp"/django_ace-*.whl "$tmp/wheel"
src="$tmp/wheel/django_ace/static/django_ace/ace"
dst=service/static/playground/ace
rm -rf "$dst"
mkdir -p "$dst"
cp "$src"/{ace.js,mode-python.js,theme-github_light_default.js,ext-searchbox.js,ext-static_highlight.js} "$dst/"
cp "$tmp"/wheel/django_ace-*.dist-info/licenses/LICENCE "$dst/LICENSE"
ls "$tmp"/django_ace-*.whl | sed 's/.*django_ace-\([^-]*\)-.*/vendored Ace from django-ace \1/'
