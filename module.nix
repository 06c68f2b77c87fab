# NixOS module: services.moorline.
#
# A plain module on purpose (it does not take the flake's `self`): `package` is a
# `mkPackageOption` on `pkgs.moorline`, so this file works unchanged in nixpkgs or with the
# flake's overlay, and the flake's `nixosModules.default` imports it and sets the package to the
# flake's own build with `mkDefault`. Nothing here touches `pkgs` until an option is read.
#
# How moorline runs here (docs/DEPLOY.md has the long version):
# - as `user`, a real login user: agents find that user's tools, and logins (~/.claude, ...) with
#   the tmux runtime; runc runs rootless (one uid mapped, no capabilities needed);
# - `moorline serve` starts `tmux -L moorline new-session -d ...` as a child; the tmux server it
#   spawns runs one keeper per session, and the keeper runs the agent or `runc run`. All of that
#   stays in this unit's cgroup, so KillMode=process (below) is what lets sessions outlive
#   `systemctl restart moorline`, `nixos-rebuild switch` and upgrades.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.moorline;
  inherit (lib) mkOption types;

  settingsFormat = pkgs.formats.toml { };

  # A path on the machine, outside the Nix store: a string, never a Nix path literal (that would
  # copy the file, a secret perhaps, into the world-readable store).
  externalPath = types.pathWith {
    inStore = false;
    absolute = true;
  };

  userCfg = config.users.users.${cfg.user};

  isLoopback =
    host:
    host == "localhost"
    || host == "::1"
    || host == "[::1]"
    || builtins.match "127\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}" host != null;

  # How the host appears in a URL (IPv6 addresses need brackets).
  urlHost =
    if lib.hasInfix ":" cfg.host && !lib.hasPrefix "[" cfg.host then "[${cfg.host}]" else cfg.host;

  # TOML has no null: options left at null mean "moorline's default" and are dropped.
  dropNulls =
    value:
    if builtins.isAttrs value then
      lib.mapAttrs (_: dropNulls) (lib.filterAttrs (_: v: v != null) value)
    else if builtins.isList value then
      map dropNulls (builtins.filter (v: v != null) value)
    else
      value;

  generatedConfig = settingsFormat.generate "moorline.toml" (dropNulls cfg.settings);

  # Validated at build time with moorline itself: an unknown key or a bad value fails the
  # build instead of the service. Skipped when cross-compiling (the binary cannot run here).
  configFile =
    if pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform then
      pkgs.runCommand "moorline-config-checked.toml" { preferLocalBuild = true; } ''
        ${lib.getExe cfg.package} check-config --no-env --config ${generatedConfig} > /dev/null
        cp ${generatedConfig} "$out"
      ''
    else
      generatedConfig;

  instancePackages = lib.concatMap (instance: instance.packages) (lib.attrValues cfg.instances);

  # Where systemd puts this unit's LoadCredential= files (its $CREDENTIALS_DIRECTORY).
  credentialsDir = "/run/credentials/moorline.service";
  instanceCredentials = lib.concatMap (
    instance:
    lib.optional (
      instance.credentials_file != null
    ) "instance-${instance.id}:${instance.credentials_file}"
  ) (lib.attrValues cfg.instances);
  workspaceRoots = lib.unique (
    lib.concatMap (instance: instance.workspace_roots) (lib.attrValues cfg.instances)
  );

  instanceModule =
    { name, ... }:
    {
      # Keys are moorline's own (snake_case), as in its TOML `[[instances]]`; keys not declared
      # here (model, base_url, dialect, provider, approval_tools, approval_timeout_ms,
      # approval_default, ...) pass through unchanged, and `moorline check-config` refuses
      # unknown ones at build time. `packages` is not moorline's and never reaches the TOML;
      # `credentials_file` reaches it as the path of its systemd credential.
      freeformType = settingsFormat.type;
      options = {
        id = mkOption {
          type = types.strMatching "[A-Za-z0-9._-]{1,64}";
          default = name;
          defaultText = lib.literalExpression "<name>";
          description = ''
            Name clients pick the instance by (`{"instanceId": ...}`). The instance named
            `default`, else the first in alphabetical order, is used when a client names none.
          '';
        };
        agent = mkOption {
          type = types.str;
          example = "claude-code";
          description = ''
            Adapter: `echo` (built in, needs nothing), `pi`, `claude-code`, `codex` (found as
            `pi`, `claude`, `codex` on the service's `PATH`, which holds `packages`), `command`
            (any program that speaks JSON Lines, given in `command`), or any name when
            `agent_path` names the executable.
          '';
        };
        command = mkOption {
          type = types.nullOr (types.listOf types.str);
          default = null;
          example = [ "my-agent" "--jsonl" ];
          description = ''
            Program and arguments for `agent = "command"`. A bare program name is looked up in
            the service's `PATH`.
          '';
        };
        agent_path = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = ''
            The agent's executable (amarre's `agentPath`); for `pi`, `claude-code` and `codex`,
            instead of looking it up in `PATH`.
          '';
        };
        args = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Extra arguments for the agent.";
        };
        env = mkOption {
          type = types.attrsOf types.str;
          default = { };
          description = ''
            Environment for every session of this instance. It is written to the Nix store:
            never put a secret here (use `credentials_file`).
          '';
        };
        runtime = mkOption {
          type = types.enum [
            "auto"
            "runc"
            "tmux"
            "process"
          ];
          default = "auto";
          description = ''
            Where agents run: `runc` (a rootless container in tmux), `tmux` (durable, no
            isolation), `process` (a child of the server: ends with it), or `auto` (the best
            one that works here, as logged at startup).
          '';
        };
        credentials_file = mkOption {
          type = types.nullOr externalPath;
          default = null;
          example = "/run/secrets/anthropic.env";
          description = ''
            A file of `KEY=VALUE` lines (API keys) added to the agent's environment at each
            start. systemd reads it as root and hands it to the service with `LoadCredential=`
            (as `instance-<id>`), so it may be readable by root only and never enters the Nix
            store; the TOML names the copy in `/run/credentials/moorline.service/`.
          '';
        };
        allowed_env = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "GIT_AUTHOR_*"
            "TZ"
          ];
          description = ''
            Variables clients may set when they create a session (`NAME`, or `PREFIX_*`);
            anything else is refused.
          '';
        };
        cwd = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Working directory of sessions that do not ask for one (default: the user's home).";
        };
        workspace_roots = mkOption {
          type = types.listOf externalPath;
          default = [ ];
          example = [ "/home/alice/src" ];
          description = ''
            Directories a session's `cwd` may be in (none: clients may not choose a `cwd`). They
            are also made writable to the service (`BindPaths=`, skipped if missing), like
            `services.moorline.writablePaths`.
          '';
        };
        create_cwd = mkOption {
          type = types.bool;
          default = false;
          description = "Create a requested `cwd` inside `workspace_roots` if it does not exist.";
        };
        network = mkOption {
          type = types.enum [
            "isolated"
            "host"
            "none"
          ];
          default = "isolated";
          description = ''
            Container network (`runc`): `isolated` (its own, outbound through slirp4netns, the
            host's loopback and so moorline's own port out of reach), `host` (the host's, loopback
            included: the agent can call moorline's API), or `none` (loopback only).
          '';
        };
        host_ports = mkOption {
          type = types.listOf types.port;
          default = [ ];
          example = [ 11434 ];
          description = ''
            Host loopback ports an `isolated` container may reach, at the same port on its own
            127.0.0.1 (a local model gateway such as ollama).
          '';
        };
        pids_limit = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Maximum number of processes in a container (`runc`; see the note on limits in docs/DEPLOY.md).";
        };
        memory_limit = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          example = 2147483648;
          description = "Maximum memory of a container in bytes (`runc`; see the note on limits in docs/DEPLOY.md).";
        };
        packages = mkOption {
          type = types.listOf types.package;
          default = [ ];
          example = lib.literalExpression "[ pkgs.claude-code ]";
          description = ''
            Packages this instance's agent needs, put on the service's `PATH` (and so on every
            agent's). Not a moorline key: it never reaches the TOML.
          '';
        };
      };
    };
