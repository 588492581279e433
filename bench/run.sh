#!/usr/bin/env bash
# Runs the benchmarks and writes their results under bench/results/.
# Usage: bash bench/run.sh [criterion filter]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo bench --locked -p gve --bench plugin -- "${@}"
python3 bench/summarize.py "$target/criterion" > bench/results/plugin.md
cat bench/results/plugin.md
