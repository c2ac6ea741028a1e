#!/usr/bin/env bash
# xenhost.sh: a throw-away Xen 4.17 test host, nested in QEMU (TCG, no hardware virtualisation).
#
#   scripts/xenhost.sh check            say whether the host can be built/booted here (exit 0) or why not (exit 2)
#   scripts/xenhost.sh build            build it into .cache/xenhost/ (idempotent: finished steps are skipped)
#   scripts/xenhost.sh run CMD...       build if needed, boot, run `sh -c CMD` in dom0 with the project
#                                       mounted (9p) at /mnt/vmem as the working directory, print its
#                                       output, tear the machine down, exit with CMD's exit status
#
# Exit status of `run`: CMD's own status; 124 if the whole boot timed out; 125 if the machine
# died (panic/crash) or powered off without CMD's status.  Every wait is bounded
# (XENHOST_TIMEOUT_S, default 1500 s); QEMU runs in its own session and its whole process group
# is killed on every way out of this script (normal exit, error, Ctrl-C, TERM).
#
# Environment: XENHOST_DIR (cache, default .cache/xenhost), XENHOST_TIMEOUT_S, XENHOST_LOG, XENHOST_XEN_EXTRA_ARGS,
# XENHOST_ACCEL (QEMU -accel, default tcg; tcg,thread=single turns multi-threaded TCG off),
# (console log of the boot, default .cache/xenhost/last-console.log), XENHOST_MIRROR.
#
# Traps this encodes (see docs/xen.md): `smap=0 smep=0` on Xen's command line (without them dom0
# dies at its first iret under TCG); packages only through `apt-get download` + `dpkg-deb -x`
# (never installed on this machine); debootstrap cannot resolve python3-cffi's pycparser
# dependency on its own, so python3-ply is listed and `apt-get -f install` mends a failed run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${XENHOST_DIR:-$ROOT/.cache/xenhost}
TIMEOUT_S=${XENHOST_TIMEOUT_S:-1500}
MIRROR=${XENHOST_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# dom0_max_vcpus=1: with two dom0 vCPUs, dom0 processes now and then read wrong data through
# their own mappings (foreign reads, crashes); with one, 7 of 7 vmem migrations were clean.
# asid=0: in 2 of 3 boots without it, dom0 processes died with SIGSEGV once a domU ran under
# log-dirty (TCG's nested-SVM ASID handling is the suspect); none did in 3 boots with it
XEN_ARGS="dom0_mem=1024M,max:1024M console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot smap=0 smep=0 asid=0 dom0_max_vcpus=1 ${XENHOST_XEN_EXTRA_ARGS:-}"
DOM0_ARGS="console=hvc0 earlyprintk=xen rdinit=/init quiet"
ROOTFS_PKGS=xen-utils-4.17,xenstore-utils,python3,python3-cffi,python3-ply,python3-numpy,python3-rich,kmod,iproute2,procps
DOM0_MODULES="xenfs xen-privcmd xen-evtchn xen-gntdev xen-gntalloc virtio_pci 9pnet_virtio 9p"

log() { echo "xenhost: $*" >&2; }
die() { log "$*"; exit 2; }

# Why the host cannot be built or booted here, or nothing.
why_unavailable() {
  local c
  for c in qemu-system-x86_64 debootstrap apt-get dpkg-deb cpio zstd depmod modprobe gcc; do
    command -v "$c" >/dev/null || { echo "missing command $c (scripts/setup.sh installs qemu-system-x86, debootstrap, cpio, zstd, kmod)"; return; }
  done
  [ "$(id -u)" = 0 ] || { [ -f "$W/img/initrd-dom0.cpio.zst" ] || { echo "building the host needs root (debootstrap)"; return; }; }
  [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || echo "no static libc (libc6-dev) to build the in-guest stamper"
}

kernel_version() {
  if [ ! -s "$W/kernel-version" ]; then
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{sub("linux-image-","",$2); print $2; exit}' > "$W/kernel-version.tmp"
    [ -s "$W/kernel-version.tmp" ] || die "apt does not know linux-image-amd64 (apt-get update?)"
    mv "$W/kernel-version.tmp" "$W/kernel-version"
  fi
  cat "$W/kernel-version"
}

build() {
  local why; why=$(why_unavailable); [ -z "$why" ] || die "cannot build the Xen test host: $why"
  mkdir -p "$W"/{debs,img}
  local kv; kv=$(kernel_version)
  # 1. Xen, the kernel (dom0 and domU) and busybox, unpacked without installing
  if [ ! -f "$W/x/.done" ]; then
    log "downloading xen-hypervisor-4.17-amd64 linux-image-$kv busybox-static"
    (cd "$W/debs" && apt-get download -q -o APT::Sandbox::User=root xen-hypervisor-4.17-amd64 "linux-image-$kv" busybox-static >/dev/null) \
      || die "apt-get download failed (network? stale lists: apt-get update)"
    rm -rf "$W/x"; mkdir -p "$W/x"
    local f; for f in "$W"/debs/*.deb; do dpkg-deb -x "$f" "$W/x"; done
    depmod -b "$W/x" "$kv"
    touch "$W/x/.done"
  fi
  # Xen's image is gzipped ELF32 multiboot: QEMU's -kernel loads it once unpacked
  [ -s "$W/img/xen" ] || { zcat "$W"/x/boot/xen-4.17-amd64.gz > "$W/img/xen.tmp"; mv "$W/img/xen.tmp" "$W/img/xen"; }
  [ -s "$W/img/vmlinuz" ] || cp "$W/x/boot/vmlinuz-$kv" "$W/img/vmlinuz"
  # 2. dom0's root filesystem (kept in the initramfs: no disk, no block drivers)
  if [ ! -f "$W/rootfs/.done" ]; then
    log "debootstrap $SUITE minbase + $ROOTFS_PKGS (about 2-5 minutes)"
    rm -rf "$W/rootfs"
    if ! debootstrap --variant=minbase --include="$ROOTFS_PKGS" "$SUITE" "$W/rootfs" "$MIRROR" > "$W/debootstrap.log" 2>&1; then
      log "debootstrap failed (see $W/debootstrap.log); mending with apt-get -f install"
      chroot "$W/rootfs" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get -y -f install && dpkg --configure -a' >> "$W/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $W/debootstrap.log"
    fi
    chroot "$W/rootfs" python3 -c 'import cffi, numpy' || die "dom0 rootfs lacks python3-cffi or python3-numpy"
    echo "$ROOTFS_PKGS" > "$W/rootfs/.done"
  elif [ "$(cat "$W/rootfs/.done")" != "$ROOTFS_PKGS" ]; then
    # the package list grew since the rootfs was built: add what is new, no re-debootstrap
    log "adding packages to dom0's rootfs: $ROOTFS_PKGS"
    chroot "$W/rootfs" sh -c "DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(echo "$ROOTFS_PKGS" | tr , ' ')" \
      >> "$W/debootstrap.log" 2>&1 || die "apt-get install in dom0's rootfs failed; see $W/debootstrap.log"
    echo "$ROOTFS_PKGS" > "$W/rootfs/.done"
  fi
  # 3. the domU: busybox initramfs with the stamper workload (rebuilt when its sources change)
  local domu="$W/img/initrd-domu.cpio.gz"
  if [ ! -s "$domu" ] || [ "$ROOT/guests/xen/stamper.c" -nt "$domu" ] || [ "$ROOT/guests/xen/init.sh" -nt "$domu" ]; then
    log "building the domU initramfs"
    local R="$W/initrd-domu"; rm -rf "$R"; mkdir -p "$R"/{bin,proc,sys,dev,tmp}
    cp "$W/x/bin/busybox" "$R/bin/busybox"
    local a; for a in $("$R/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
    gcc -static -O2 -Wall -o "$R/bin/stamper" "$ROOT/guests/xen/stamper.c"
    cp "$ROOT/guests/xen/init.sh" "$R/init"; chmod +x "$R/init"
    (cd "$R" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$domu.tmp"; mv "$domu.tmp" "$domu"
  fi
  # 4. dom0's initramfs: rootfs + Xen/virtio/9p modules + domU kernel and initramfs + /init
  local dom0="$W/img/initrd-dom0.cpio.zst"
  if [ ! -s "$dom0" ] || [ "$domu" -nt "$dom0" ] || [ "$ROOT/scripts/xenhost/dom0-init.sh" -nt "$dom0" ] || [ "$W/rootfs/.done" -nt "$dom0" ]; then
    log "building dom0's initramfs"
    local R="$W/initrd-dom0"; rm -rf "$R"; mkdir -p "$R"
    tar -C "$W/rootfs" --exclude=./var/cache/apt --exclude=./usr/share/doc --exclude=./usr/share/man \
        --exclude=./usr/share/locale --exclude=./var/lib/apt/lists --exclude=./proc --exclude=./sys --exclude=./dev -cf - . | tar -C "$R" -xf -
    mkdir -p "$R"/{proc,sys,dev,run,tmp,root/domu} "$R/lib/modules/$kv"
    local m f; for m in $DOM0_MODULES; do
      modprobe -d "$W/x" -S "$kv" --show-depends "$m" | awk '/^insmod/{print $2}' | while read -r f; do
        mkdir -p "$R/$(dirname "${f#"$W"/x/}")"; cp "$f" "$R/${f#"$W"/x/}"; done
    done
    cp "$W"/x/lib/modules/"$kv"/modules.* "$R/lib/modules/$kv/"
    cp "$W/img/vmlinuz" "$R/root/domu/vmlinuz"; cp "$domu" "$R/root/domu/initrd.gz"
    cp "$W/x/bin/busybox" "$R/bin/busybox"
    cp "$ROOT/scripts/xenhost/dom0-init.sh" "$R/init"; chmod +x "$R/init"
    (cd "$R" && find . | cpio -o -H newc 2>/dev/null | zstd -T2 -3 -q) > "$dom0.tmp"; mv "$dom0.tmp" "$dom0"
    rm -rf "$R"
  fi
  log "ready: $W/img ($(du -sh "$W/img" | cut -f1))"
}

QPID=
RUN=
reap() {
  # QEMU is a session leader (setsid): its pid is its process group; kill the group, then wait
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
    kill -TERM -- "-$QPID" 2>/dev/null || true
    local i; for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$QPID" 2>/dev/null || true
  fi
  [ -z "$QPID" ] || wait "$QPID" 2>/dev/null || true
  QPID=
  [ -z "$RUN" ] || rm -rf "$RUN"
}

run() {
  [ $# -gt 0 ] || die "usage: xenhost.sh run CMD..."
  build
  mkdir -p "$W/runs"
  RUN=$(mktemp -d "$W/runs/run.$$.XXXXXX")
  trap reap EXIT; trap 'exit 130' INT; trap 'exit 143' TERM HUP
  printf '%s\n' "$*" > "$RUN/cmd.sh"
  local console=${XENHOST_LOG:-$W/last-console.log}
  : > "$console"
  local t0; t0=$(date +%s)
  setsid qemu-system-x86_64 -accel "${XENHOST_ACCEL:-tcg}" -cpu max -m 2048 -smp 2 -display none -no-reboot -monitor none \
    -serial "file:$console" -kernel "$W/img/xen" -append "$XEN_ARGS" \
    -initrd "$W/img/vmlinuz $DOM0_ARGS,$W/img/initrd-dom0.cpio.zst" \
    -virtfs "local,path=$ROOT,mount_tag=vmem,security_model=none,id=vmem" \
    -virtfs "local,path=$RUN,mount_tag=run,security_model=none,id=run" \
    </dev/null > "$RUN/qemu.out" 2>&1 &
  QPID=$!
  local rc=
  while kill -0 "$QPID" 2>/dev/null; do
    if [ $(( $(date +%s) - t0 )) -ge "$TIMEOUT_S" ]; then log "timed out after ${TIMEOUT_S}s (console: $console)"; rc=124; break; fi
    if grep -qE 'Panic on CPU|Kernel panic|crashed' "$console" 2>/dev/null; then
      sleep 2; log "the machine crashed (console: $console)"; rc=125; break
    fi
    sleep 1
  done
  reap_qemu_only
  [ -f "$RUN/out" ] && cat "$RUN/out"
  if [ -z "$rc" ]; then
    if [ -s "$RUN/rc" ]; then rc=$(cat "$RUN/rc"); else
      log "dom0 powered off without the command's exit status (console: $console)"; tail -20 "$console" >&2; rc=125
    fi
  fi
  log "boot and command took $(( $(date +%s) - t0 ))s, exit status $rc"
  return "$rc"
}

reap_qemu_only() { local r=$RUN; RUN=; reap; RUN=$r; }

case ${1:-} in
  check) why=$(why_unavailable); if [ -n "$why" ]; then echo "$why"; exit 2; fi; echo ok ;;
  build) build ;;
  run) shift; run "$@" ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
