# Procurator's pure Nix library (docs/bundle.md): no nixpkgs, builtins only, no impure builtins.
#
#   mkSpec attrs                 -> the normalised, checked spec of one VM
#                                   (throws "procurator VM '<name>': ..." naming every field to fix)
#   vmConfig spec bundlePath     -> the cloud-hypervisor VmConfig of vm-config.json (host fields left out)
#   kernelCmdline spec bundlePath -> payload.cmdline of that VmConfig
#   procuratorJson spec          -> procurator.json
#   deploymentJson { host; vms; } -> deployment.json (throws "procurator deployment '<host>': ...")
#   isDnsLabel, isVmName, isInterfaceId, isVolumeName, isMac, ... -> the predicates behind the checks
#
# Functions taking a spec also take raw attributes (mkSpec is idempotent). See docs/bundle.md.
let
  checks = import ./checks.nix;
  spec = import ./spec.nix;
  outputs = import ./outputs.nix;
in
{
  inherit (spec) mkSpec;
  inherit (outputs)
    vmConfig
    kernelCmdline
    procuratorJson
    deploymentJson
    ;
  inherit (checks)
    isDnsLabel
    isVmName
    isInterfaceId
    isVolumeName
    isMac
    isPositiveInt
    isStorePathString
    vmNameMaxLength
    volumeNameMaxLength
    volumeFsTypes
    restartPolicies
    replaceStrategies
    healthTypes
    reservedCmdlineKeys
    vmmOverheadMiB
    minMemoryMaxMiB
    maxWeight
    maxHostCpu
    maxVcpus
    labelMaxLength
    limits
    ;
}
