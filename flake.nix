{
  description = "moorline: drive the CLI coding agents of your machine from anywhere on your tailnet";

  # nixpkgs only. The package needs rustc >= 1.88 (edition 2024, let chains): nixos-25.11 or
  # newer.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      moorline =
        pkgs:
        pkgs.rustPlatform.buildRustPackage {
          pname = "moorline";
          version = (lib.importTOML ./Cargo.toml).workspace.package.version;

          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./server
              ./adapters
              ./fixtures
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [
            "--package"
            "moorline"
          ];

          # Unit tests only: the integration tests (server/tests) start real servers and need
          # root, runc, tmux, tini and user namespaces, none of which the build sandbox has.
          # checks.<system>.vm runs the binary for real (runc, tmux, a restart).
          cargoTestFlags = [
            "--package"
            "moorline"
            "--package"
            "moorline-adapters"
            "--lib"
          ];

          # runc, tmux, tini, tailscale and the agents are looked up on PATH at run time (the
          # NixOS module sets the unit's PATH); no store path of them is baked in here.

          meta = {
            description = "Drive CLI coding agents on your machine from anywhere on your tailnet";
            homepage = "https://github.com/moorline/moorline";
            license = with lib.licenses; [
              mit
              asl20
            ];
            mainProgram = "moorline";
            platforms = lib.platforms.linux;
          };
        };
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          default = moorline pkgs;
          moorline = self.packages.${system}.default;
        }
      );

      # For `lib.mkPackageOption pkgs "moorline"` without the flake's module wrapper.
      overlays.default = final: _prev: { moorline = moorline final; };

      # module.nix is a plain module (it works the same in nixpkgs); this wrapper only makes the
      # flake's build the default package. Neither touches pkgs until an option is evaluated.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./module.nix ];
          services.moorline.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      nixosModules.moorline = self.nixosModules.default;

      checks = forAllSystems (
        system: pkgs: {
          package = self.packages.${system}.default;

          # The service starts, /healthz answers on loopback, a session of the built-in echo
          # instance round-trips over websocat (in a rootless runc container, under the unit's
          # hardening), and the session survives `systemctl restart moorline`.
          vm = pkgs.testers.runNixOSTest {
            name = "moorline";
            nodes.machine =
              { pkgs, ... }:
              {
                imports = [ self.nixosModules.default ];
                users.users.alice.isNormalUser = true;
                # A test token in the store: for this VM only, never for a real machine.
                environment.etc."moorline-test-token".text = "vm-test-token";
                environment.systemPackages = [
                  pkgs.curl
                  pkgs.websocat
                ];
                services.moorline = {
                  enable = true;
                  user = "alice";
                  tokenFile = "/etc/moorline-test-token";
                };
              };
            testScript = ''
              import json

              header = "Authorization: Bearer vm-test-token"
              api = "http://127.0.0.1:8341"


              def call(method, path, body=None):
                  data = f" -d '{body}'" if body is not None else ""
                  return json.loads(machine.succeed(f"curl -sf -X {method} -H '{header}'{data} {api}{path}"))


              def frames(sid, lines, query=""):
                  """Sends lines on the session's WebSocket, listens 3 s, returns the frames."""
                  send = "".join(f"echo '{json.dumps(line)}'; " for line in lines)
                  # --header=...: a separate argument would take the URL as a second header.
                  out = machine.succeed(
                      f"({send}sleep 3) | websocat --header='{header}' 'ws://127.0.0.1:8341/sessions/{sid}{query}'"
                  )
                  return [json.loads(line) for line in out.splitlines() if line.strip()]


              def answered(received, request_id):
                  return any(f.get("id") == request_id and f.get("success") is True for f in received)


              machine.wait_for_unit("moorline.service")
              machine.wait_for_open_port(8341)

              with subtest("/healthz answers on loopback, the API wants the token"):
                  machine.succeed(f"curl -sf {api}/healthz")
                  machine.fail(f"curl -sf {api}/sessions")

              with subtest("the API's Unix socket: private, and tailnet logins are believed there"):
                  sock = "/run/moorline/moorline.sock"
                  assert machine.succeed(f"stat -c %a {sock}").strip() == "600"
                  me = json.loads(machine.succeed(
                      f"curl -sf --unix-socket {sock} -H '{header}' "
                      f"-H 'Tailscale-User-Login: alice@example.com' http://localhost/me"
                  ))
                  assert me["user"] == "alice@example.com" and me["via"] == "unix", me

              with subtest("an echo session round-trips over websocat, in a rootless runc container"):
                  session = call("POST", "/sessions", "{}")
                  sid = session["id"]
                  assert session["runtime"] == "runc", session
                  assert answered(frames(sid, [{"id": "1", "type": "get_state"}]), "1")
                  keeper = machine.succeed(f"cat /var/lib/moorline/sessions/{sid}/run/keeper.pid").strip()

              with subtest("the session survives systemctl restart moorline"):
                  machine.succeed("systemctl restart moorline")
                  machine.wait_for_unit("moorline.service")
                  machine.wait_for_open_port(8341)
                  machine.succeed(f"kill -0 {keeper}")
                  assert call("GET", f"/sessions/{sid}")["status"] == "running"
                  assert answered(frames(sid, [{"id": "2", "type": "get_state"}]), "2")
                  replay = frames(sid, [], "?since=0")
                  assert answered(replay, "1") and answered(replay, "2"), replay

              machine.log(machine.succeed("systemd-analyze security moorline.service | tail -n 1"))
            '';
          };
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.default ];
            packages = [
              pkgs.clippy
              pkgs.rustfmt
              pkgs.rust-analyzer
              pkgs.tmux
              pkgs.runc
              pkgs.tini
              pkgs.slirp4netns
              pkgs.websocat
              pkgs.nixfmt
            ];
          };
        }
      );

      formatter = forAllSystems (_system: pkgs: pkgs.nixfmt-tree);
    };
}
