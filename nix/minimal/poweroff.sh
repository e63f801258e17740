#!/bin/sh
# Power-button handler of the minimal guest, run by busybox acpid (/etc/acpi/PWRF/00000080): stop the
# HTTP server, flush and unmount the volumes, power off. Each step is short; nothing waits unbounded.
export PATH=/bin
exec </dev/null >/dev/console 2>&1

say() { echo "procurator-guest: $*"; }

# A second press while stopping does nothing.
[ -e /run/procurator/stopping ] && exit 0
: >/run/procurator/stopping
say "power button, powering off"
killall httpd 2>/dev/null
sync
if [ -f /run/procurator/mounts ]; then
  while read -r mountpoint; do
    [ -n "$mountpoint" ] || continue
    umount "$mountpoint" || mount -o remount,ro "$mountpoint" || say "warning: cannot unmount $mountpoint"
  done </run/procurator/mounts
fi
sync
say "stopped, power off"
poweroff -f
# Only reached if the power-off request failed: halt via sysrq rather than hang.
sleep 2
echo o >/proc/sysrq-trigger
