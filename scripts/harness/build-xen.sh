#!/usr/bin/env bash
# Builds the nested Xen the xen driver's tests boot under QEMU (TCG): Debian's Xen 4.17
# hypervisor (as an ELF QEMU's multiboot loader takes), Debian's kernel, and a dom0
# initramfs holding a debootstrapped bookworm with Xen's tools and libvirtd's libxl
# driver (harness/xen/dom0-init.sh as /init), plus a tiny PV guest (the same kernel
# and a busybox initramfs, harness/xen/guest-init.sh) under /var/lib/gve/boot.
#
# Output: $OUT/{xen.elf,vmlinuz,dom0.cpio.zst} (OUT defaults to target/xen). Packages
# come from the mirror the machine's apt sources name. Skips work already done; the
# rootfs (the slow part, ~1-2 min) is cached in $OUT/rootfs.tar.zst.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$(pwd)
out=$(realpath -m "${OUT:-${CARGO_TARGET_DIR:-target}/xen}")
inputs=("$0" harness/xen/dom0-init.sh harness/xen/guest-init.sh harness/xen/gve-libvirtd)
fresh=yes
for f in "${inputs[@]}"; do
    [ -s "$out/dom0.cpio.zst" ] && [ "$out/dom0.cpio.zst" -nt "$f" ] || fresh=
done
if [ -n "$fresh" ] && [ -s "$out/xen.elf" ] && [ -s "$out/vmlinuz" ]; then
    echo "build-xen: up to date in $out"
    exit 0
fi

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
missing=()
for p in debootstrap zstd cpio busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build-xen: installing ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
mirror=$(bash scripts/harness/apt-mirror.sh)
mkdir -p "$out"
work=$(mktemp -d /var/tmp/gve-xen-build.XXXXXX)
# A build cut off inside debootstrap leaves the root's proc (and sys) mounted:
# unmount whatever is below the work directory first, and never let rm cross
# into a mount.
cleanup() {
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do "${sudo_cmd[@]}" umount -l "$m" || true; done
    "${sudo_cmd[@]}" rm -rf --one-file-system "$work"
}
trap cleanup EXIT
t0=$(date +%s)
say() { echo "build-xen: [$(($(date +%s) - t0))s] $*"; }

# The kernel: Debian's generic one runs as dom0 and as a PV guest.
kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
    echo "build-xen: cannot resolve linux-image-amd64 (run apt-get update)" >&2
    exit 1
fi
mkdir -p "$work/debs" "$work/kernel"
(cd "$work/debs" && apt-get -o APT::Sandbox::User=root download -qq "$kernel_pkg")
dpkg -x "$work"/debs/linux-image-*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
say "kernel $kver"

# The dom0 root file system (cached: the slow part).
packages=xen-hypervisor-4.17-amd64,xen-utils-4.17,xen-utils-common,xenstore-utils,iproute2,busybox,kmod,procps,libvirt-daemon,libvirt-daemon-driver-xen,libvirt-clients
root=$work/root
if [ -s "$out/rootfs.tar.zst" ] && [ "$out/rootfs.tar.zst" -nt "$0" ]; then
    mkdir -p "$root"
    zstd -dcq "$out/rootfs.tar.zst" | tar -x -C "$root"
    say "dom0 rootfs from cache"
else
    "${sudo_cmd[@]}" debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
        "$root"/usr/share/man "$root"/usr/share/locale "$root"/usr/share/info
    tar -C "$root" -c . | zstd -T2 -3 -q > "$out/rootfs.tar.zst.tmp"
    mv "$out/rootfs.tar.zst.tmp" "$out/rootfs.tar.zst"
    say "dom0 rootfs debootstrapped ($(du -sh "$root" | cut -f1))"
fi
zcat "$root"/boot/xen-4.17*-amd64.gz > "$out/xen.elf.tmp"

# Only the modules dom0 needs.
rm -rf "$root/lib/modules"
mods=$root/lib/modules/$kver
mkdir -p "$mods"
(cd "$work/kernel/lib/modules/$kver" && cp modules.order modules.builtin* "$mods/" \
    && find kernel/drivers/xen kernel/drivers/block/xen-blkback kernel/drivers/net/xen-netback \
        kernel/drivers/virtio kernel/drivers/net/virtio_net.ko kernel/drivers/net/net_failover.ko \
        kernel/net/core/failover.ko kernel/drivers/block/loop.ko kernel/drivers/net/tun.ko \
        kernel/net/bridge kernel/net/802 kernel/net/llc kernel/fs/9p kernel/net/9p \
        kernel/fs/netfs kernel/fs/fscache -name '*.ko' 2>/dev/null \
    | cpio -pdm --quiet "$mods/")
chroot "$root" /sbin/depmod "$kver"

# The tiny PV guest: the same kernel, a busybox initramfs.
g=$work/guest
mkdir -p "$g"/{bin,sbin,dev,proc,sys,tmp}
cp /bin/busybox "$g/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$g/bin/$applet"
done
printf '#!/bin/busybox sh\nexec /bin/busybox poweroff -f\n' > "$g/sbin/poweroff"
printf '#!/bin/busybox sh\nexec /bin/busybox reboot -f\n' > "$g/sbin/reboot"
cp harness/xen/guest-init.sh "$g/init"
chmod +x "$g/init" "$g/sbin/poweroff" "$g/sbin/reboot"
mkdir -p "$root/var/lib/gve/boot"
(cd "$g" && find . | cpio -o -H newc --quiet | gzip -6) > "$root/var/lib/gve/boot/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$root/var/lib/gve/boot/vmlinuz"

# libvirtd: TCP without authentication (the port is forwarded from 127.0.0.1 only).
# The monolithic daemon exits when a driver fails to load; the QEMU driver would.
rm -f "$root"/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so
mkdir -p "$root/etc/libvirt" "$root/usr/local/sbin"
cat > "$root/etc/libvirt/libvirtd.conf" <<'EOC'
listen_tls = 0
listen_tcp = 1
listen_addr = "0.0.0.0"
auth_tcp = "none"
log_outputs = "3:stderr"
EOC
cp harness/xen/gve-libvirtd "$root/usr/local/sbin/gve-libvirtd"
cp harness/xen/dom0-init.sh "$root/init"
chmod +x "$root/init" "$root/usr/local/sbin/gve-libvirtd"
(cd "$root" && find . | cpio -o -H newc --quiet | zstd -T2 -3 -q) > "$out/dom0.cpio.zst.tmp"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
mv "$out/xen.elf.tmp" "$out/xen.elf"
mv "$out/dom0.cpio.zst.tmp" "$out/dom0.cpio.zst"
say "done in $out ($(du -h "$out/dom0.cpio.zst" | cut -f1) dom0 initramfs)"
cd "$here"