in
{
  options.services.moorline = {
    enable = lib.mkEnableOption "moorline, which drives the CLI coding agents of this machine from the tailnet";

    package = lib.mkPackageOption pkgs "moorline" { };

    user = mkOption {
      type = types.str;
      example = "alice";
      description = ''
        The login user the server and its agents run as (required). Agents of the `tmux`
        runtime find this user's logins and tools in its home; `runc` containers run rootless,
        mapped to this user, with a home of their own per session. Its home and group are taken
        from `users.users.<user>`, which must declare it. The home stays writable to the
        agents; the rest of the system is read-only to them.
      '';
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      description = ''
        Address to listen on. moorline is reached through `tailscale serve`, so only loopback
        addresses are accepted unless `allowNonLoopback` is set.
      '';
    };

    allowNonLoopback = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Escape hatch: allow a non-loopback `host`. This exposes every agent of `user` to
        whoever reaches that address, with at most a bearer token in the way; moorline refuses
        it too unless its `allow_non_loopback` is set, which this option also sets. No firewall
        port is opened.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 8341;
      description = "TCP port to listen on.";
    };

    tcp = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Listen on `host`:`port`. Turn it off to serve on `unixSocket` only: then no local
        process of another user, and no agent in a container, can reach the API over TCP.
        Clients on this machine use `moorline ... --url unix:/run/moorline/moorline.sock`.
      '';
    };

    unixSocket = mkOption {
      type = types.nullOr externalPath;
      default = "/run/moorline/moorline.sock";
      description = ''
        A Unix socket to listen on (mode 0600, in the unit's private `RuntimeDirectory`), which
        `tailscaleServe` forwards to. On it, the `Tailscale-User-Login` header tailscaled adds
        is believed (only tailscaled, as root, and `user` can connect), so `allowedUsers` and
        the audit log know who is on the other end. `null`: TCP only.
      '';
    };

    allowedUsers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "alice@example.com"
        "local"
      ];
      description = ''
        Tailnet logins allowed to use moorline (`allowed_users`); everyone else gets 403.
        `local` admits requests with no identity (the CLI on this machine, TCP clients); a
        request with the bearer token is always let in. Empty: anyone who reaches the server.
      '';
    };

    maxSessions = mkOption {
      type = types.ints.positive;
      default = 8;
      description = "Sessions whose agent runs at the same time (`limits.max_sessions`).";
    };

    tokenFile = mkOption {
      type = types.nullOr externalPath;
      default = null;
      example = "/run/secrets/moorline-token";
      description = ''
        A file holding the bearer token every REST and WebSocket request must carry. systemd
        reads it as root and hands it to the service with `LoadCredential=` (it never enters
        the Nix store or the environment), so it may be readable by root only. `null`: no token,
        anyone who reaches the server may use it.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr externalPath;
      default = null;
      example = "/run/secrets/moorline.env";
      description = ''
        An `EnvironmentFile=` for the server (read by systemd, kept out of the store), for
        variables such as `HTTPS_PROXY`. Agents get only the variables listed in
        `settings.runtime.pass_env`. API keys for agents belong in
        `instances.<name>.credentials_file`.
      '';
    };

    runtimePackages = mkOption {
      type = types.listOf types.package;
      default = [
        pkgs.tmux
        pkgs.runc
        pkgs.tini
        pkgs.slirp4netns
      ];
      defaultText = lib.literalExpression "[ pkgs.tmux pkgs.runc pkgs.tini pkgs.slirp4netns ]";
      description = ''
        tmux, runc, tini and slirp4netns, found by name on the service's `PATH` (moorline's
        `runtime.tmux`, `runtime.runc`, `runtime.tini` and `runtime.slirp4netns` default to the
        bare names). Without runc or tini, `runtime = "auto"` falls back to tmux; without tmux,
        to plain processes. Without slirp4netns, containers on the default `isolated` network
        fail to start (never falling back to the host's network).
      '';
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.git pkgs.nodejs ]";
      description = ''
        Packages on the `PATH` of the server and of every agent. After these come the user's
        profiles (`/etc/profiles/per-user/<user>`, `~/.nix-profile`) and the system's, so
        agents also find the tools the user has.
      '';
    };

    writablePaths = mkOption {
      type = types.listOf externalPath;
      default = [ ];
      example = [ "/srv/projects" ];
      description = ''
        Directories the server and agents may write to besides the user's home, the state
        directory, `/tmp` and `/var/tmp`; everything else is read-only to them
        (`ProtectSystem=strict`). Workspaces outside the home go here. Each must exist.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          allowed_hosts = mkOption {
            type = types.listOf types.str;
            default = [ ];
            description = ''
              Names accepted in the `Host` header besides loopback names, this machine's hostname
              and its tailnet names (detected with `tailscale status`). Anything else is refused,
              which stops DNS rebinding.
            '';
          };
          allowed_origins = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "https://app.example" ];
            description = ''
              Browser origins allowed to call the API. Requests without an `Origin` header
              (native apps, curl, websocat) and same-origin requests are always allowed.
            '';
          };
          detect_tailnet_names = mkOption {
            type = types.bool;
            default = true;
            description = "Ask `tailscale status` for this machine's tailnet names at startup.";
          };
          log = mkOption {
            type = types.str;
            default = "info";
            example = "moorline=debug,info";
            description = "Log filter, in `RUST_LOG` syntax.";
          };
          log_format = mkOption {
            type = types.enum [
              "human"
              "json"
            ];
            default = "human";
            description = "Log format.";
          };
          runtime = mkOption {
            default = { };
            description = "Settings of the tmux and runc runtimes.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                runc_root = mkOption {
                  type = types.str;
                  default = "/run/moorline/runc";
                  description = ''
                    runc's state directory. The default is in the unit's `RuntimeDirectory`,
                    which is kept across restarts (containers outlive the server) and is gone
                    after a reboot, like the containers it describes.
                  '';
                };
                system_dirs = mkOption {
                  type = types.nullOr (types.listOf types.str);
                  default = null;
                  description = ''
                    Host directories bound read-only into containers. `null`: moorline's default
                    (which includes `/nix/store`, `/etc` and `/run/current-system`).
                  '';
                };
                pass_env = mkOption {
                  type = types.nullOr (types.listOf types.str);
                  default = null;
                  example = [
                    "PATH"
                    "HOME"
                    "USER"
                    "LOGNAME"
                    "LANG"
                    "TZ"
                    "SSL_CERT_FILE"
                    "HTTPS_PROXY"
                  ];
                  description = ''
                    Variables of the server's environment passed to agents. `null`: moorline's
                    default (`PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, `TZ`, CA-certificate and
                    proxy variables). A list replaces that default.
                  '';
                };
              };
            };
          };
        };
      };
      default = { };
      example = {
        limits = {
          backlog_bytes = 8388608;
          stop_grace_ms = 10000;
        };
        allowed_origins = [ "https://app.example" ];
      };
      description = ''
        moorline's configuration (TOML; `moorline print-default-config` lists every key). The
        generated file is checked with `moorline check-config` at build time. `host`, `port`,
        `tcp`, `unix_socket`, `allowed_users`, `allow_non_loopback`, `limits.max_sessions` and
        `instances` come from the options of the same names above; `state_dir` is the unit's `StateDirectory` (/var/lib/moorline) and the
        token comes from `tokenFile`.
      '';
    };

    instances = mkOption {
      type = types.attrsOf (types.submodule instanceModule);
      default = { };
      example = lib.literalExpression ''
        {
          claude = {
            agent = "claude-code";
            runtime = "runc";
            credentials_file = "/run/secrets/anthropic.env";
            workspace_roots = [ "/home/alice/src" ];
            packages = [ pkgs.claude-code ];
          };
        }
      '';
      description = ''
        Named agent configurations (`[[instances]]`). None: moorline's built-in `echo`
        instance, which needs nothing installed.
      '';
    };

    tailscaleServe = {
      enable = lib.mkEnableOption "a unit that runs `tailscale serve` for moorline, so it is reachable over HTTPS from the tailnet only";

      httpsPort = mkOption {
        type = types.port;
        default = 443;
        description = "HTTPS port on the machine's tailnet name.";
      };

      path = mkOption {
        type = types.strMatching "/.*";
        default = "/";
        description = ''
          URL path moorline is served under (`--set-path`). Clients that expect the API at the
          root (amarre's app) need `/`.
        '';
      };
    };

    configFile = mkOption {
      type = types.package;
      readOnly = true;
      default = configFile;
      defaultText = lib.literalMD "the TOML generated from `settings`, checked with `moorline check-config`";
      description = "The configuration file the service runs with (read-only; for inspection).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = config.users.users ? ${cfg.user};
        message = "services.moorline.user: the user \"${cfg.user}\" must be declared in users.users (moorline takes its home and group from there).";
      }
      {
        assertion = cfg.user != "root";
        message = "services.moorline.user: moorline runs agents as a login user, not root (its unit grants no capabilities; runc runs rootless).";
      }
      {
        assertion = isLoopback cfg.host || cfg.allowNonLoopback;
        message = "services.moorline.host: \"${cfg.host}\" is not a loopback address. moorline is meant to be reached through `tailscale serve` (services.moorline.tailscaleServe.enable); set services.moorline.allowNonLoopback = true to listen on it anyway.";
      }
      {
        assertion = cfg.tailscaleServe.enable -> config.services.tailscale.enable;
        message = "services.moorline.tailscaleServe.enable needs services.tailscale.enable.";
      }
      {
        assertion = cfg.tcp || cfg.unixSocket != null;
        message = "services.moorline.tcp = false needs services.moorline.unixSocket: the server would listen nowhere.";
      }
    ];

    warnings =
      lib.optional (cfg.tailscaleServe.enable && cfg.tokenFile == null && cfg.allowedUsers == [ ]) ''
        services.moorline: tailscaleServe is on and neither tokenFile nor allowedUsers is set:
        every tailnet device allowed to reach this machine can start agents as ${cfg.user}. Set
        services.moorline.allowedUsers (with the socket) or tokenFile, or restrict access with
        tailnet ACLs.''
      ++ lib.optional
        (lib.any (i: i.pids_limit != null || i.memory_limit != null) (lib.attrValues cfg.instances))
        ''
          services.moorline: pids_limit/memory_limit are not applied: moorline runs rootless as
          ${cfg.user} and does not use delegated cgroups yet (see docs/DEPLOY.md, "Limits").'';

    services.moorline.settings = {
      inherit (cfg) host port tcp;
      unix_socket = cfg.unixSocket;
      allowed_users = cfg.allowedUsers;
      allow_non_loopback = cfg.allowNonLoopback;
      limits.max_sessions = cfg.maxSessions;
      instances = lib.mkIf (cfg.instances != { }) (
        lib.mapAttrsToList (
          _: instance:
          dropNulls (
            removeAttrs instance [ "packages" ]
            // lib.optionalAttrs (instance.credentials_file != null) {
              credentials_file = "${credentialsDir}/instance-${instance.id}";
            }
          )
        ) cfg.instances
      );
    };

    environment.systemPackages = [ cfg.package ];

    systemd.services.moorline = {
      description = "moorline: CLI coding agents over the tailnet";
      documentation = [ "https://github.com/moorline/moorline/blob/main/docs/DEPLOY.md" ];
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ] ++ lib.optional config.services.tailscale.enable "tailscaled.service";
      startLimitIntervalSec = 60;
      startLimitBurst = 5;
      # Agents look programs up in this PATH (moorline passes PATH on to them), and moorline
      # finds tmux, runc, tini and tailscale in it: no store path is baked into the binary.
      path =
        cfg.runtimePackages
        ++ instancePackages
        ++ cfg.extraPackages
        ++ lib.optional config.services.tailscale.enable config.services.tailscale.package
        ++ [
          "/etc/profiles/per-user/${cfg.user}"
          "${userCfg.home}/.nix-profile"
          "/run/current-system/sw"
        ];
      # A restart does not end sessions (KillMode=process), so switching configurations may
      # restart the server freely.
      restartIfChanged = true;

      serviceConfig = {
        Type = "exec";
        User = cfg.user;
        Group = lib.mkIf (userCfg.group != "") userCfg.group;
        ExecStart =
          "${lib.getExe cfg.package} serve --config ${cfg.configFile}"
          + lib.optionalString (cfg.tokenFile != null) " --token-file %d/token";
        LoadCredential =
          lib.optional (cfg.tokenFile != null) "token:${cfg.tokenFile}" ++ instanceCredentials;
        EnvironmentFile = lib.optional (cfg.environmentFile != null) cfg.environmentFile;
        # Sessions without a cwd start in the user's home, as from a login shell.
        WorkingDirectory = "~";

        # Sessions live in $STATE_DIRECTORY (moorline's default state_dir under systemd).
        StateDirectory = "moorline";
        StateDirectoryMode = "0700";
        # /run/moorline holds runc's state (settings.runtime.runc_root) and the API's socket
        # (unixSocket; moorline replaces a stale one and removes it when it stops). Preserved:
        # running containers outlive a stop of the unit, and runc must still find them.
        # Containers never see it: it is not under the state directory or a system directory.
        RuntimeDirectory = "moorline";
        RuntimeDirectoryMode = "0700";
        RuntimeDirectoryPreserve = true;

        Restart = "on-failure";
        RestartSec = "2s";
        # 64: a configuration error; restarting would not fix it.
        RestartPreventExitStatus = 64;
        TimeoutStopSec = "30s";

        # Sessions survive restarts: only the server process is signalled on stop. tmux, the
        # keepers and `runc run` are in this unit's cgroup (moorline starts tmux as a child), and
        # the default KillMode=control-group would kill every agent on `systemctl restart`.
        # moorline stops the agents it owns itself (the `process` runtime) when it exits.
        # systemd logs "left-over process" lines for them on the next start; that is expected.
        KillMode = "process";
        # An agent killed by the kernel OOM killer is the agent's problem (moorline reports it
        # as crashed); it must not stop the server.
        OOMPolicy = "continue";
        # cgroup v2: hands this unit's subtree (pids, memory) to the user, so rootless runc can
        # give containers cgroups of their own inside it. pids_limit/memory_limit also need
        # moorline to use this subtree, which it does not do yet (docs/DEPLOY.md, "Limits").
        Delegate = "pids memory";

        # --- hardening: as strict as runc (rootless), tmux and Node-based agents allow. Every
        # setting is inherited by the agents, so each relaxation below names what needs it.
        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        ProtectSystem = "strict";
        # Other users' homes are hidden; the user's own is bound back read-write (agents keep
        # their logins, caches and projects there).
        ProtectHome = "tmpfs";
        # Workspace roots are skipped ("-") when missing: moorline refuses sessions there anyway.
        BindPaths = [
          userCfg.home
          "-/dev/net/tun"
        ]
        ++ cfg.writablePaths
        ++ map (root: "-${root}") workspaceRoots;
        # /tmp is shared, not private: tmux's socket (/tmp/tmux-<uid>/moorline) must outlive the
        # unit's stop and be reachable by `tmux -L moorline attach` from the user's shell, and a
        # private /tmp is wiped on stop under the tmux-runtime agents that keep running.
        PrivateTmp = false;
        ReadWritePaths = [
          "/tmp"
          "/var/tmp"
        ];
        PrivateDevices = true;
        # slirp4netns (network = "isolated") opens /dev/net/tun inside the container's
        # namespaces: bound into the private /dev (BindPaths above) and allowed here.
        DeviceAllow = [ "/dev/net/tun rw" ];
        PrivateIPC = true;
        PrivateMounts = true;
        ProtectClock = true;
        ProtectKernelModules = true;
        # No ProtectKernelTunables= and no ProtectKernelLogs=: they put read-only mounts over
        # /proc/sys and /proc/kmsg, and the kernel then refuses the fresh /proc a rootless runc
        # container mounts (EPERM; "mount_too_revealing"). Measured with unshare.
        ProtectKernelTunables = false;
        ProtectKernelLogs = false;
        # No ProtectControlGroups=: it makes the delegated cgroup subtree read-only as well.
        ProtectControlGroups = false;
        ProtectProc = "invisible";
        # ProcSubset=pid would hide /proc/cpuinfo, /proc/meminfo and /proc/stat from the tmux
        # runtime's agents (Node's os.cpus() returns nothing without them).
        ProcSubset = "all";
        # ProtectHostname=yes forbids sethostname() to every descendant, and runc sets each
        # container's hostname; systemd 258's "private" allows it in the unit's own namespace.
        ProtectHostname =
          if lib.versionAtLeast config.systemd.package.version "258" then "private" else false;
        # PrivateUsers= would nest runc's user namespace in one of systemd's and show every
        # other uid as nobody to the agents; the unit holds no capability to take away anyway.
        PrivateUsers = false;
        # Agents need the network (their model APIs): no PrivateNetwork= or IPAddressDeny=.
        # AF_NETLINK: runc and slirp4netns set up interfaces in containers' own network
        # namespaces, and agents list interfaces (getifaddrs).
        RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
        # runc creates user, mount, pid, ipc, uts and net namespaces (net unless network = "host").
        RestrictNamespaces = "user mnt pid ipc uts net";
        # No MemoryDenyWriteExecute=: V8 (Node-based agents such as Claude Code) and other JITs
        # need writable executable memory.
        MemoryDenyWriteExecute = false;
        LockPersonality = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        # The user is a login user: removing its IPC objects on stop would hit its own desktop
        # session and the agents that keep running.
        RemoveIPC = false;
        SystemCallArchitectures = "native";
        # A deny list, not @system-service: runc needs @mount and @privileged (pivot_root,
        # setgroups, sethostname), agents' tools need @debug (strace, gdb) and @resources
        # (setrlimit, sched_setaffinity). What no agent needs is refused.
        SystemCallFilter = [ "~@clock @cpu-emulation @module @obsolete @raw-io @reboot @swap" ];
        # Journals, metadata and agents' new files are private to the user.
        UMask = "0077";
      };
    };

    systemd.services.moorline-tailscale-serve = lib.mkIf cfg.tailscaleServe.enable (
      let
        tailscale = lib.getExe' config.services.tailscale.package "tailscale";
        where = "--https=${toString cfg.tailscaleServe.httpsPort} --set-path=${cfg.tailscaleServe.path}";
        # The socket when there is one: there tailscaled's identity headers are believed.
        target =
          if cfg.unixSocket != null then
            "unix:${cfg.unixSocket}"
          else
            "http://${urlHost}:${toString cfg.port}";
        waitForTailscale = pkgs.writeShellScript "moorline-wait-for-tailscale" ''
          for _ in $(seq 120); do
            ${tailscale} status --peers=false > /dev/null 2>&1 && exit 0
            sleep 1
          done
          echo "tailscale is not up (logged in and running) after 120 s" >&2
          exit 1
        '';
      in
      {
        description = "Serve moorline on the tailnet (tailscale serve, HTTPS)";
        wantedBy = [ "multi-user.target" ];
        wants = [ "tailscaled.service" ];
        after = [
          "tailscaled.service"
          "moorline.service"
        ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStartPre = waitForTailscale;
          # HTTPS on the machine's tailnet name, tailnet only (this is `serve`, not `funnel`);
          # tailscaled keeps the setting (--bg) until ExecStop removes it.
          ExecStart = "${tailscale} serve --bg ${where} ${target}";
          ExecStop = "${tailscale} serve ${where} off";
          Restart = "on-failure";
          RestartSec = "10s";
          # It only talks to tailscaled's socket (as root, which tailscaled requires to change
          # serve settings); nothing else.
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
          RestrictNamespaces = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
        };
      }
    );
  };
}
