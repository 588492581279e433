#!/usr/bin/env bash
# Builds every plugin component and assembles its bundle directory.
#
# A plugin is a crate (a workspace member) with a gve-plugin.toml next to its
# Cargo.toml, under sdk/examples/*, plugins/* or host/tests/fixtures/*. All of them are
# built in one cargo invocation for wasm32-wasip2 with the `plugin` profile; then
# <target>/plugins/<name>/ gets the manifest and the component, renamed to the
# manifest's `component`. <target> is $CARGO_TARGET_DIR or target/.
#
#   bash scripts/build-plugins.sh            build and assemble every bundle
#   bash scripts/build-plugins.sh --clippy   lint the SDK and every plugin instead
set -euo pipefail
cd "$(dirname "$0")/.."

mode=build
case "${1:-}" in
    "") ;;
    --clippy) mode=clippy ;;
    *) echo "usage: $0 [--clippy]" >&2; exit 2 ;;
esac

# toml_get FILE SECTION KEY: the quoted string value of KEY in [SECTION] ("" = top level).
toml_get() {
    awk -v want="$2" -v key="$3" '
        /^[[:space:]]*\[/ { section = $0; gsub(/^[[:space:]]*\[|\][[:space:]]*$/, "", section); next }
        section == want && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" {
            value = $0
            sub(/^[^=]*=[[:space:]]*"/, "", value)
            sub(/".*$/, "", value)
            print value
            exit
        }' "$1"
}

dirs=()
packages=()
for manifest in sdk/examples/*/gve-plugin.toml plugins/*/gve-plugin.toml host/tests/fixtures/*/gve-plugin.toml conformance/tests/fixtures/*/gve-plugin.toml; do
    [ -f "$manifest" ] || continue
    dir=$(dirname "$manifest")
    # A plugin in another language builds itself (its build.sh).
    [ -f "$dir/build.sh" ] && continue
    if [ ! -f "$dir/Cargo.toml" ]; then
        echo "build-plugins: $dir has a gve-plugin.toml but neither a Cargo.toml nor a build.sh" >&2
        exit 1
    fi
    package=$(toml_get "$dir/Cargo.toml" package name)
    if [ -z "$package" ]; then
        echo "build-plugins: no [package] name in $dir/Cargo.toml" >&2
        exit 1
    fi
    dirs+=("$dir")
    packages+=("$package")
done
if [ "${#dirs[@]}" -eq 0 ]; then
    echo "build-plugins: no plugin crates found" >&2
    exit 1
fi

pflags=()
for p in "${packages[@]}"; do
    pflags+=(-p "$p")
done

if [ "$mode" = clippy ]; then
    cargo clippy --locked --target wasm32-wasip2 --profile plugin -p gve-sdk "${pflags[@]}" -- -D warnings
    exit 0
fi

cargo build --locked --target wasm32-wasip2 --profile plugin "${pflags[@]}"

target=${CARGO_TARGET_DIR:-target}
out="$target/plugins"
mkdir -p "$out"
for i in "${!dirs[@]}"; do
    dir=${dirs[$i]}
    manifest="$dir/gve-plugin.toml"
    name=$(toml_get "$manifest" "" name)
    version=$(toml_get "$manifest" "" version)
    component=$(toml_get "$manifest" "" component)
    if [ -z "$name" ] || [ -z "$component" ]; then
        echo "build-plugins: $manifest needs name and component" >&2
        exit 1
    fi
    lib=$(toml_get "$dir/Cargo.toml" lib name)
    lib=${lib:-${packages[$i]}}
    wasm="$target/wasm32-wasip2/plugin/${lib//-/_}.wasm"
    if [ ! -f "$wasm" ]; then
        echo "build-plugins: $wasm was not built (is $dir a cdylib?)" >&2
        exit 1
    fi
    # A component starts with \0asm, version 0x0d, layer 1; a core module with layer 0.
    magic=$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')
    if [ "$magic" != "0061736d0d000100" ]; then
        echo "build-plugins: $wasm is not a component (header $magic)" >&2
        exit 1
    fi
    bundle="$out/$name"
    rm -rf "$bundle"
    mkdir -p "$bundle"
    cp "$manifest" "$bundle/gve-plugin.toml"
    cp "$wasm" "$bundle/$component"
    size=$(($(wc -c <"$bundle/$component") / 1024))
    echo "plugin $name $version: $bundle/$component (${size} KiB, from $dir)"
done
