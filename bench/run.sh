#!/usr/bin/env bash
# Runs the benchmarks and writes their results under bench/results/.
# Usage: bash bench/run.sh [plugin|vm_start|guest|site]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
which=${1:-all}
if [ "$which" = all ] || [ "$which" = plugin ]; then
    cargo bench --locked -p gve --bench plugin
    python3 bench/summarize.py "$target/criterion" > bench/results/plugin.md
    cat bench/results/plugin.md
fi
if [ "$which" = all ] || [ "$which" = vm_start ]; then
    # Real QEMU guests under a private libvirtd (needs scripts/setup.sh).
    cargo bench --locked -p gve --bench vm_start
fi
if [ "$which" = all ] || [ "$which" = guest ]; then
    # exec latency and copy throughput on a real guest, vs raw qemu-ga.
    cargo bench --locked -p gve --bench guest
fi
if [ "$which" = all ] || [ "$which" = site ]; then
    # Durable job submissions per second; request latency added by the site.
    cargo bench --locked -p gve --bench site
fi
