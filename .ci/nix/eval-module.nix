# Offline evaluation of module.nix and flake.nix with the real module system of nixpkgs.lib and
# stubs for the rest of NixOS and nixpkgs (there is no nixpkgs here). Run by .ci/nix-checks:
#
#   nix eval --raw -f .ci/nix/eval-module.nix --arg nixpkgsLib <dir> --argstr fakeStore <dir> \
#     --argstr moorlineOut <dir> report
#
# `report` throws unless every check below holds. The other attributes are texts the script
# checks further: the generated TOML (moorline check-config) and the rendered units
# (systemd-analyze verify and security).
{
  # A nixpkgs.lib checkout: the directory that holds lib/.
  nixpkgsLib,
  # Stands in for the moorline package: a directory with bin/moorline.
  moorlineOut,
  # Where the stub packages live: <fakeStore>/<name>/bin/<program> (made by the script).
  fakeStore,
}:
let
  lib = import (nixpkgsLib + "/lib");
  inherit (lib) mkOption types;

  fakePackage = name: program: {
    type = "derivation";
    inherit name;
    outPath = "${fakeStore}/${name}";
    meta.mainProgram = program;
  };

  # A TOML writer for what the module produces: strings, integers, booleans, lists of those,
  # tables and arrays of tables. Keys are always quoted; JSON string escapes are valid TOML.
  toTOML =
    let
      isTableArray = v: builtins.isList v && v != [ ] && lib.all builtins.isAttrs v;
      key = builtins.toJSON;
      dotted = path: lib.concatMapStringsSep "." key path;
      scalar =
        v:
        if builtins.isList v then
          "[${lib.concatMapStringsSep ", " scalar v}]"
        else if builtins.isBool v then
          lib.boolToString v
        else if builtins.isInt v then
          toString v
        else
          builtins.toJSON v;
      table =
        path: attrs:
        let
          plain = lib.filterAttrs (_: v: !(builtins.isAttrs v) && !(isTableArray v)) attrs;
          tables = lib.filterAttrs (_: builtins.isAttrs) attrs;
          arrays = lib.filterAttrs (_: isTableArray) attrs;
        in
        lib.concatStrings (lib.mapAttrsToList (k: v: "${key k} = ${scalar v}\n") plain)
        + lib.concatStrings (
          lib.mapAttrsToList (k: v: "\n[${dotted (path ++ [ k ])}]\n" + table (path ++ [ k ]) v) tables
        )
        + lib.concatStrings (
          lib.mapAttrsToList (
            k: vs: lib.concatMapStrings (v: "\n[[${dotted (path ++ [ k ])}]]\n" + table (path ++ [ k ]) v) vs
          ) arrays
        );
    in
    table [ ];

  tomlValue = lib.types.toml or (
    let
      valueType =
        types.oneOf [
          types.bool
          types.int
          types.float
          types.str
          types.path
          (types.attrsOf valueType)
          (types.listOf valueType)
        ]
        // {
          description = "TOML value";
        };
    in
    valueType
  );

  pkgs = {
    moorline = {
      type = "derivation";
      name = "moorline";
      outPath = moorlineOut;
      meta.mainProgram = "moorline";
    };
    tmux = fakePackage "tmux" "tmux";
    runc = fakePackage "runc" "runc";
    tini = fakePackage "tini" "tini";
    tailscale = fakePackage "tailscale" "tailscale";
    claude-code = fakePackage "claude-code" "claude";
    formats.toml =
      { }:
      {
        type = tomlValue;
        # The config path in ExecStart is a placeholder the script replaces with a real file.
        generate = name: value: {
          type = "derivation";
          inherit name;
          outPath = "@CONFIG@";
          text = toTOML value;
        };
      };
    # "Cannot execute": the module then uses the generated file as is, and the script runs
    # `moorline check-config` on it itself (what the module's build-time check does).
    stdenv = {
      buildPlatform.canExecute = _: false;
      hostPlatform.system = "x86_64-linux";
    };
    runCommand = throw "runCommand is not expected when the build platform cannot execute";
    writeShellScript = name: _text: "${fakeStore}/${name}";
  };

  # The NixOS options module.nix uses, reduced to what it needs.
  stubs =
    { config, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        users.users = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule (
              { name, config, ... }:
              {
                options = {
                  isNormalUser = mkOption {
                    type = types.bool;
                    default = false;
                  };
                  home = mkOption {
                    type = types.str;
                    default = if config.isNormalUser then "/home/${name}" else "/var/empty";
                  };
                  group = mkOption {
                    type = types.str;
                    default = if config.isNormalUser then "users" else "";
                  };
                };
              }
            )
          );
        };
        services.tailscale = {
          enable = mkOption {
            type = types.bool;
            default = false;
          };
          package = mkOption {
            type = types.unspecified;
            default = pkgs.tailscale;
          };
        };
        systemd.package = mkOption {
          type = types.unspecified;
          default = {
            version = "256.8";
          };
        };
        systemd.services = mkOption {
          default = { };
          type = types.attrsOf (
            types.submodule {
              freeformType = types.attrsOf types.anything;
              options = {
                serviceConfig = mkOption {
                  type = types.attrsOf types.anything;
                  default = { };
                };
                path = mkOption {
                  type = types.listOf (types.either types.package types.str);
                  default = [ ];
                };
              };
            }
          );
        };
      };
    };

  evalWith =
    modules:
    (lib.evalModules {
      modules = [ stubs ] ++ modules;
      specialArgs = { inherit pkgs; };
    }).config;

  alice = {
    users.users.alice.isNormalUser = true;
  };

  evalModule =
    moorline:
    evalWith [
      ../../module.nix
      alice
      { services.moorline = moorline; }
    ];

  failedAssertions = config: map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);

  # Whether evaluating `value` deeply fails (a type error, an undefined option, ...).
  fails = value: !(builtins.tryEval (builtins.deepSeq value true)).success;

  # Renders a unit like NixOS does, closely enough for systemd-analyze: lists become repeated
  # keys, booleans true/false, everything else its string.
  renderUnit =
    service:
    let
      value = v: if builtins.isBool v then lib.boolToString v else toString v;
      line = k: v: if builtins.isList v then lib.concatMapStrings (x: "${k}=${value x}\n") v else "${k}=${value v}\n";
      lines = attrs: lib.concatStrings (lib.mapAttrsToList line attrs);
    in
    "[Unit]\n"
    + lines (
      lib.filterAttrs (_: v: v != "") {
        Description = service.description;
        Documentation = lib.concatStringsSep " " (service.documentation or [ ]);
        After = lib.concatStringsSep " " (service.after or [ ]);
        Wants = lib.concatStringsSep " " (service.wants or [ ]);
      }
      // lib.optionalAttrs (service ? startLimitBurst) {
        StartLimitBurst = service.startLimitBurst;
        StartLimitIntervalSec = service.startLimitIntervalSec;
      }
    )
    + "\n[Service]\n"
    + lib.optionalString (service.path != [ ]) "Environment=\"PATH=${lib.makeBinPath service.path}\"\n"
    + lines service.serviceConfig
    + "\n[Install]\nWantedBy=${lib.concatStringsSep " " service.wantedBy}\n";

  # --- scenarios -------------------------------------------------------------------------

  minimal = evalModule {
    enable = true;
    user = "alice";
  };

  full = evalWith [
    ../../module.nix
    alice
    {
      services.tailscale.enable = true;
      services.moorline = {
        enable = true;
        user = "alice";
        maxSessions = 4;
        tokenFile = "/run/secrets/moorline-token";
        environmentFile = "/run/secrets/moorline.env";
        writablePaths = [ "/srv/projects" ];
        extraPackages = [ (fakePackage "git" "git") ];
        tailscaleServe.enable = true;
        settings = {
          allowed_origins = [ "https://app.example" ];
          log_format = "json";
          limits.backlog_bytes = 8388608;
          runtime.pass_env = [
            "PATH"
            "HOME"
            "ANTHROPIC_API_KEY"
          ];
        };
        instances = {
          claude = {
            agent = "claude-code";
            runtime = "runc";
            credentials_file = "/run/secrets/anthropic.env";
            allowed_env = [ "GIT_AUTHOR_*" ];
            workspace_roots = [
              "/home/alice/src"
              "/srv/work"
            ];
            create_cwd = true;
            memory_limit = 2147483648;
            # Keys the module does not declare pass through to moorline.
            model = "claude-sonnet-4-5";
            approval_default = "deny";
            packages = [ pkgs.claude-code ];
          };
          default = {
            agent = "echo";
            runtime = "tmux";
          };
          cat = {
            id = "plain-cat";
            agent = "command";
            command = [ "cat" ];
            network = "none";
          };
        };
      };
    }
  ];

  systemd258 = evalWith [
    ../../module.nix
    alice
    {
      systemd.package.version = "258.1";
      services.moorline = {
        enable = true;
        user = "alice";
      };
    }
  ];

  nonLoopback = evalModule {
    enable = true;
    user = "alice";
    host = "0.0.0.0";
  };

  nonLoopbackAllowed = evalModule {
    enable = true;
    user = "alice";
    host = "0.0.0.0";
    allowNonLoopback = true;
  };

  ipv6 = evalWith [
    ../../module.nix
    alice
    {
      services.tailscale.enable = true;
      services.moorline = {
        enable = true;
        user = "alice";
        host = "::1";
        # TCP as the serve target, to check the brackets.
        unixSocket = null;
        tailscaleServe = {
          enable = true;
          path = "/moorline";
        };
      };
    }
  ];

  rootUser = evalWith [
    ../../module.nix
    {
      services.moorline = {
        enable = true;
        user = "root";
      };
      users.users.root.home = "/root";
    }
  ];

  undeclaredUser = evalModule {
    enable = true;
    user = "bob";
  };

  serveWithoutTailscaled = evalModule {
    enable = true;
    user = "alice";
    tailscaleServe.enable = true;
  };

  disabled = evalModule { user = "alice"; };

  socketOnlyWithoutSocket = evalModule {
    enable = true;
    user = "alice";
    tcp = false;
    unixSocket = null;
  };

  toml = config: config.services.moorline.configFile.text;
  unitOf = config: name: renderUnit config.systemd.services.${name};
  moorlineUnit = config: config.systemd.services.moorline.serviceConfig;

  # What the flake sees as nixpkgs.legacyPackages.<system>.
  legacyPackages =
    system:
    pkgs
    // {
      stdenv = pkgs.stdenv // {
        hostPlatform.system = system;
      };
      rustPlatform.buildRustPackage = args: {
        type = "derivation";
        name = "${args.pname}-${args.version}";
        outPath = moorlineOut;
        meta = args.meta;
        inherit args;
      };
      testers.runNixOSTest = test: {
        type = "derivation";
        name = "vm-test-run-${test.name}";
        inherit test;
      };
      mkShell = args: {
        type = "derivation";
        name = "shell";
        inherit args;
      };
      clippy = fakePackage "clippy" "clippy";
      rustfmt = fakePackage "rustfmt" "rustfmt";
      rust-analyzer = fakePackage "rust-analyzer" "rust-analyzer";
      websocat = fakePackage "websocat" "websocat";
      curl = fakePackage "curl" "curl";
      nixfmt = fakePackage "nixfmt" "nixfmt";
      nixfmt-tree = fakePackage "nixfmt-tree" "treefmt";
    };

  # The flake, evaluated as a plain function with nixpkgs.lib and the stub legacyPackages.
  flake = (import ../../flake.nix).outputs {
    self = flake;
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] legacyPackages;
    };
  };

  # The flake's module wrapper, evaluated like a NixOS system would: the package defaults to
  # the flake's build of the same system.
  viaFlake = evalWith [
    flake.nixosModules.default
    alice
    {
      services.moorline = {
        enable = true;
        user = "alice";
      };
    }
  ];

  cargoVersion = (lib.importTOML ../../Cargo.toml).workspace.package.version;
  pkgArgs = flake.packages.x86_64-linux.default.args;

  checks = {
    "minimal: no failed assertion, no warning" =
      failedAssertions minimal == [ ] && minimal.warnings == [ ];
    "minimal: runs as the user, with its group and home" =
      (moorlineUnit minimal).User == "alice"
      && (moorlineUnit minimal).Group == "users"
      && (moorlineUnit minimal).BindPaths == [ "/home/alice" ];
    "minimal: KillMode=process, Delegate, no token, no ProtectHostname before systemd 258" =
      (moorlineUnit minimal).KillMode == "process"
      && (moorlineUnit minimal).Delegate == "pids memory"
      && (moorlineUnit minimal).LoadCredential == [ ]
      && (moorlineUnit minimal).ProtectHostname == false;
    "minimal: tmux, runc and tini on PATH, then the user's profiles" =
      lib.take 3 minimal.systemd.services.moorline.path == [
        pkgs.tmux
        pkgs.runc
        pkgs.tini
      ]
      && lib.elem "/etc/profiles/per-user/alice" minimal.systemd.services.moorline.path;
    "minimal: no tailscale serve unit" = !(minimal.systemd.services ? moorline-tailscale-serve);
    "minimal: the API's socket in the runtime directory, TCP on, no allowed_users" =
      lib.hasInfix "\"unix_socket\" = \"/run/moorline/moorline.sock\"" (toml minimal)
      && lib.hasInfix "\"tcp\" = true" (toml minimal)
      && lib.hasInfix "\"allowed_users\" = []" (toml minimal);
    "tcp = false without unixSocket: refused" =
      lib.any (lib.hasInfix "listen nowhere") (failedAssertions socketOnlyWithoutSocket);
    "minimal: ExecStart runs the package with the generated config" =
      (moorlineUnit minimal).ExecStart == "${moorlineOut}/bin/moorline serve --config @CONFIG@";
    "full: the token goes through LoadCredential, never the store or the environment" =
      lib.elem "token:/run/secrets/moorline-token" (moorlineUnit full).LoadCredential
      && lib.hasSuffix " --token-file %d/token" (moorlineUnit full).ExecStart
      && !(lib.hasInfix "moorline-token" (toml full));
    "full: an instance's credentials_file goes through LoadCredential too" =
      lib.elem "instance-claude:/run/secrets/anthropic.env" (moorlineUnit full).LoadCredential
      && lib.hasInfix "\"credentials_file\" = \"/run/credentials/moorline.service/instance-claude\"" (toml full)
      && !(lib.hasInfix "anthropic.env" (toml full));
    "full: instance packages and extraPackages on PATH" =
      lib.elem pkgs.claude-code full.systemd.services.moorline.path
      && lib.any (p: (p.name or "") == "git") full.systemd.services.moorline.path;
    "full: writablePaths and (optional) workspace roots bound after the home" =
      (moorlineUnit full).BindPaths == [
        "/home/alice"
        "/srv/projects"
        "-/home/alice/src"
        "-/srv/work"
      ];
    "systemd 258: ProtectHostname=private (runc may still set container hostnames)" =
      (moorlineUnit systemd258).ProtectHostname == "private";
    "full: one warning, about limits" =
      builtins.length full.warnings == 1 && lib.hasInfix "memory_limit" (builtins.head full.warnings);
    "full: tailscale serve unit after tailscaled, HTTPS 443 to the API's Unix socket" =
      let
        serve = full.systemd.services.moorline-tailscale-serve;
      in
      lib.elem "tailscaled.service" serve.after
      && serve.serviceConfig.ExecStart
      == "${fakeStore}/tailscale/bin/tailscale serve --bg --https=443 --set-path=/ unix:/run/moorline/moorline.sock";
    "full: tailscale on the server's PATH (tailnet name detection)" =
      lib.elem pkgs.tailscale full.systemd.services.moorline.path;
    "nonLoopback: refused with a message naming the escape hatch" =
      let
        failed = failedAssertions nonLoopback;
      in
      builtins.length failed == 1 && lib.hasInfix "allowNonLoopback" (builtins.head failed);
    "nonLoopbackAllowed: accepted, and moorline's own switch set" =
      failedAssertions nonLoopbackAllowed == [ ]
      && lib.hasInfix "\"allow_non_loopback\" = true" (toml nonLoopbackAllowed);
    "ipv6: ::1 is loopback, and the serve target is bracketed" =
      failedAssertions ipv6 == [ ]
      && lib.hasSuffix "--set-path=/moorline http://[::1]:8341" ipv6.systemd.services.moorline-tailscale-serve.serviceConfig.ExecStart;
    "ipv6: no token with tailscale serve warns" = builtins.length ipv6.warnings == 1;
    "root: refused" = lib.any (lib.hasInfix "not root") (failedAssertions rootUser);
    "undeclared user: refused" = lib.any (lib.hasInfix "users.users") (failedAssertions undeclaredUser);
    "tailscaleServe without services.tailscale: refused" =
      lib.any (lib.hasInfix "services.tailscale.enable") (failedAssertions serveWithoutTailscaled);
    "disabled: nothing at all" = disabled.systemd.services == { } && disabled.assertions == [ ];
    "type: a port that is not a number fails" = fails (evalModule {
      enable = true;
      user = "alice";
      port = "x";
    }).services.moorline.port;
    "type: an unknown runtime fails" = fails (toml (evalModule {
      enable = true;
      user = "alice";
      instances.a = {
        agent = "echo";
        runtime = "docker";
      };
    }));
    "type: an instance id moorline would refuse fails" = fails (toml (evalModule {
      enable = true;
      user = "alice";
      instances."has space".agent = "echo";
    }));
    "type: an instance without agent fails" = fails (toml (evalModule {
      enable = true;
      user = "alice";
      instances.a.command = [ "cat" ];
    }));
    "type: a Nix path literal as tokenFile fails (it would land in the store)" = fails (evalModule {
      enable = true;
      user = "alice";
      tokenFile = ./eval-module.nix;
    }).services.moorline.tokenFile;
    "flake: nixosModules.default is a function (touches no pkgs when imported)" =
      builtins.isFunction flake.nixosModules.default;
    "flake: the module wrapper defaults the package to the flake's build" =
      (moorlineUnit viaFlake).ExecStart == "${moorlineOut}/bin/moorline serve --config @CONFIG@";
    "flake: package for x86_64-linux and aarch64-linux, version from Cargo.toml" =
      builtins.attrNames flake.packages == [
        "aarch64-linux"
        "x86_64-linux"
      ]
      && pkgArgs.version == cargoVersion
      && pkgArgs.pname == "moorline"
      && pkgArgs.meta.mainProgram == "moorline"
      && pkgArgs.cargoBuildFlags == [
        "--package"
        "moorline"
      ];
    "flake: the VM test imports the module and uses websocat" =
      let
        test = flake.checks.x86_64-linux.vm.test;
      in
      test.name == "moorline"
      && lib.hasInfix "websocat" test.testScript
      && lib.hasInfix "systemctl restart moorline" test.testScript;
    "flake: devShells, formatter and overlay exist" =
      flake.devShells.aarch64-linux.default.name == "shell"
      && flake.formatter.x86_64-linux.name == "nixfmt-tree"
      && (flake.overlays.default (legacyPackages "x86_64-linux") pkgs).moorline.name
      == "moorline-${cargoVersion}";
  };

  failedChecks = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);
in
{
  report =
    if failedChecks == [ ] then
      lib.concatMapStrings (name: "ok: ${name}\n") (lib.attrNames checks)
    else
      throw "module checks failed:\n  ${lib.concatStringsSep "\n  " failedChecks}";

  # Texts for the script's further checks.
  minimalToml = toml minimal;
  fullToml = toml full;
  nonLoopbackAllowedToml = toml nonLoopbackAllowed;
  minimalUnit = unitOf minimal "moorline";
  fullUnit = unitOf full "moorline";
  serveUnit = unitOf full "moorline-tailscale-serve";
  vmTestScript = flake.checks.x86_64-linux.vm.test.testScript;
}
