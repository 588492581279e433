#!/bin/sh
# /init of the tiny Xen PV guest (kernel + this busybox initramfs): says it is up on
# its console (hvc0, logged by xenconsoled in dom0), then ticks there about five
# times a second (a counter and its uptime: across a migration the counter goes on,
# and the uptime jumps by the time the guest stood still, which the kernel takes from
# the wall clocks of the two hosts' Xen), and powers off when Xen asks it to shut
# down (the kernel runs /sbin/poweroff).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "GVE-XEN-GUEST-READY $(cat /sys/hypervisor/guest_type 2>/dev/null) uptime=$(cut -d' ' -f1 /proc/uptime)"
head -c 19 /dev/xvda 2>/dev/null | sed 's/^/gve-guest: disk says: /'; echo
n=0
while :; do
    n=$((n + 1))
    read -r up _ </proc/uptime
    echo "gve-tick $n $up"
    usleep 200000
done
