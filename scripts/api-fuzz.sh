#!/usr/bin/env bash
# Fuzzes the site's HTTP API against docs/openapi.yaml and the agent's against
# docs/agent-openapi.yaml with Schemathesis: a real `gve site` and a memory-driver
# `gve agent` on loopback, bounded in time. Fails on any server error or any answer
# the documents do not describe.
# Usage: scripts/api-fuzz.sh [SECONDS] (default 120; the agent gets half as long
# again). Needs scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${1:-120}"
gve="$PWD/target/release/gve"
st="$PWD/target/fuzz-venv/bin/st"
[ -x "$st" ] || { echo "api-fuzz: no $st (run scripts/setup.sh)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
admin="fuzz-admin-token-0123456789"
agent_token="fuzz-agent-token-0123456789"
cat > "$work/agent.toml" <<EOT
listen = "127.0.0.1:0"
data-dir = "agent"
admin-token = "$agent_token"
[plugins.memory]
bundle = "$PWD/target/plugins/memory"
[driver]
plugin = "memory"
endpoint = "memory:fuzz"
EOT
cat > "$work/site.toml" <<EOT
listen = "127.0.0.1:0"
data-dir = "site"
admin-token = "$admin"
health-period-ms = 1000
EOT
"$gve" agent run --config "$work/agent.toml" 2> "$work/agent.log" &
pids+=($!)
"$gve" site run --config "$work/site.toml" 2> "$work/site.log" &
pids+=($!)
url_in() { grep -o 'listening on http://[0-9.:]*' "$1" | head -n 1 | sed 's/listening on //'; }
for _ in $(seq 1 200); do
    agent_url=$(url_in "$work/agent.log" || true)
    site_url=$(url_in "$work/site.log" || true)
    [ -n "$agent_url" ] && [ -n "$site_url" ] && break
    sleep 0.1
done
[ -n "${agent_url:-}" ] && [ -n "${site_url:-}" ] || { cat "$work"/*.log >&2; exit 1; }
export GVE_URL="$site_url" GVE_TOKEN="$admin"
"$gve" agent add a-0 "$agent_url" --secret "$agent_token" > /dev/null
"$gve" user add fuzz > /dev/null
echo "api-fuzz: site $site_url, agent $agent_url, ${budget}s"
# fuzz DOC URL TOKEN [schemathesis options]
fuzz() {
    local doc=$1 url=$2 token=$3
    shift 3
    # A run that found no failure but crashed inside Schemathesis itself (a
    # "Runtime Error", seen with CPython 3.11's AST recursion check) is run again
    # once; any API failure fails at once.
    for attempt in 1 2; do
        if "$st" run "$doc" --url "$url" \
            -H "Authorization: Bearer $token" \
            --request-timeout 20 --workers 2 --suppress-health-check all --no-color "$@" \
            > "$work/st.log" 2>&1; then
            cat "$work/st.log"
            return 0
        fi
        cat "$work/st.log"
        if grep -q "= FAILURES =" "$work/st.log" || ! grep -q "Runtime Error" "$work/st.log" || [ "$attempt" = 2 ]; then
            return 1
        fi
        echo "api-fuzz: Schemathesis crashed without finding an API failure; running it again"
    done
}
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
# Everything but agent registration and checks, held to every check.
fuzz docs/openapi.yaml "$site_url" "$admin" --checks "$checks" --max-time "$budget" \
    --exclude-path-regex '/events$' --exclude-operation-id registerAgent --exclude-operation-id checkAgent
# Those two promise a 503 when the agent named cannot be reached (the fuzzer's
# agent URLs lead nowhere): held to the document, not to "no 5xx".
fuzz docs/openapi.yaml "$site_url" "$admin" --checks "${checks#not_a_server_error,}" --max-time 20 \
    --include-operation-id registerAgent --include-operation-id checkAgent

# The agent, on a driver of its own (the site's agent keeps its VMs). Left out:
# what would take the agent's driver or plugins away from the rest of the run
# (driver, plugin load/replace/unload, site registration).
sed 's/memory:fuzz/memory:fuzz-agent/; s/data-dir = "agent"/data-dir = "agent-b"/' "$work/agent.toml" \
    > "$work/agent-b.toml"
"$gve" agent run --config "$work/agent-b.toml" 2> "$work/agent-b.log" &
pids+=($!)
for _ in $(seq 1 200); do
    agent_b=$(url_in "$work/agent-b.log" || true)
    [ -n "$agent_b" ] && break
    sleep 0.1
done
[ -n "${agent_b:-}" ] || { cat "$work/agent-b.log" >&2; exit 1; }
echo "api-fuzz: agent $agent_b, $((budget / 2))s"
agent_excluded=(--exclude-operation-id setDriver --exclude-operation-id loadPlugin
    --exclude-operation-id replacePlugin --exclude-operation-id unloadPlugin
    --exclude-operation-id setSite)
# Guest reads answer at once with the guest provider's error (unavailable 503 for a
# VM that is not running), and provisioning with 501 on an agent without a
# bundles-dir (as this one): held to the document, not to "no 5xx".
guest_reads=(--include-operation-id statFile --include-operation-id copyOut
    --include-operation-id copyIn --include-operation-id provisionVm)
fuzz docs/agent-openapi.yaml "$agent_b" "$agent_token" --checks "$checks" --max-time $((budget / 2)) \
    "${agent_excluded[@]}" --exclude-operation-id statFile --exclude-operation-id copyOut \
    --exclude-operation-id copyIn --exclude-operation-id provisionVm
# The file routes (binary bodies) crash Schemathesis's coverage phase on CPython
# 3.11 ("AST constructor recursion depth mismatch"): they get the other phases.
fuzz docs/agent-openapi.yaml "$agent_b" "$agent_token" --checks "${checks#not_a_server_error,}" \
    --max-time 15 --phases examples,fuzzing,stateful "${guest_reads[@]}"
