# Stands in for nixpkgs' nixos/modules/profiles/minimal.nix, which only sets mkDefaults of options
# (documentation, default packages, fonts) that the tests neither declare nor look at.
{ }
