#!/bin/sh
# Runs inside the nested Xen host's dom0: N vmem migrations of one live PVH domU in a row
# (policies alternate threshold / two-threshold), each followed by the stamper's check on
# the moved guest, then N `xl migrate`s of the same guest with the same check: the evidence
# behind docs/xen.md's reliability figures.
# Usage: scripts/xenhost.sh run 'sh tests/xen_dom0_repeat.sh /mnt/vmem/RESULTS N [XL_N]'
R=${1:?results dir}; N=${2:-4}; XN=${3:-$N}; mkdir -p "$R"
LOG=/var/log/xen/console
. /mnt/vmem/tests/xen_dom0_lib.sh
write_domu_cfg /tmp/vm1.cfg
step create create_domu /tmp/vm1.cfg
i=1
while [ $i -le "$N" ]; do
  if [ $((i % 2)) = 1 ]; then pol="--policy threshold --precopy-iterations 5 --precopy-threshold 50"
  else pol="--policy two-threshold --pause-threshold 50"; fi
  since=$(lines $LOG/guest-vm1--incoming.log)
  step vmem-$i python3 -m vmem migrate --backend xen vm1 $pol --json "$R/vmem-$i.json"
  step check-vmem-$i stamp_check $LOG/guest-vm1--incoming.log "$since"
  i=$((i + 1))
done
i=1
while [ $i -le "$XN" ]; do
  since=$(lines $LOG/guest-vm1--incoming.log)
  step xl-$i xl migrate -s '' vm1 "xl migrate-receive"
  step check-xl-$i stamp_check $LOG/guest-vm1--incoming.log "$since"
  i=$((i + 1))
done
xl list > "$R/xl-list.out" 2>&1
xl destroy vm1 2>/dev/null
echo "=== repeat done"
