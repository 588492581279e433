#!/usr/bin/env bash
# Runs the conformance suite against every driver on its target and writes the
# support matrix (docs/support-matrix.md) from the reports. With --check, fails when
# the committed matrix differs from what these runs give.
#
# Targets run here: the SDK's memory example (in-process). Reports go to
# target/conformance/<driver>/.
set -euo pipefail
cd "$(dirname "$0")/.."
check=""
[ "${1:-}" = "--check" ] && check="--check"
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p gve-conformance
bash scripts/build-plugins.sh >/dev/null
bin="$target_dir/release/gve-conformance"
out="$target_dir/conformance"
rm -rf "$out"
"$bin" run --plugin "$target_dir/plugins/memory" --endpoint memory:conformance \
    --second-host memory:conformance-b --template alpine-3 --report "$out/memory" >/dev/null
"$bin" matrix "$out"/*/report.json --out docs/support-matrix.md $check
if [ -n "$check" ]; then state="is current"; else state="written"; fi
echo "conformance: $(ls "$out" | wc -l) driver(s) proven; docs/support-matrix.md $state"
