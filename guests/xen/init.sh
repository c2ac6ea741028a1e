#!/bin/sh
# /init of the PVH domU's busybox initramfs (vmem's Xen tests): mount, report, start the stamper.
# Kernel command line words stamp_mib=, stamp_rate=, stamp_check= set the workload (guests/xen/stamper.c);
# stamp_mode=inject|die passes that test mode on.
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mib=16 rate=2000 check=2 mode=
for w in $(cat /proc/cmdline); do
  case $w in stamp_mib=*) mib=${w#*=};; stamp_rate=*) rate=${w#*=};; stamp_check=*) check=${w#*=};; stamp_mode=*) mode=${w#*=};; esac
done
echo "=== DOMU UP uptime $(cat /proc/uptime) hv=$(cat /sys/hypervisor/type 2>/dev/null)"
/bin/stamper "$mib" "$rate" "$check" $mode &
# The stamper never ends on its own: if it does (a signal: rc 128+N), say so with the kernel's
# last words (print-fatal-signals on the command line puts the faulting instruction there),
# so a test names the crash instead of waiting out a silent guest.
wait $!; rc=$?
echo "=== STAMPER EXITED rc=$rc"
dmesg | tail -n 40
while true; do sleep 3600; done
