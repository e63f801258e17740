#!/bin/sh
# /init of the minimal guest (PID 1, busybox sh), shared by every minimal VM. Everything VM-specific
# comes from the kernel command line:
#   procurator.name=<name> procurator.bundle=<store path>        set by the bundle (nix/lib kernelCmdline)
#   procurator.ip=<addr>/<prefix> procurator.gw=<addr> procurator.dns=<addr>   set by the host at start
#   procurator.release=<word>                                     optional, shown on the page
# It loads the modules in /etc/procurator/modules, configures eth0, mounts every writable virtio disk
# holding an ext2/3/4 filesystem at /mnt/<its label> (the host formats volumes with -L <volume name>),
# serves http://<ip>/ (name=, bundle=, release=) and /health on port 80, and powers off cleanly on
# the ACPI power button (acpid -> /etc/procurator/poweroff). Serial console lines start with
# "procurator-guest: "; "procurator-guest: <name> up ip=<addr>" means the HTTP server listens.
# Nothing here waits without a bound.
export PATH=/bin
umask 022

say() { echo "procurator-guest: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /run/procurator /run/www

name= bundle= ip= gw= dns= release=
set -f # no globbing of kernel parameters
for word in $(cat /proc/cmdline); do
  case "$word" in
    procurator.name=*) name=${word#*=} ;;
    procurator.bundle=*) bundle=${word#*=} ;;
    procurator.ip=*) ip=${word#*=} ;;
    procurator.gw=*) gw=${word#*=} ;;
    procurator.dns=*) dns=${word#*=} ;;
    procurator.release=*) release=${word#*=} ;;
  esac
done
set +f
[ -n "$name" ] || { name=unnamed; say "warning: no procurator.name= on the kernel command line"; }
say "booting $name bundle=${bundle:-none}"
hostname "$name"

while read -r module; do
  [ -n "$module" ] || continue
  insmod "/lib/modules/$module.ko" || say "warning: cannot load module $module"
done </etc/procurator/modules

# Power button, as early as possible: button + evdev give /dev/input/event*, busybox acpid maps
# KEY_POWER to /etc/acpi/PWRF/00000080 -> /etc/procurator/poweroff.
: >/run/procurator/mounts
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid ||
  say "warning: acpid failed; the power button will not work"

# Network: eth0 is the first virtio NIC (virtio device id 1); wait at most 5 s for it if there is one.
ip link set lo up
nics=0
for virtio in /sys/bus/virtio/devices/*; do
  [ "$(cat "$virtio/device" 2>/dev/null)" = 0x0001 ] && nics=$((nics + 1))
done
tries=0
while [ "$nics" -gt 0 ] && [ ! -e /sys/class/net/eth0 ] && [ "$tries" -lt 50 ]; do
  usleep 100000
  tries=$((tries + 1))
done
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up || say "warning: cannot bring eth0 up"
  if [ -n "$ip" ]; then
    ip addr add "$ip" dev eth0 || say "warning: cannot add address $ip to eth0"
    if [ -n "$gw" ]; then
      ip route add default via "$gw" dev eth0 || say "warning: cannot add default route via $gw"
    fi
  else
    say "warning: no procurator.ip= on the kernel command line; eth0 has no address"
  fi
elif [ "$nics" -gt 0 ]; then
  say "warning: no eth0 after 5 s; running without network"
else
  say "warning: no network interface"
fi
if [ -n "$dns" ]; then
  echo "nameserver $dns" >/etc/resolv.conf
fi

# Volumes: writable virtio disks with an ext2/3/4 superblock (magic 0xEF53 at byte 1080), mounted at
# /mnt/<label> (label: 16 bytes at byte 1144). Read-only disks belong to the bundle and are left alone.
for sysdev in /sys/block/vd*; do
  [ -e "$sysdev" ] || continue
  [ ! -e /run/procurator/stopping ] || break
  dev=${sysdev##*/}
  [ "$(cat "$sysdev/ro")" = 0 ] || continue
  magic=$(dd if="/dev/$dev" bs=2 skip=540 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
  [ "$magic" = 53ef ] || continue
  label=$(dd if="/dev/$dev" bs=8 skip=143 count=2 2>/dev/null | tr -d '\000')
  case "$label" in
    '' | *[!a-z0-9-]*)
      say "warning: /dev/$dev has label '$label', not a volume name; not mounted"
      continue
      ;;
  esac
  if grep -qx "/mnt/$label" /run/procurator/mounts; then
    say "warning: /dev/$dev: a volume labelled $label is already mounted; not mounted"
    continue
  fi
  mkdir -p "/mnt/$label"
  if mount -t ext4 -o noatime "/dev/$dev" "/mnt/$label"; then
    echo "/mnt/$label" >>/run/procurator/mounts
    say "volume $label mounted at /mnt/$label (/dev/$dev)"
  else
    say "warning: cannot mount /dev/$dev (volume $label)"
  fi
done

{
  echo "name=$name"
  echo "bundle=$bundle"
  if [ -n "$release" ]; then echo "release=$release"; fi
} >/run/www/index.html
echo ok >/run/www/health
serve() { httpd -p 80 -h /run/www -c /etc/httpd.conf; }
serve || say "warning: httpd failed to start"
addr=${ip%/*}
say "$name up ip=${addr:-none} uptime=$(cut -d ' ' -f 1 /proc/uptime)s"

# An interactive shell on the virtio console (hvc0), which `procurator console` attaches to; respawned
# when it exits, until the power-off handler runs. No virtio console device: no interactive console.
console_shell() {
  while [ ! -e /run/procurator/stopping ]; do
    setsid sh -c 'exec sh -i </dev/hvc0 >/dev/hvc0 2>&1'
    sleep 1
  done
}
tries=0
while [ ! -e /dev/hvc0 ] && [ "$tries" -lt 20 ] && grep -q virtio_console /proc/modules; do
  sleep 0.1
  tries=$((tries + 1))
done
if [ -e /dev/hvc0 ]; then console_shell & fi

# PID 1 stays here: it reaps orphans (ash waits on any child) and restarts httpd if it dies, unless the
# power-off handler is running.
while :; do
  sleep 5
  if [ ! -e /run/procurator/stopping ] && ! pidof httpd >/dev/null; then
    say "warning: httpd is gone; restarting it"
    serve
  fi
done
