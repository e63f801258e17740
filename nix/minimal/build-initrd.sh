# Builds the initrd shared by every minimal VM: busybox, the kernel modules /init loads (dependencies
# first), /init and the power-button handler, as a reproducible gzip'd newc cpio in $out.
# Runs under the host's /bin/sh with PATH=/usr/bin:/bin (no nixpkgs). Inputs, from the derivation:
#   busybox        a static busybox binary
#   modules        a copy of the needed part of lib/modules/<kernelVersion>
#   loadModules    the modules /init must load (space-separated); their dependencies are added here
#   init, poweroff the guest scripts (init.sh, poweroff.sh)
set -eu

die() { echo "build-initrd: $*" >&2; exit 1; }

work=$PWD
root=$work/root
mkdir -p "$root"
cd "$root"
mkdir -p bin dev proc sys run tmp mnt root etc/acpi/PWRF etc/procurator lib/modules usr var/log
ln -s bin sbin
ln -s ../bin usr/bin
ln -s ../bin usr/sbin
ln -s /run var/run

cp "$busybox" bin/busybox
chmod 0755 bin/busybox
for applet in $(bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "bin/$applet"
done

# name -> file of every module imported; module names use '_' where file names may use '-'.
find "$modules" -name '*.ko' | while read -r file; do
  name=$(basename "$file" .ko | tr - _)
  echo "$name $file"
done >"$work/index"
: >"$work/order"
# Modules built into this kernel need no loading.
if [ -f "$modules/modules.builtin" ]; then
  sed 's|.*/||; s|\.ko$||' "$modules/modules.builtin" | tr - _ >"$work/builtin"
else
  : >"$work/builtin"
fi

depends_of() {
  "$root/bin/busybox" strings "$1" | sed -n 's/^depends=//p' | head -n 1 | tr , ' '
}

# Depth-first: a module's dependencies are listed before it, each module once.
visit() {
  local name chain file dep
  name=$1 chain=$2
  if grep -qx "$name" "$work/order" "$work/builtin"; then return 0; fi
  case " $chain " in *" $name "*) die "module dependency cycle:$chain $name" ;; esac
  file=$(sed -n "s|^$name ||p" "$work/index" | head -n 1)
  [ -n "$file" ] || die "module $name (needed by${chain:- /init}) is not among the imported modules;" \
    "add it to moduleCandidates in nix/minimal/default.nix"
  for dep in $(depends_of "$file"); do
    visit "$dep" "$chain $name"
  done
  echo "$name" >>"$work/order"
}
for name in $loadModules; do
  visit "$name" ""
done
while read -r name; do
  file=$(sed -n "s|^$name ||p" "$work/index" | head -n 1)
  cp "$file" "lib/modules/$name.ko"
done <"$work/order"
cp "$work/order" etc/procurator/modules

cp "$init" init
cp "$poweroff" etc/procurator/poweroff
chmod 0755 init etc/procurator/poweroff
ln -s /etc/procurator/poweroff etc/acpi/PWRF/00000080
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' >etc/passwd
printf '%s\n' 'root:x:0:' >etc/group
printf '%s\n' '127.0.0.1 localhost' >etc/hosts
printf '%s\n' '.html:text/plain; charset=utf-8' >etc/httpd.conf
printf '%s\n' "$kernelVersion" >etc/procurator/kernel-version

# Reproducible archive: fixed owners and times, sorted names, no gzip timestamp.
find . -exec touch -h -d @1 {} +
find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible >"$work/initrd.cpio"
gzip -9n <"$work/initrd.cpio" >"$out"
