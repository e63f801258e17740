# A read-only erofs image of a closure, laid out as /nix/store (each store path at its root), for the
# guest to mount on /nix/store by its label. Reproducible: the paths go in name order, hard links are
# resolved, owners and timestamps are fixed and the filesystem UUID is derived from the closure.
# File data is compressed with lz4hc (mkfs.erofs -z; read by the kernel's lz4 decompressor, which
# CONFIG_EROFS_FS_ZIP, on by default with erofs, provides): a smaller image to copy to and keep on
# each host, at the cost of a slower build. nixpkgs' own erofs store image (qemu-vm.nix,
# useNixStoreImage) is uncompressed, since it is made at every VM start.
#
# The image is the only copy of the closure it holds: its output carries no references
# (unsafeDiscardReferences, with structured attributes), although Nix's reference scanner would find
# every path's hash in it (erofs keeps directory entries and symlink targets uncompressed). The store
# paths inside belong to the guest's /nix/store, not to the host's, so a bundle's closure is the image,
# the kernel and the initrd, and `nix copy` sends the system once. nixpkgs does the same for its
# self-contained images (nixos/modules/image/repart-image.nix), as does microvm.nix for its store disk
# (nixos-modules/microvm/store-disk.nix). unsafeDiscardReferences is stable from Nix 2.18, the oldest
# Nix that evaluates nixpkgs (lib/minfeatures.nix), so it needs no experimental feature.
#
# callPackage ./store-image.nix { } -> { name, rootPaths, label } -> derivation <name>.erofs
{
  lib,
  runCommand,
  closureInfo,
  erofs-utils,
  gnutar,
}:
{
  name,
  rootPaths,
  label,
}:
runCommand "${name}.erofs"
  {
    nativeBuildInputs = [
      erofs-utils
      gnutar
    ];
    closure = closureInfo { inherit rootPaths; };
    __structuredAttrs = true;
    unsafeDiscardReferences.out = true;
    passthru = { inherit label rootPaths; };
  }
  ''
    # Store paths relative to the store directory: they become the image's top-level entries.
    sed 's|^${builtins.storeDir}/||' "$closure/store-paths" > paths

    hash=$(sha256sum paths | cut -c1-32)
    uuid="''${hash:0:8}-''${hash:8:4}-''${hash:12:4}-''${hash:16:4}-''${hash:20:12}"

    tar --create --format=gnu --directory=${lib.escapeShellArg builtins.storeDir} \
        --verbatim-files-from --files-from=paths --sort=name \
        --hard-dereference --numeric-owner --owner=0 --group=0 \
      | mkfs.erofs --quiet --tar=f -zlz4hc -L ${lib.escapeShellArg label} -U "$uuid" -T 0 \
          --force-uid=0 --force-gid=0 "$out"
  ''
