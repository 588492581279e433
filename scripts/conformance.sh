#!/usr/bin/env bash
# Runs the conformance suite against every driver on its target and writes the
# support matrix (docs/support-matrix.md) from the reports. With --check, fails when
# a declared capability fails or the committed matrix differs from what these runs
# give.
#
# Targets:
#   memory  the SDK's example, in-process (a second endpoint, template alpine-3);
#   kvm     real QEMU guests (TCG) under two private libvirtd (gve-lab kvm), guest
#           operations through guest-install, template tiny, migration between them.
# Reports go to target/conformance/<driver>/.
set -euo pipefail
cd "$(dirname "$0")/.."
check=""
[ "${1:-}" = "--check" ] && check="--check"
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p gve-conformance -p gve-harness
bash scripts/build-plugins.sh >/dev/null
bin="$target_dir/release/gve-conformance"
plugins="$target_dir/plugins"
out="$target_dir/conformance"
rm -rf "$out"
mkdir -p "$out"

# One driver: its run's summary goes to the log; a failed case fails the script.
prove() {
    local driver=$1
    shift
    echo "conformance: $driver"
    if ! "$bin" run --plugin "$plugins/$driver" --report "$out/$driver" "$@" >"$out/$driver.log" 2>&1; then
        cat "$out/$driver.log" >&2
        echo "conformance: $driver failed (report in $out/$driver/)" >&2
        exit 1
    fi
    tail -n 1 "$out/$driver.log"
}

prove memory --endpoint memory:conformance --second-host memory:conformance-b \
    --template alpine-3

# The kvm lab lives while fd 3 is open: it ends its guests and daemons when this
# script closes it or dies.
lab_env="$out/kvm-lab.env"
exec 3> >(exec "$target_dir/release/gve-lab" kvm --env "$lab_env" >"$out/kvm-lab.log" 2>&1)
lab_pid=$!
end_lab() {
    exec 3>&-
    for _ in $(seq 1 120); do
        kill -0 "$lab_pid" 2>/dev/null || return 0
        sleep 0.5
    done
    echo "conformance: gve-lab ($lab_pid) did not end in 60 s" >&2
}
trap end_lab EXIT
for _ in $(seq 1 240); do
    [ -f "$lab_env" ] && break
    kill -0 "$lab_pid" 2>/dev/null || { cat "$out/kvm-lab.log" >&2; exit 1; }
    sleep 0.5
done
[ -f "$lab_env" ] || { echo "conformance: the kvm lab did not come up in 120 s" >&2; exit 1; }
# shellcheck disable=SC1090
. "$lab_env"
prove kvm --endpoint "$GVE_LAB_URI_1" --second-host "$GVE_LAB_MIGRATE_2" --template tiny \
    --grant-libvirt "$GVE_LAB_URI_1" --grant-libvirt "$GVE_LAB_MIGRATE_2" \
    --config storage-pool=gve --config shutdown-timeout-ms=2000 --config shared-storage=true \
    --guest-plugin "$plugins/guest-install"
end_lab
trap - EXIT

"$bin" matrix "$out"/memory/report.json "$out"/kvm/report.json --out docs/support-matrix.md $check
if [ -n "$check" ]; then state="is current"; else state="written"; fi
echo "conformance: memory and kvm proven; docs/support-matrix.md $state"
