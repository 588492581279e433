#!/usr/bin/env bash
# The SDK guide as a test: runs every `sh` block of sdk/README.md, in order, in one
# shell, from an empty directory holding `gve/` (this checkout), as a plugin author
# following the guide would. A block after a `<!-- guide-test: not run -->` line is
# skipped (it needs a real hypervisor). For section 8 an agent is started first and
# named in GVE_AGENT_URL; section 11 finds componentize-py in target/py-venv. Needs
# scripts/setup.sh to have run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target_dir=$(cd "$repo" && realpath -m "${CARGO_TARGET_DIR:-target}")
work=$(mktemp -d /tmp/gve-guide.XXXXXX)
agent_pid=""
finish() {
    if [ -n "$agent_pid" ]; then
        kill "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap finish EXIT
ln -s "$repo" "$work/gve"

# The blocks, each announced, into one script.
awk '
    /<!-- guide-test: not run -->/ { skip = 1; next }
    /^```sh$/ { inblock = 1; n++; if (!skip) printf "echo \"guide-test: block %d (sdk/README.md line %d)\"\n", n, NR; next }
    /^```/ && inblock { inblock = 0; skip = 0; next }
    inblock && !skip { print }
' "$repo/sdk/README.md" > "$work/guide.sh"
blocks=$(grep -c '^echo "guide-test: block' "$work/guide.sh" || true)
[ "$blocks" -ge 4 ] || { echo "guide-test: only $blocks runnable blocks found in sdk/README.md" >&2; exit 1; }

# An agent for section 8, on a free port, allowing bundles from the work directory.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/agent"
cat > "$work/agent/agent.toml" <<TOML
listen = "127.0.0.1:$port"
data-dir = "$work/agent/data"
admin-token = "change-me-0123456789"
[plugin-policy]
bundle-dirs = ["$work"]
max-memory-mib = 64
TOML
"$target_dir/release/gve" agent run --config "$work/agent/agent.toml" >"$work/agent/log" 2>&1 &
agent_pid=$!
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null && break
    kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent/log" >&2; exit 1; }
    sleep 0.1
done

# The author's own build directory is kept between runs (compiling the SDK for
# wasm32 takes a minute); the guide honours CARGO_TARGET_DIR.
if (cd "$work" && env PATH="$target_dir/release:$repo/target/py-venv/bin:$PATH" \
        GVE_AGENT_URL="http://127.0.0.1:$port" \
        CARGO_TARGET_DIR="$target_dir/guide-driver" \
        bash -euo pipefail guide.sh) >"$work/out" 2>&1; then
    [ -n "${GUIDE_TEST_VERBOSE:-}" ] && cat "$work/out"
    echo "guide-test: $blocks blocks of sdk/README.md ran"
else
    cat "$work/out" >&2
    echo "guide-test: sdk/README.md failed as written (agent log follows)" >&2
    tail -n 20 "$work/agent/log" >&2
    exit 1
fi
