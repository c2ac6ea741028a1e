# Shell helpers for the scripts run in the nested Xen host's dom0 (tests/xen_dom0_steps.sh,
# tests/xen_dom0_repeat.sh); sourced, needs R (results dir) and LOG (xenconsoled's logs).
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
  f=$1; since=$2; i_=0
  while [ $i_ -lt 60 ]; do
    seen=$(tail -n +$((since + 1)) "$f" 2>/dev/null | grep -c "STAMP n=")
    [ "${seen:-0}" -ge 2 ] && break; sleep 1; i_=$((i_ + 1))
  done
  tail -n +$((since + 1)) "$f" | grep "STAMP n=" | head -5
  tail -n +$((since + 1)) "$f" | grep "STAMP n=" | head -5 | grep -q "STAMP n=" || { echo "no STAMP line after the migration"; return 1; }
  ! tail -n +$((since + 1)) "$f" | grep "STAMP n=" | grep -qv " bad=0 "
}
lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
# write_domu_cfg FILE: the PVH domU with the stamper (STAMP_MIB, STAMP_RATE, DOMU_MIB)
write_domu_cfg() {
  cat > "$1" <<EOC
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
}
# create_domu FILE: xl create, then wait (bounded) for the stamper's third check
create_domu() {
  xl create "$1" || return 1
  i_=0
  while [ $i_ -lt 90 ]; do
    grep -q "STAMP n=3" "$LOG/guest-vm1.log" 2>/dev/null && return 0
    sleep 1; i_=$((i_ + 1))
  done
  return 1
}
