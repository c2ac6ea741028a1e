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
# stamp_check LOGFILE SINCE_LINE: wait (bounded) for 2 STAMP lines after SINCE_LINE; the
# first 5 must all say bad=0.  The lines are gathered into a file on every try: a dom0 tool
# that crashes (this nested host's dom0 sometimes segfaults a process) costs a try, and a
# crash can only fail the check, never pass it.
stamp_check() {
  # (no variable named n here: step() keeps the step's name in n; sh has no locals)
  f=$1; since=$2; i_=0; s_=/tmp/stamps.$$
  : > "$s_"
  while [ $i_ -lt 60 ]; do
    tail -n +$((since + 1)) "$f" 2>/dev/null | grep "STAMP n=" | head -5 > "$s_.tmp" && mv "$s_.tmp" "$s_"
    [ "$(wc -l < "$s_")" -ge 2 ] 2>/dev/null && break
    sleep 1; i_=$((i_ + 1))
  done
  cat "$s_"
  [ -s "$s_" ] || { echo "no STAMP line after the migration"; return 1; }
  good_=$(grep -c " bad=0 " "$s_"); all_=$(wc -l < "$s_")
  [ -n "$good_" ] && [ "$good_" = "$all_" ]
}
lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
# write_domu_cfg FILE: the PVH domU with the stamper (DOMU_NAME, default vm1; STAMP_MIB,
# STAMP_RATE, DOMU_MIB; STAMP_MODE=die for the test that the stamper's death is reported).
# noxsave: with XSAVE (so AVX) on, about 1 domU boot in 4 lost its processes to SIGILL on
# glibc's AVX2 string code (vpxor, #UD) right after boot -- the stamper silently, or init
# (a panic) -- a fault of the nested stack (QEMU 7.2's TCG AVX under its SVM), not of vmem:
# 9 of 32 creates before, 0 of 16 with noxsave (docs/xen.md).  print-fatal-signals: such a
# death is logged (init.sh prints the kernel's last lines when the stamper ends).
write_domu_cfg() {
  cat > "$1" <<EOC
name="${DOMU_NAME:-vm1}"
type="pvh"
kernel="/root/domu/vmlinuz"
ramdisk="/root/domu/initrd.gz"
extra="console=hvc0 rdinit=/init quiet noxsave print-fatal-signals=1 stamp_mib=${STAMP_MIB:-16} stamp_rate=${STAMP_RATE:-500} stamp_check=1${STAMP_MODE:+ stamp_mode=$STAMP_MODE}"
memory=${DOMU_MIB:-128}
vcpus=1
on_crash="preserve"
tsc_mode="native"
EOC
}
# create_domu FILE: xl create, then wait (bounded) for the stamper's third check; fails at
# once, printing the guest's report, if the stamper ended (it never does on its own)
create_domu() {
  # xl itself aborted once in CI right after parsing the config (SIGABRT under the nested
  # host's TCG, before the domU ran): destroy whatever it left and try once more, saying so.
  xl create "$1"; rc_=$?
  if [ $rc_ -ne 0 ]; then
    echo "xl create $1 failed (rc $rc_); destroying ${DOMU_NAME:-vm1} and trying once more"
    xl destroy "${DOMU_NAME:-vm1}" 2>/dev/null; sleep 1
    xl create "$1" || return 1
  fi
  c_=$LOG/guest-${DOMU_NAME:-vm1}.log; i_=0
  while [ $i_ -lt 90 ]; do
    grep -q "STAMP n=3" "$c_" 2>/dev/null && return 0
    if grep -q "STAMPER EXITED" "$c_" 2>/dev/null; then
      echo "the domU's stamper died after boot (its console follows)"; tail -n 45 "$c_"; return 1
    fi
    sleep 1; i_=$((i_ + 1))
  done
  echo "no third STAMP line from the domU within 90 s (its console follows)"; tail -n 20 "$c_"
  return 1
}
# fails CMD...: succeeds when CMD fails (a check that must fire)
fails() { if "$@"; then return 1; fi; return 0; }
