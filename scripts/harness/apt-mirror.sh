#!/usr/bin/env bash
# Prints the first Debian mirror (not the security one) the machine's apt sources name.
# The project writes no registry host name of its own: whatever the machine uses, it uses.
set -euo pipefail
mirror=$( { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
    | sed -nE 's/^URIs:[[:space:]]*//p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//p' \
    | awk '!/security/ {print $1; exit}')
if [ -z "$mirror" ]; then
    echo "apt-mirror: no Debian mirror found in the machine's apt sources" >&2
    exit 1
fi
echo "$mirror"
