#!/usr/bin/env bash
# Runs the benchmarks and writes their results under bench/results/.
# Usage: bash bench/run.sh [plugin|footprint|vm_start|fig4|guest|bulk|site|site-flame|history|scale|million|soak|vsphere|xen|xen_migrate|kvm_migrate|fuzz]   (default: all)
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
if [ "$which" = all ] || [ "$which" = fig4 ]; then
    # The paper's Fig. 4: N VMs started through the site until usable, vs libvirt
    # + guest-ping on the same daemon (GVE_FIG4_ROUNDS rounds per N, default 5).
    cargo bench --locked -p gve --bench fig4
fi
if [ "$which" = all ] || [ "$which" = guest ]; then
    # exec latency and copy throughput on a real guest, vs raw qemu-ga.
    cargo bench --locked -p gve --bench guest
fi
if [ "$which" = all ] || [ "$which" = bulk ]; then
    # 1 GiB into and out of a running guest through a staged disk, vs by hand.
    cargo bench --locked -p gve --bench bulk
fi
if [ "$which" = all ] || [ "$which" = site ]; then
    # Durable job submissions per second; request latency added by the site.
    cargo bench --locked -p gve --bench site
fi
if [ "$which" = site-flame ]; then
    # A flame graph of the submissions' hot path (bench/results/site-flame.svg):
    # perf (Debian: linux-perf) samples the site bench's first part, inferno
    # (cargo install --locked inferno) draws it. Not part of "all".
    command -v perf >/dev/null || { echo "site-flame needs perf (apt-get install linux-perf)" >&2; exit 1; }
    command -v inferno-flamegraph >/dev/null || cargo install --locked inferno
    bin=$(cargo bench --locked -p gve --bench site --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "site":
        print(m["executable"])')
    data=$(mktemp -d "$target/site-flame.XXXXXX")
    GVE_SITE_PROFILE=1 perf record -F 499 --call-graph dwarf,16384 -o "$data/perf.data" "$bin" --bench
    perf script -i "$data/perf.data" 2>/dev/null | inferno-collapse-perf > "$data/folded"
    inferno-flamegraph --minwidth 1.5 --title "gve site: durable job submissions (bench/site.rs, part 1)" \
        < "$data/folded" > bench/results/site-flame.svg
    rm -rf "$data"
    echo "wrote bench/results/site-flame.svg"
fi
if [ "$which" = all ] || [ "$which" = history ]; then
    # A request's cost (listings, event streams, exec, request) as the site's
    # history grows to 100,000 jobs (GVE_HISTORY_JOBS to change it).
    cargo bench --locked -p gve --bench history
fi
if [ "$which" = all ] || [ "$which" = scale ]; then
    # An agent with 100,000 VMs (GVE_SCALE_VMS) and a site over it: reconcile,
    # health checks, listings, idle CPU and memory.
    cargo bench --locked -p gve --bench scale
fi
if [ "$which" = million ]; then
    # A site at a million: 1,000,000 VMs over 10 memory agents and 10,000,000
    # jobs (GVE_MILLION_AGENTS, GVE_MILLION_VMS_PER_AGENT, GVE_MILLION_JOBS).
    # About an hour and 25 GB of disk at the defaults: not part of "all".
    cargo bench --locked -p gve --bench million
fi
if [ "$which" = all ] || [ "$which" = soak ]; then
    # 30 minutes of steady mixed load from many users: memory, files and
    # databases flat after the warm-up (GVE_SOAK_SECONDS to change the length).
    cargo bench --locked -p gve --bench soak
fi
if [ "$which" = all ] || [ "$which" = vsphere ]; then
    # vmware-esx through gve vs the same SOAP calls made directly (vSphere simulator).
    cargo bench --locked -p gve --bench vsphere
fi
if [ "$which" = all ] || [ "$which" = xen ]; then
    # Start and graceful shutdown on a real Xen nested under QEMU, vs virsh on its dom0.
    cargo bench --locked -p gve --bench xen
fi
if [ "$which" = all ] || [ "$which" = kvm_migrate ]; then
    # Live migration of a kvm guest between two private libvirtds: through the
    # site vs virsh migrate --live (total time and QEMU's downtime).
    cargo bench --locked -p gve --bench kvm_migrate
fi
if [ "$which" = all ] || [ "$which" = xen_migrate ]; then
    # Live migration between two Xen hosts nested under QEMU, vs virsh migrate.
    cargo bench --locked -p gve --bench xen_migrate
fi
if [ "$which" = all ] || [ "$which" = fuzz ]; then
    # The vmware-esx reply readers (XML, SOAP faults, property pages, records, tasks)
    # on mutated replies: no input may panic them.
    iters=300000
    line=$(GVE_FUZZ_ITERS=$iters cargo test --release --locked -p gve-plugin-vmware-esx fuzz -- --nocapture 2>&1 |
        grep '^fuzz:')
    {
        echo "# vmware-esx: reply readers under fuzzing"
        echo
        echo "\`bash bench/run.sh fuzz\` on $(date -u +%Y-%m-%d): plugins/vmware-esx/src/fuzz.rs mutates"
        echo "replies of every form the driver reads (property pages with missing objects, SOAP faults,"
        echo "task errors, service content, container views): bytes flipped, cut, spliced, markup and"
        echo "entities inserted, elements removed, repeated and moved. Every input must end in a value"
        echo "or a typed error."
        echo
        echo "$line"
    } > bench/results/vsphere-fuzz.md
    cat bench/results/vsphere-fuzz.md
fi
