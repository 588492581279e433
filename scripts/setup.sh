#!/usr/bin/env bash
# Sets up a fresh machine for gve: system packages, the wasm32-wasip2 target, the
# host binary and every plugin component. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

# libvirt's C library and headers (the `virt` crate), its client tools, and the
# daemon with the QEMU driver (used by the kvm driver's tests).
packages=(pkg-config libvirt-dev libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu systemd chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# QEMU 10 (bookworm-backports), libvirt's QEMU driver and the guest-building tools:
# the kvm driver's tests run real guests under TCG.
bash scripts/harness/install-qemu.sh

# The API fuzzer (Schemathesis, from the machine's configured Python index) in its
# own virtualenv, for scripts/api-fuzz.sh.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "setup: installing python3-venv"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends python3-venv
fi
if [ ! -x target/fuzz-venv/bin/st ]; then
    echo "setup: installing Schemathesis into target/fuzz-venv"
    python3 -m venv target/fuzz-venv
    target/fuzz-venv/bin/pip install -q "schemathesis==4.32.5"
fi

# componentize-py, for the SDK's Python driver example (sdk/examples/python) and
# the guide's section on other languages.
if [ ! -x target/py-venv/bin/componentize-py ]; then
    echo "setup: installing componentize-py into target/py-venv"
    python3 -m venv target/py-venv
    target/py-venv/bin/pip install -q "componentize-py==0.25.1"
fi

rustup target add wasm32-wasip2
echo "setup: building the gve host (release)"
cargo build --release --locked -p gve -p gve-conformance -p gve-harness
echo "setup: building plugin components"
bash scripts/build-plugins.sh
echo "setup: building the tiny test guest"
bash scripts/harness/build-guest.sh
echo "setup: building the vSphere API simulator (harness/vsphere-sim)"
bash scripts/harness/build-vsphere-sim.sh >/dev/null
echo "setup: building the nested Xen (Xen 4.17 and a Debian dom0 with libvirtd's libxl driver)"
bash scripts/harness/build-xen.sh
echo "setup: done. The binary is target/release/gve; plugin bundles are in target/plugins/."
