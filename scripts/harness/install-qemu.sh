#!/usr/bin/env bash
# Installs what the real-hypervisor tests need: QEMU 10 from bookworm-backports (the
# machine's qemu-utils is the backports build; bookworm's 7.2 would conflict), libvirt's
# QEMU driver, and the tools that build the tiny test guest. Backports is reached
# through a private apt configuration whose mirror is read from the machine's own apt
# sources; nothing under /etc/apt is changed. Safe to run again.
set -euo pipefail

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
run() { "${sudo_cmd[@]}" "$@"; }

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if ! have qemu-system-x86 || ! dpkg-query -W -f='${Version}' qemu-system-x86 | grep -q bpo; then
    mirror=$(bash "$(dirname "$0")/apt-mirror.sh")
    apt_dir=/var/cache/gve/apt-backports
    run mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    run tee "$apt_dir/sources.list" >/dev/null <<EOT
deb [signed-by=$keyring] $mirror bookworm main
deb [signed-by=$keyring] $mirror bookworm-updates main
deb [signed-by=$keyring] $mirror bookworm-backports main
EOT
    opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives")
    echo "install-qemu: qemu-system-x86 from bookworm-backports ($mirror)"
    run apt-get "${opts[@]}" update -qq
    # Only QEMU and the packages that must match its version come from backports;
    # everything else resolves from bookworm.
    bpo=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
    run env DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${bpo[@]/%//bookworm-backports}"
fi

missing=()
for p in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients busybox-static cpio; do
    have "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}"
fi

# libvirt 9.0's QEMU driver wants its compiled-in user and group even when QEMU runs as
# root (libvirt-daemon-system, which creates them, pulls in systemd units we do not use).
getent group kvm >/dev/null || run groupadd --system kvm
getent group libvirt-qemu >/dev/null || run groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || run useradd --system -g kvm -M -d /var/lib/libvirt libvirt-qemu
if [ ! -s /etc/libvirt/qemu.conf ] || ! grep -q '^user = "root"' /etc/libvirt/qemu.conf; then
    run mkdir -p /etc/libvirt
    printf 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\n' | run tee /etc/libvirt/qemu.conf >/dev/null
fi
echo "install-qemu: $(qemu-system-x86_64 --version | head -n 1); $(libvirtd --version)"
