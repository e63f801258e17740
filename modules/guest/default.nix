# nixosModules.guest: a NixOS system that boots as a Procurator microVM under cloud-hypervisor, and
# builds its own bundle (procurator.vm.bundle). Options apart from implementation, one file a concern.
#
#   options.nix      procurator.vm.* (no pkgs: evaluable with nixpkgs' lib alone)
#   boot.nix         kernel, initrd, tmpfs root, /nix/store from the bundle's erofs disk, console
#   network.nix      procurator.ip= / gw= / dns= applied to the first virtio NIC; health ports open
#   volumes.nix      volumes mounted by label
#   assertions.nix   checks whose messages start with "procurator VM '<name>': "
#   bundle.nix       the store image and the bundle derivation (through nix/lib)
{
  imports = [
    ./options.nix
    ./boot.nix
    ./network.nix
    ./volumes.nix
    ./assertions.nix
    ./bundle.nix
  ];
}
