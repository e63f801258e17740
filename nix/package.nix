# The procurator command (the Python application), built from pyproject.toml with setuptools.
#
#   pkgs.callPackage ./nix/package.nix { }
#
# The tests are not run here: they need root, network namespaces, QEMU and Nix (see .ci/run).
{
  lib,
  python3Packages,
  installShellFiles,
}:
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
      || rel == "share"
      || lib.hasPrefix "share/completions" rel
      || (
        (rel == "procurator" || lib.hasPrefix "procurator/" rel)
        && baseNameOf rel != "__pycache__"
        && !lib.hasSuffix ".pyc" rel
      );
  };

  build-system = [ python3Packages.setuptools ];
  nativeBuildInputs = [ installShellFiles ];
  dependencies = with python3Packages; [
    click
    httpx
    pyroute2
    jinja2
    prometheus-client
  ];

  # Click's completion scripts, generated once and kept in the repository (tests/unit/test_cli_conventions.py
  # checks they are current): the build need not run the program. VM names complete from the state dir.
  postInstall = ''
    installShellCompletion --cmd procurator \
      --bash share/completions/procurator.bash \
      --zsh share/completions/procurator.zsh \
      --fish share/completions/procurator.fish
  '';

  pythonImportsCheck = [ "procurator" ];

  meta = {
    inherit (pyproject.project) description;
    mainProgram = "procurator";
    platforms = lib.platforms.linux;
  };
}
