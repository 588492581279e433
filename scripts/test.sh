#!/usr/bin/env bash
# Runs every check and test of gve. Run scripts/setup.sh once before.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "test: formatting"
cargo fmt --all --check
echo "test: clippy (host, native)"
cargo clippy --release --locked -p gve -p gve-harness -p gve-conformance --all-targets -- -D warnings
echo "test: clippy (plugins, wasm32-wasip2)"
bash scripts/build-plugins.sh --clippy
echo "test: SDK and plugin unit tests (native)"
cargo test --locked -p gve-sdk -p gve-plugin-guest-install -p gve-plugin-vmware-esx
echo "test: host unit and integration tests"
cargo test --release --locked -p gve
echo "test: conformance suite (library, CLI, the memory example as its specification)"
cargo test --release --locked -p gve-conformance
echo "test: conformance of every driver on its target (memory; kvm on real QEMU guests); the support matrix in docs is the one these runs give"
bash scripts/conformance.sh --check
echo "test: the SDK guide's commands, as written (template to bundle, inspect, load, conformance)"
bash scripts/guide-test.sh
echo "test: API fuzzing of the site and the agent against docs/openapi.yaml and docs/agent-openapi.yaml (bounded)"
bash scripts/api-fuzz.sh 60
