#!/bin/sh
# Runs inside the nested Xen host's dom0 (scripts/xenhost.sh run), the project at /mnt/vmem.
# One boot, every Xen step tests/test_xen.py checks; each step's output goes to $R/<step>.*
# and its exit status to $R/<step>.rc, so one failing step does not hide the others.
# Usage: sh tests/xen_dom0_steps.sh RESULTS_DIR
R=${1:?results dir}; mkdir -p "$R"
LOG=/var/log/xen/console
. /mnt/vmem/tests/xen_dom0_lib.sh
python3 -c 'import numpy, cffi; print("numpy", numpy.__version__, "cffi", cffi.__version__)'

write_domu_cfg /tmp/vm1.cfg
step create create_domu /tmp/vm1.cfg
cp $LOG/guest-vm1.log "$R/console-boot.log" 2>/dev/null

# record only: the analysis (a simulator run per policy) is the host's job (--from-trace)
step profile python3 -m vmem profile --backend xen --domain vm1 --duration ${PROFILE_S:-4} --interval 250 \
  --record-only --out "$R/profile-trace.npz"

# Xen's own live migration first (its guest check then sees an untouched guest); the stream
# is captured on the share: dom0's root is a RAM filesystem without room for 185 MB
since=$(lines $LOG/guest-vm1--incoming.log)
step xl-migrate xl migrate -s '' vm1 "tee $R/xl-migrate.stream | xl migrate-receive"
step guest-check-xl stamp_check $LOG/guest-vm1--incoming.log "$since"
# the stream stays on the share: tests/test_xen.py inspects it on the host (Python under
# TCG took ~100 s for it) and deletes it

# vmem migrates with the seed's threshold policy, then with two-threshold; xl restore receives
since=$(lines $LOG/guest-vm1--incoming.log)
step migrate-threshold python3 -m vmem migrate --backend xen vm1 --policy threshold --precopy-iterations 5 \
  --precopy-threshold 50 --json "$R/migrate-threshold.json" --pagemap "$R/pagemap-threshold"
step guest-check-threshold stamp_check $LOG/guest-vm1--incoming.log "$since"

since=$(lines $LOG/guest-vm1--incoming.log)
step migrate-two-threshold python3 -m vmem migrate --backend xen vm1 --policy two-threshold --pause-threshold 50 \
  --json "$R/migrate-two-threshold.json"
step guest-check-two-threshold stamp_check $LOG/guest-vm1--incoming.log "$since"



# the verifier fires: a destination page corrupted before the comparison must fail the migration
# and leave the source running
step migrate-inject env VMEM_XEN_INJECT=corrupt-destination-page python3 -m vmem migrate --backend xen vm1 \
  --policy threshold --precopy-iterations 2 --json "$R/migrate-inject.json"
step after-inject sh -c 'xl list; xl domid vm1 && ! xl domid vm1--incoming 2>/dev/null'

# create_domu's check fires: a domU whose stamper dies (SIGILL, as the nested host's AVX
# emulation once made it) is reported at once, with the guest's exit status, not waited out
DOMU_NAME=vm-dies STAMP_MODE=die; write_domu_cfg /tmp/vm-dies.cfg
step create-dies fails create_domu /tmp/vm-dies.cfg
xl destroy vm-dies 2>/dev/null; unset DOMU_NAME STAMP_MODE

cp $LOG/*.log "$R/" 2>/dev/null
{ free -m; dmesg | tail -40; } > "$R/dom0-state.out" 2>&1
xl list > "$R/xl-list.out" 2>&1
xl destroy vm1 2>/dev/null
echo "=== steps done"
