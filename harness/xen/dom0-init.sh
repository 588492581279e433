#!/bin/sh
# /init of the nested Xen dom0 the tests boot under QEMU (built by
# scripts/harness/build-xen.sh): brings up Xen's toolstack and libvirtd (libxl
# driver, TCP without authentication: reachable only through QEMU's loopback port
# forward), a command shell for tests on port 2323 (same), then idles.
# Kernel arguments: gve.host=N names this host gve-xen-N at 192.168.77.N on eth1
# (the link to the other host; every gve-xen-N resolves); gve.images=TAG mounts
# that 9p share at /var/lib/gve/images (the pool every host sees).
# Progress goes to the Xen console (the serial log); GVE-DOM0-READY ends the boot.
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# What udev would make; Xen's hotplug scripts lock through /dev/stdin.
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
echo "gve-dom0: userspace at $(cut -d' ' -f1 /proc/uptime)s"
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback xen-netback \
    virtio_pci virtio_net bridge loop tun 9p 9pnet_virtio; do
    modprobe "$m" || echo "gve-dom0: modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored /var/log/xen/console /var/lib/xen /run/libvirt \
    /var/lib/libvirt/libxl /var/log/libvirt/libxl /var/lib/gve/images
host=1 images=
for a in $(cat /proc/cmdline); do
    case "$a" in
    gve.host=*) host=${a#gve.host=} ;;
    gve.images=*) images=${a#gve.images=} ;;
    esac
done
echo "gve-xen-$host" > /etc/hostname
hostname "gve-xen-$host"
{
    echo "127.0.0.1 localhost"
    for i in 1 2 3 4; do echo "192.168.77.$i gve-xen-$i"; done
} > /etc/hosts
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
if ip link show eth1 >/dev/null 2>&1; then
    ip link set eth1 up && ip addr add "192.168.77.$host/24" dev eth1
fi
if [ -n "$images" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$images" /var/lib/gve/images \
        || echo "gve-dom0: cannot mount the shared pool $images"
fi
# The tests' command channel (loopback-forwarded by QEMU; a test machine only).
busybox nc -ll -p 2323 -e /bin/sh &
B=$(ls -d /usr/lib/xen-*/bin | head -n 1)
"$B/xenstored" --pid-file /run/xenstore.pid
"$B/xen-init-dom0"
"$B/xenconsoled" --pid-file /run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
# The template's disk: 16 MiB, raw, a marker in its first sector.
truncate -s 16M /var/lib/gve/images/tiny-base.img
echo "gve tiny base disk" | dd of=/var/lib/gve/images/tiny-base.img conv=notrunc 2>/dev/null
echo "gve-dom0: toolstack up at $(cut -d' ' -f1 /proc/uptime)s; $(xl info | grep -E '^xen_version')"
gve-libvirtd start
i=0
while ! virsh -q -c xen:///system version >/dev/null 2>&1 && [ $i -lt 600 ]; do
    sleep 0.5
    i=$((i + 1))
done
virsh -c xen:///system version | sed 's/^/gve-dom0: /'
echo "GVE-DOM0-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
while :; do sleep 3600; done
