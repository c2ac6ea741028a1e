#!/bin/sh
# /init of the PVH domU's busybox initramfs (vmem's Xen tests): mount, report, start the stamper.
# Kernel command line words stamp_mib=, stamp_rate=, stamp_check= set the workload (guests/xen/stamper.c).
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mib=16 rate=2000 check=2
for w in $(cat /proc/cmdline); do
  case $w in stamp_mib=*) mib=${w#*=};; stamp_rate=*) rate=${w#*=};; stamp_check=*) check=${w#*=};; esac
done
echo "=== DOMU UP uptime $(cat /proc/uptime) hv=$(cat /sys/hypervisor/type 2>/dev/null)"
/bin/stamper "$mib" "$rate" "$check" &
while true; do sleep 3600; done
