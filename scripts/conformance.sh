#!/usr/bin/env bash
# Runs the conformance suite against every driver on its target and writes the
# support matrix (docs/support-matrix.md) from the reports. With --check, fails when
# a declared capability fails or the committed matrix differs from what these runs
# give.
#
#   bash scripts/conformance.sh [--check] [TARGET...]
#
# TARGETs (default: all of them, then matrix):
#   memory  the SDK's example, in-process (a second endpoint, template alpine-3);
#   kvm     real QEMU guests (TCG) under two private libvirtd (gve-lab kvm), guest
#           operations through guest-install, template tiny, migration between them;
#   vmware-esx  the project's vSphere API simulator (harness/vsphere-sim), twice: a
#           vCenter inventory (relocation to another host) and a standalone ESXi
#           host; TLS pinned to the simulator's certificate, native guest operations;
#   xen     a real Xen 4.17 nested under QEMU (gve-lab xen, or the one the env file
#           $GVE_XEN_LAB describes), libvirt's libxl driver, PV template tiny-pv;
#   matrix  the support matrix from the reports of all of them (written, or with
#           --check compared with the committed one).
# Reports go to target/conformance/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
check=""
if [ "${1:-}" = "--check" ]; then
    check="--check"
    shift
fi
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(memory kvm vmware-esx xen matrix)
for t in "${targets[@]}"; do
    case "$t" in
        memory | kvm | vmware-esx | xen | matrix) ;;
        *) echo "conformance: unknown target '$t' (memory, kvm, vmware-esx, xen, matrix)" >&2; exit 2 ;;
    esac
done
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p gve-conformance -p gve-harness
bash scripts/build-plugins.sh >/dev/null
sim=$(bash scripts/harness/build-vsphere-sim.sh | tail -n 1)
bin="$target_dir/release/gve-conformance"
plugins="$target_dir/plugins"
out="$target_dir/conformance"
mkdir -p "$out"

# One run, reported as NAME, of the driver whose bundle is named DRIVER: its summary
# goes to the log; a failed case fails the script.
prove_as() {
    local name=$1 driver=$2
    shift 2
    rm -rf "${out:?}/$name"
    echo "conformance: $name"
    if ! "$bin" run --plugin "$plugins/$driver" --report "$out/$name" "$@" >"$out/$name.log" 2>&1; then
        cat "$out/$name.log" >&2
        echo "conformance: $name failed (report in $out/$name/)" >&2
        exit 1
    fi
    tail -n 1 "$out/$name.log"
}
prove() { prove_as "$1" "$@"; }

# vmware-esx on a simulator started with ARGS, held on fd 4 (it ends when the fd
# closes); reported as NAME with LABEL.
prove_vsphere() {
    local name=$1 label=$2
    shift 2
    local env_file="$out/$name-sim.env" args=() i
    IFS=' ' read -r -a args <<<"$1"
    shift
    exec 4> >(exec "$sim" "${args[@]}" -template gve-tiny >"$env_file" 2>"$out/$name-sim.log")
    for i in $(seq 1 100); do
        grep -q '^GVE_VSPHERE_READY=1' "$env_file" 2>/dev/null && break
        sleep 0.2
    done
    grep -q '^GVE_VSPHERE_READY=1' "$env_file" || { cat "$out/$name-sim.log" >&2; exit 1; }
    local url authority thumb
    url=$(sed -n 's/^GVE_VSPHERE_URL=//p' "$env_file")
    authority=$(sed -n 's/^GVE_VSPHERE_AUTHORITY=//p' "$env_file")
    thumb=$(sed -n 's/^GVE_VSPHERE_THUMBPRINT=//p' "$env_file")
    GVE_CONFORMANCE_PASSWORD=gve-secret prove_as "$name" vmware-esx --label "$label" \
        --endpoint "$url" --username gve \
        --grant-http "$authority" --grant-tls "$authority=sha256:$thumb" \
        --config guest-username=root --config guest-password=guest-secret \
        --template gve-tiny --linked-source gve-tiny "$@"
    exec 4>&-
}

# A lab (gve-lab KIND) that lives while fd 3 is open: it ends its guests and daemons
# when this script closes it or dies. Its env file is $lab_env once it is up.
lab_pid=""
start_lab() {
    local kind=$1
    lab_env="$out/$kind-lab.env"
    rm -f "$lab_env"
    exec 3> >(exec "$target_dir/release/gve-lab" "$kind" --env "$lab_env" >"$out/$kind-lab.log" 2>&1)
    lab_pid=$!
    trap end_lab EXIT
    for _ in $(seq 1 1200); do
        [ -f "$lab_env" ] && return 0
        kill -0 "$lab_pid" 2>/dev/null || { cat "$out/$kind-lab.log" >&2; exit 1; }
        sleep 0.5
    done
    echo "conformance: the $kind lab did not come up in 600 s" >&2
    exit 1
}
end_lab() {
    [ -n "$lab_pid" ] || return 0
    exec 3>&-
    for _ in $(seq 1 120); do
        kill -0 "$lab_pid" 2>/dev/null || { lab_pid=""; return 0; }
        sleep 0.5
    done
    echo "conformance: gve-lab ($lab_pid) did not end in 60 s" >&2
}

for t in "${targets[@]}"; do
    case "$t" in
    memory)
        prove memory --endpoint memory:conformance --second-host memory:conformance-b \
            --template alpine-3
        ;;
    kvm)
        start_lab kvm
        # shellcheck disable=SC1090
        . "$lab_env"
        prove kvm --endpoint "$GVE_LAB_URI_1" --second-host "$GVE_LAB_MIGRATE_2" --template tiny \
            --grant-libvirt "$GVE_LAB_URI_1" --grant-libvirt "$GVE_LAB_MIGRATE_2" \
            --config storage-pool=gve --config shutdown-timeout-ms=2000 --config shared-storage=true \
            --guest-plugin "$plugins/guest-install"
        end_lab
        trap - EXIT
        ;;
    vmware-esx)
        prove_vsphere vmware-esx-vcenter vCenter "" --destination-host DC0_H0
        prove_vsphere vmware-esx-esxi ESXi "-esx"
        ;;
    xen)
        if [ -n "${GVE_XEN_LAB:-}" ]; then
            lab_env=$GVE_XEN_LAB
        else
            start_lab xen
        fi
        # shellcheck disable=SC1090
        . "$lab_env"
        # The two hosts share the pool, as Xen hosts must for migration; a PV guest
        # can be migrated once its kernel is up (plugins/xen/README.md).
        prove xen --endpoint "$GVE_LAB_XEN_URI" --second-host "$GVE_LAB_XEN_URI_2" \
            --grant-libvirt "$GVE_LAB_XEN_URI" --grant-libvirt "$GVE_LAB_XEN_URI_2" \
            --template tiny-pv --config storage-pool=gve --config shutdown-timeout-ms=20000 \
            --config shared-storage=true --boot-s 20
        end_lab
        trap - EXIT
        ;;
    matrix)
        "$bin" matrix "$out"/memory/report.json "$out"/kvm/report.json \
            "$out"/vmware-esx-vcenter/report.json "$out"/vmware-esx-esxi/report.json \
            "$out"/xen/report.json --out docs/support-matrix.md $check
        if [ -n "$check" ]; then state="is current"; else state="written"; fi
        echo "conformance: docs/support-matrix.md $state"
        ;;
    esac
done
