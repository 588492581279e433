#!/usr/bin/env bash
# Builds gve-vsphere-sim, the vSphere API simulator the vmware-esx driver is tested against
# (harness/vsphere-sim), offline from Debian bookworm packages: Go 1.19 and govmomi 0.24.2's
# simulator library as Go source under /usr/share/gocode. The packages are installed with the
# machine's apt configuration when missing. Output: $OUT/gve-vsphere-sim, where OUT defaults
# to target/vsphere-sim (the Go build cache lives in $OUT/gocache). Skips the build when the
# binary is newer than every source file and this script. The last line printed is the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=harness/vsphere-sim
out=$(realpath -m "${OUT:-${CARGO_TARGET_DIR:-target}/vsphere-sim}")
bin=$out/gve-vsphere-sim

if [ -x "$bin" ] && [ -z "$(find "$src" -name '*.go' -newer "$bin")" ] && [ "$bin" -nt "$0" ]; then
    echo "build-vsphere-sim: up to date"
    echo "$bin"
    exit 0
fi

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
run() { "${sudo_cmd[@]}" "$@"; }

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in golang-go golang-github-vmware-govmomi-dev golang-github-google-uuid-dev; do
    have "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build-vsphere-sim: installing ${missing[*]}"
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}"
fi
if [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
    echo "build-vsphere-sim: govmomi's simulator source is not under /usr/share/gocode" >&2
    exit 1
fi

# GOPATH mode, nothing fetched: the main package is copied into a private GOPATH that
# precedes the Debian one.
gopath=$out/gopath
rm -rf "$gopath/src/gve-vsphere-sim"
mkdir -p "$gopath/src/gve-vsphere-sim" "$out/gocache"
cp "$src"/*.go "$gopath/src/gve-vsphere-sim/"
start=$(date +%s)
(cd "$gopath/src/gve-vsphere-sim" &&
    nice -n 19 env GO111MODULE=off GOPROXY=off GOFLAGS= GOTOOLCHAIN=local CGO_ENABLED=0 \
        GOPATH="$gopath:/usr/share/gocode" GOCACHE="$out/gocache" GOMAXPROCS=1 \
        go build -p 1 -trimpath -ldflags='-s -w' -o "$bin.tmp" .)
mv "$bin.tmp" "$bin"
echo "build-vsphere-sim: built in $(( $(date +%s) - start )) s ($(go version | awk '{print $3}'))"
echo "$bin"
