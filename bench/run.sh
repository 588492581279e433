#!/usr/bin/env bash
# Runs the benchmarks and writes their results under bench/results/.
# Usage: bash bench/run.sh [plugin|footprint|vm_start|guest|site]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
which=${1:-all}
if [ "$which" = all ] || [ "$which" = plugin ]; then
    cargo bench --locked -p gve --bench plugin
    python3 bench/summarize.py "$target/criterion" > bench/results/plugin.md
    cat bench/results/plugin.md
fi
if [ "$which" = all ] || [ "$which" = footprint ]; then
    # What one plugin costs by source language: component size, compile time,
    # instantiation, linear memory (gve plugin inspect over built bundles).
    bash scripts/build-plugins.sh >/dev/null
    bash sdk/examples/python/build.sh >/dev/null
    {
        echo "# Plugin footprint"
        echo
        echo "\`gve plugin inspect\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -m); compile"
        echo "is a cold compile (no cache; the agent caches compiled code on disk)."
        echo
        echo "| plugin | language | component | compile | instantiate | first info | linear memory |"
        echo "|---|---|---|---|---|---|---|"
        for p in memory kvm guest-install py-driver; do
            lang=Rust
            [ "$p" = py-driver ] && lang="Python (componentize-py 0.25.1)"
            "$target/release/gve" plugin inspect "$target/plugins/$p" -o json 2>/dev/null |
                python3 bench/footprint.py "$lang"
        done
    } > bench/results/plugin-footprint.md
    cat bench/results/plugin-footprint.md
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
