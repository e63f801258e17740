# The procurator command (the Python application), built from pyproject.toml with setuptools.
#
#   pkgs.callPackage ./nix/package.nix { }
#
# The tests are not run here: they need root, network namespaces, QEMU and Nix (see .ci/run).
{ lib, python3Packages }:
let
  pyproject = lib.importTOML ../pyproject.toml;
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  inherit (pyproject.project) version;
  pyproject = true;

  # pyproject.toml and the procurator package, without bytecode. (cleanSourceWith rather than
  # lib.fileset, which needs Nix >= 2.14 to evaluate purely.)
  src = lib.cleanSourceWith {
    name = "procurator-source";
    src = ../.;
    filter =
      path: type:
      let
        rel = lib.removePrefix "${toString ../.}/" (toString path);
      in
      rel == "pyproject.toml"
      || (
        (rel == "procurator" || lib.hasPrefix "procurator/" rel)
        && baseNameOf rel != "__pycache__"
        && !lib.hasSuffix ".pyc" rel
      );
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = with python3Packages; [
    click
    httpx
    pyroute2
    jinja2
  ];

  pythonImportsCheck = [ "procurator" ];

  meta = {
    inherit (pyproject.project) description;
    mainProgram = "procurator";
    platforms = lib.platforms.linux;
  };
}
