#!/usr/bin/env bash
# Runs every check and test of gve. Run scripts/setup.sh once before.
#
#   bash scripts/test.sh [--tier default|xen|all]     (default: all)
#
# Tiers: `default` (lint, unit and integration tests, conformance of memory, kvm and
# vmware-esx, the SDK guide, API fuzzing) and `xen` (the xen driver's tests and
# conformance on a real Xen nested under QEMU, booted once for the tier). With
# `all`, the support matrix is then checked against every driver's report. Each
# tier's wall time is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
# A failing test shows where it panicked; and the hostile tests check that errors
# handed to plugins carry no backtrace of the host even with backtraces on.
export RUST_BACKTRACE=1

tier=all
case "${1:-}" in
    "") ;;
    --tier)
        tier=${2:-}
        case "$tier" in default | xen | all) ;; *) echo "usage: $0 [--tier default|xen|all]" >&2; exit 2 ;; esac
        ;;
    *) echo "usage: $0 [--tier default|xen|all]" >&2; exit 2 ;;
esac

default_tier() {
    echo "test: formatting"
    cargo fmt --all --check
    echo "test: clippy (host, native)"
    cargo clippy --release --locked -p gve -p gve-harness -p gve-conformance --all-targets -- -D warnings
    echo "test: clippy (plugins, wasm32-wasip2)"
    bash scripts/build-plugins.sh --clippy
    echo "test: SDK and plugin unit tests (native)"
    cargo test --locked -p gve-sdk -p gve-libvirt-common -p gve-plugin-guest-install -p gve-plugin-vmware-esx
    echo "test: host unit and integration tests (the Xen tests are the xen tier's)"
    cargo test --release --locked -p gve -- --skip xen
    echo "test: conformance suite (library, CLI, the memory example as its specification)"
    cargo test --release --locked -p gve-conformance
    echo "test: conformance of memory, kvm (real QEMU guests) and vmware-esx (the vSphere simulator)"
    bash scripts/conformance.sh memory kvm vmware-esx
    echo "test: the SDK guide's commands, as written (template to bundle, inspect, load, conformance)"
    bash scripts/guide-test.sh
    echo "test: API fuzzing of the site and the agent against docs/openapi.yaml and docs/agent-openapi.yaml (bounded)"
    bash scripts/api-fuzz.sh 60
}

xen_tier() {
    local target_dir=${CARGO_TARGET_DIR:-target}
    cargo build --release --locked -p gve-harness
    bash scripts/build-plugins.sh >/dev/null
    # Two nested Xen hosts for the tier (sharing a pool and a link, for migration),
    # held on fd 5: they end when this shell closes it or dies.
    local env_file="$target_dir/xen-tier.env"
    rm -f "$env_file"
    echo "test: booting two nested Xen hosts (Xen 4.17 under QEMU TCG, dom0 libvirtd with libxl)"
    exec 5> >(exec "$target_dir/release/gve-lab" xen --env "$env_file" >"$target_dir/xen-tier-lab.log" 2>&1)
    local lab_pid=$!
    for _ in $(seq 1 1200); do
        [ -f "$env_file" ] && break
        kill -0 "$lab_pid" 2>/dev/null || { cat "$target_dir/xen-tier-lab.log" >&2; exit 1; }
        sleep 0.5
    done
    [ -f "$env_file" ] || { echo "test: the nested Xen hosts did not come up in 600 s" >&2; exit 1; }
    echo "test: xen driver through the agent and the site, against the nested Xen"
    GVE_XEN_LAB=$(realpath "$env_file") cargo test --release --locked -p gve --test all xen
    echo "test: conformance of xen on the nested Xen"
    GVE_XEN_LAB=$(realpath "$env_file") bash scripts/conformance.sh xen
    exec 5>&-
    for _ in $(seq 1 120); do
        kill -0 "$lab_pid" 2>/dev/null || break
        sleep 0.5
    done
}

timed() {
    local name=$1 start=$SECONDS
    shift
    echo "test: tier $name"
    "$@"
    echo "test: tier $name passed in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
}

case "$tier" in
    default) timed default default_tier ;;
    xen) timed xen xen_tier ;;
    all)
        timed default default_tier
        timed xen xen_tier
        echo "test: the support matrix (docs/support-matrix.md) is the one these runs give"
        bash scripts/conformance.sh --check matrix
        ;;
esac
