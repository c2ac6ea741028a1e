#!/bin/sh
# /init of the nested Xen test host's dom0 (Debian minbase + xen-utils-4.17 + python3 in the
# initramfs; built by scripts/xenhost.sh).  Starts Xen's daemons, mounts the 9p shares
# ("vmem" = the project at /mnt/vmem, "run" = this boot's folder at /mnt/run), runs
# /mnt/run/cmd.sh with its output teed to /mnt/run/out and the console, writes its exit
# status to /mnt/run/rc, and powers off (QEMU exits with the machine).
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /dev/shm
echo "=== XENHOST DOM0 INIT uptime $(cut -d' ' -f1 /proc/uptime)"
for m in xenfs xen-privcmd xen-evtchn xen-gntdev xen-gntalloc virtio_pci 9pnet_virtio 9p; do
  modprobe $m || echo "=== XENHOST modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen/console /tmp /mnt/vmem /mnt/run
xenstored --pid-file /run/xenstored.pid || echo "=== XENHOST xenstored failed"
xen-init-dom0 >/dev/null || echo "=== XENHOST xen-init-dom0 failed"
xenconsoled --log=guest --log-dir=/var/log/xen/console || echo "=== XENHOST xenconsoled failed"
ip link set lo up 2>/dev/null
# msize: 9p's default 8 KiB messages make Python imports over the share crawl
opts=trans=virtio,version=9p2000.L,msize=262144,cache=none
mount -t 9p -o $opts vmem /mnt/vmem || echo "=== XENHOST cannot mount the project share"
mount -t 9p -o $opts run /mnt/run || echo "=== XENHOST cannot mount the run share"
echo "=== XENHOST READY uptime $(cut -d' ' -f1 /proc/uptime)"
if [ -f /mnt/run/cmd.sh ]; then
  cd /mnt/vmem
  export PYTHONPATH=/mnt/vmem PYTHONDONTWRITEBYTECODE=1 VMEM_XENHOST=1 XENHOST_DOMU_DIR=/root/domu
  { sh /mnt/run/cmd.sh; echo $? > /mnt/run/rc; } 2>&1 | tee /mnt/run/out
  echo "=== XENHOST RC $(cat /mnt/run/rc) uptime $(cut -d' ' -f1 /proc/uptime)"
else
  echo "=== XENHOST no /mnt/run/cmd.sh"
fi
cd /; sync; umount /mnt/run /mnt/vmem 2>/dev/null
/bin/busybox poweroff -f
