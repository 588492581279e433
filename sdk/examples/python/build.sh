#!/usr/bin/env bash
# Builds the Python driver into a bundle: componentize-py turns app.py and driver.py,
# with CPython itself, into a component of the world `hypervisor-driver` of
# wit/0.1. Usage: build.sh [BUNDLE_DIR] (default: target/plugins/py-driver).
# componentize-py comes from PATH, else from target/py-venv (scripts/setup.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out=${1:-"${CARGO_TARGET_DIR:-$repo/target}/plugins/py-driver"}
cpy=$(command -v componentize-py || echo "$repo/target/py-venv/bin/componentize-py")
[ -x "$cpy" ] || { echo "build.sh: no componentize-py (pip install componentize-py==0.25.1, or run scripts/setup.sh)" >&2; exit 1; }
mkdir -p "$out"
cp "$here/gve-plugin.toml" "$out/"
cd "$here"
"$cpy" -d "$repo/wit/0.1" -w hypervisor-driver componentize app -o "$out/py-driver.wasm" >/dev/null
rm -rf "$here/__pycache__"
echo "$out"
