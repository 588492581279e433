#!/usr/bin/env bash
# Builds the tiny real guest the kvm tests boot under QEMU (TCG): Debian's cloud kernel
# and an initramfs of busybox, the virtio modules, the QEMU guest agent (qemu-ga) and
# openssl (as most real guests have it; gve's bulk copies hash with it when there),
# with the libraries they link. Output: $OUT/{vmlinuz,initrd.img,base.qcow2}, where
# OUT defaults to target/guest. Nothing is installed on the host. Skips work already done.
#
# The guest's init finds the virtio-serial port named org.qemu.guest_agent.0, starts
# qemu-ga on it, prints GUEST-READY on the serial console, and keeps a counter in
# /tmp/counter (one tick every 0.5 s) so tests can tell a migrated guest kept running.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${OUT:-${CARGO_TARGET_DIR:-target}/guest}")
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/base.qcow2" ] \
    && [ "$out/initrd.img" -nt "$0" ]; then
    echo "build-guest: up to date in $out"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/debs" "$work/kernel" "$work/qga" "$work/ssl" "$work/root"

kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends:/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
    echo "build-guest: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2
    exit 1
fi
(cd "$work/debs" && apt-get -o APT::Sandbox::User=root download -qq "$kernel_pkg" qemu-guest-agent openssl)
dpkg -x "$work"/debs/linux-image-*.deb "$work/kernel"
dpkg -x "$work"/debs/qemu-guest-agent_*.deb "$work/qga"
dpkg -x "$work"/debs/openssl_*.deb "$work/ssl"
kver=$(ls "$work/kernel/lib/modules")

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,lib/modules,var/run,var/lib/qemu-ga}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
# Load order is dependency order; Debian's cloud kernel ships them uncompressed.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console virtio_blk"
for m in $modules; do
    found=$(find "$work/kernel/lib/modules/$kver" -name "$m.ko" | head -n 1)
    [ -n "$found" ] || { echo "build-guest: module $m not in $kernel_pkg" >&2; exit 1; }
    cp "$found" "$root/lib/modules/"
done
cp "$work/qga/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
cp "$work/ssl/usr/bin/openssl" "$root/usr/bin/openssl"
# Both are linked dynamically: copy every library ldd names (the host is the same release).
libs=$(for b in "$work/qga/usr/sbin/qemu-ga" "$work/ssl/usr/bin/openssl"; do ldd "$b"; done)
if grep -q 'not found' <<<"$libs"; then
    echo "build-guest: this host lacks a library the guest's tools link:" >&2
    grep 'not found' <<<"$libs" >&2
    exit 1
fi
for lib in $(grep -o '/[^ )]*' <<<"$libs" | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

cat > "$root/init" <<EOT
#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $modules; do insmod /lib/modules/\$m.ko 2>/dev/null; done
hostname gve-guest
port=
for try in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    for p in /sys/class/virtio-ports/*; do
        [ -f "\$p/name" ] && [ "\$(cat "\$p/name")" = org.qemu.guest_agent.0 ] && port=/dev/\${p##*/}
    done
    [ -n "\$port" ] && break
    sleep 0.1
done
if [ -n "\$port" ]; then
    qemu-ga -d -m virtio-serial -p "\$port" -t /var/lib/qemu-ga -f /var/run/qemu-ga.pid
    echo "gve-guest: qemu-ga on \$port"
fi
( n=0; while :; do n=\$((n + 1)); echo \$n > /tmp/counter; sleep 0.5; done ) &
echo "GUEST-READY uptime=\$(cut -d' ' -f1 /proc/uptime)"
exec setsid cttyhack sh
EOT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -6) > "$out/initrd.img.tmp"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
# The template disk: the guest boots from kernel + initrd; clones are overlays of this.
rm -f "$out/base.qcow2"
qemu-img create -q -f qcow2 "$out/base.qcow2" 64M
echo "build-guest: $kernel_pkg + qemu-ga + openssl in $out ($(du -h "$out/initrd.img" | cut -f1) initrd)"
