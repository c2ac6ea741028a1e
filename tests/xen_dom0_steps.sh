#!/bin/sh
# Runs inside the nested Xen host's dom0 (scripts/xenhost.sh run), the project at /mnt/vmem.
# One boot, every Xen step tests/test_xen.py checks; each step's output goes to $R/<step>.*
# and its exit status to $R/<step>.rc, so one failing step does not hide the others.
# Usage: sh tests/xen_dom0_steps.sh RESULTS_DIR
R=${1:?results dir}; mkdir -p "$R"
LOG=/var/log/xen/console
up() { cut -d' ' -f1 /proc/uptime; }
# step NAME CMD...: run, keep output and status, print a one-line summary on the console
step() {
  n=$1; shift; t=$(up)
  "$@" > "$R/$n.out" 2>&1; rc=$?
  echo "$rc" > "$R/$n.rc"; awk "BEGIN{printf \"%.2f\n\", $(up)-$t}" > "$R/$n.seconds"
  echo "=== step $n rc=$rc in $(cat "$R/$n.seconds")s"; tail -3 "$R/$n.out"
}
# stamp_check LOGFILE SINCE_LINE: wait (bounded) for 2 STAMP lines after SINCE_LINE; all must say bad=0
stamp_check() {
  # (no variable named n here: step() keeps the step's name in n; sh has no locals)
  f=$1; since=$2; i=0
  while [ $i -lt 60 ]; do
    seen=$(tail -n +$((since + 1)) "$f" 2>/dev/null | grep -c "STAMP n=")
    [ "${seen:-0}" -ge 2 ] && break; sleep 1; i=$((i + 1))
  done
  tail -n +$((since + 1)) "$f" | grep "STAMP n=" | head -5
  tail -n +$((since + 1)) "$f" | grep "STAMP n=" | head -5 | grep -q "STAMP n=" || { echo "no STAMP line after the migration"; return 1; }
  ! tail -n +$((since + 1)) "$f" | grep "STAMP n=" | grep -qv " bad=0 "
}
lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
python3 -c 'import numpy, cffi; print("numpy", numpy.__version__, "cffi", cffi.__version__)'

cat > /tmp/vm1.cfg <<EOC
name="vm1"
type="pvh"
kernel="/root/domu/vmlinuz"
ramdisk="/root/domu/initrd.gz"
extra="console=hvc0 rdinit=/init quiet stamp_mib=${STAMP_MIB:-16} stamp_rate=${STAMP_RATE:-500} stamp_check=1"
memory=${DOMU_MIB:-128}
vcpus=1
on_crash="preserve"
tsc_mode="native"
EOC
step create sh -c 'xl create /tmp/vm1.cfg && i=0; while [ $i -lt 90 ]; do grep -q "STAMP n=3" '$LOG'/guest-vm1.log 2>/dev/null && exit 0; sleep 1; i=$((i+1)); done; exit 1'
cp $LOG/guest-vm1.log "$R/console-boot.log" 2>/dev/null

# record only: the analysis (a simulator run per policy) is the host's job (--from-trace)
step profile python3 -m vmem profile --backend xen --domain vm1 --duration ${PROFILE_S:-4} --interval 250 \
  --record-only --out "$R/profile-trace.npz"

# Xen's own live migration first (its guest check then sees an untouched guest); the stream
# is captured on the share: dom0's root is a RAM filesystem without room for 140 MB
since=$(lines $LOG/guest-vm1--incoming.log)
step xl-migrate xl migrate -s '' vm1 "tee $R/xl-migrate.stream | xl migrate-receive"
step guest-check-xl stamp_check $LOG/guest-vm1--incoming.log "$since"
step inspect python3 -m vmem inspect "$R/xl-migrate.stream" --json "$R/inspect.json"
rm -f "$R/xl-migrate.stream"

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

cp $LOG/*.log "$R/" 2>/dev/null
{ free -m; dmesg | tail -40; } > "$R/dom0-state.out" 2>&1
xl list > "$R/xl-list.out" 2>&1
xl destroy vm1 2>/dev/null
echo "=== steps done"
