# Names shared by the guest module's parts (not a module): the read-only disk that carries the guest's
# /nix/store, as the bundle declares it (disk id) and as the guest finds it (filesystem label).
{
  # The id of the store disk in vm-config.json (a DNS label; "vol-*" ids belong to the host's volumes).
  storeDiskId = "store";
  # The erofs label of that disk; the guest mounts /dev/disk/by-label/<storeLabel> on /nix/store.
  storeLabel = "nix-store";
  # The file name of the store image in the bundle directory (a symlink into the store).
  storeImageName = "store.erofs";
}
