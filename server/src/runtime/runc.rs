//! runc: the OCI bundle of a session's container, and the `runc` commands moorline uses.
//!
//! The container is built from nothing: an empty, read-only root filesystem with read-only
//! binds of the host's system directories (so agents find their interpreters and libraries),
//! the session's workspace read-write at the same path as on the host, a per-session home, a
//! private `/tmp`, `tini` as PID 1 (it reaps zombies left by tools and forwards signals), no new
//! privileges, no capabilities, its own pid/ipc/uts/mount namespaces, and optional pids and
//! memory limits. Only an explicit environment reaches it.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use oci_spec::runtime::{
    Hook, HookBuilder, Linux, LinuxBuilder, LinuxCapabilities, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResources, LinuxResourcesBuilder, Mount, MountBuilder, Process, ProcessBuilder,
    RootBuilder, Spec, UserBuilder,
};
use tokio::process::Command;

use super::network::{HOOK_TIMEOUT_SECS, NetworkHook};
use super::workspace::Anchor;
use crate::config::NetworkMode;

/// Prefix of every container id moorline creates, so its own are easy to find.
pub const ID_PREFIX: &str = "moorline-";

/// Where the agent's home directory appears inside the container.
pub const CONTAINER_HOME: &str = "/home/moorline";

/// The `runc` command with moorline's state directory.
#[derive(Debug, Clone)]
pub struct Runc {
    program: PathBuf,
    root: PathBuf,
}

impl Runc {
    /// runc with its state in `root` (moorline's own, never the system's).
    pub fn new(program: PathBuf, root: PathBuf) -> Self {
        Self { program, root }
    }

    /// The program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Arguments of `runc run` for a bundle (the keeper runs it).
    pub fn run_args(&self, bundle: &Path, id: &str) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "run".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            id.into(),
        ]
    }

    /// Arguments of `runc run --detach` for a bundle: runc returns once the container runs,
    /// after writing its init's pid to `pid_file`; the container keeps the caller's stdio.
    pub fn detached_run_args(&self, bundle: &Path, id: &str, pid_file: &Path) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "run".into(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.display().to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            id.into(),
        ]
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--root")
            .arg(&self.root)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Whether runc runs at all.
    pub async fn version(&self) -> io::Result<String> {
        let out = Command::new(&self.program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned())
    }

    /// Sends `signal` (`TERM`, `KILL`) to the container's init, which passes it on.
    pub async fn kill(&self, id: &str, signal: &str) -> io::Result<()> {
        let out = self.command().args(["kill", id, signal]).output().await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }

    /// Removes a container, running or not, and its cgroups.
    pub async fn delete(&self, id: &str) {
        let _ = self
            .command()
            .args(["delete", "--force", id])
            .output()
            .await;
        remove_cgroups(id);
    }

    /// Ids of the containers in moorline's state directory that belong to the server whose
    /// session directories are in `sessions_dir`: those whose bundle lies there, and
    /// half-created ones (a state directory that `runc list` does not show) of a session
    /// that has a directory there. Other servers' containers are left alone.
    pub async fn container_ids(&self, sessions_dir: &Path) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Listed {
            id: String,
            bundle: PathBuf,
        }
        let listed: Vec<Listed> = match self
            .command()
            .args(["list", "--format", "json"])
            .output()
            .await
        {
            // runc prints `null` when there are no containers.
            Ok(out) => serde_json::from_slice::<Option<Vec<Listed>>>(&out.stdout)
                .ok()
                .flatten()
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut ids: Vec<String> = listed
            .iter()
            .filter(|c| c.bundle.starts_with(sessions_dir))
            .map(|c| c.id.clone())
            .collect();
        let half_created = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| !listed.iter().any(|c| &c.id == id));
        for id in half_created {
            if session_of(&id).is_some_and(|s| sessions_dir.join(s).is_dir()) {
                ids.push(id);
            }
        }
        ids
    }
}

/// The session id a container id belongs to, if it is one of moorline's.
pub fn session_of(container_id: &str) -> Option<&str> {
    let rest = container_id.strip_prefix(ID_PREFIX)?;
    let id = rest.split('-').next()?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The cgroup of container `id`, relative to each hierarchy's root.
pub fn cgroups_path(id: &str) -> String {
    format!("/moorline/{id}")
}

/// Removes the cgroup directories runc leaves behind for half-created containers, under the
/// `moorline` parent of every hierarchy (cgroup v1) or of the unified tree (v2).
pub fn remove_cgroups(id: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join("moorline").join(id)];
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        candidates.push(entry.path().join("moorline").join(id));
    }
    for dir in candidates {
        if dir.is_dir() {
            // Children first (v1 cpuset and friends may hold nested dirs).
            for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if sub.path().is_dir() {
                    let _ = std::fs::remove_dir(sub.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Everything that goes into one container.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// The container id (unique, never reused).
    pub container_id: String,
    /// The session, written as an annotation with the start number.
    pub session_id: String,
    /// The start number.
    pub generation: u64,
    /// The agent program (absolute path on the host).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its complete environment.
    pub env: BTreeMap<String, String>,
    /// The workspace, mounted read-write at the same path by a hook that opens it beneath its
    /// anchor (see [`super::workspace`]); `/` is not mounted.
    pub workspace: Anchor,
    /// The moorline executable, which runs that hook.
    pub moorline_exe: PathBuf,
    /// The agent's user and group (as root: never 0; see [`super::workspace::agent_identity`]).
    /// `None` when rootless: container root, which is this user on the host.
    pub user: Option<(u32, u32)>,
    /// The host directory mounted as the agent's home.
    pub home: PathBuf,
    /// The init program (absolute path on the host).
    pub tini: PathBuf,
    /// Host directories bound read-only.
    pub system_dirs: Vec<PathBuf>,
    /// More host directories bound read-write at the same path: the session's data
    /// directory, where adapters keep agent configuration (rewritten at every start, so an
    /// agent cannot change its own next launch).
    pub extra_rw: Vec<PathBuf>,
    /// Host paths bound read-only at the same path, over what `extra_rw` binds (the git
    /// configuration and hooks of a worktree's repository: an agent must not plant commands
    /// that git runs for someone else).
    pub extra_ro: Vec<PathBuf>,
    /// Network mode.
    pub network: NetworkMode,
    /// With `network = "isolated"`: the hook that connects the container's network namespace
    /// before the agent starts (see [`super::network`]).
    pub network_hook: Option<NetworkHook>,
    /// A file mounted over `/etc/resolv.conf` (when the host's names an unreachable resolver).
    pub resolv_conf: Option<PathBuf>,
    /// Process limit.
    pub pids_limit: Option<i64>,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// `Some((uid, gid))` when running rootless: container root maps to this host user.
    pub rootless: Option<(u32, u32)>,
    /// Whether resource limits can be applied (root, or delegated cgroups).
    pub limits_allowed: bool,
}

fn oci(e: oci_spec::OciSpecError) -> io::Error {
    io::Error::other(e.to_string())
}

fn bind(source: &Path, destination: &Path, writable: bool) -> io::Result<Mount> {
    let mode = if writable { "rw" } else { "ro" };
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(vec![
            "rbind".into(),
            mode.into(),
            "nosuid".into(),
            "nodev".into(),
        ])
        .build()
        .map_err(oci)
}

/// Whether `path` lies under one of `dirs` (so it is already visible in the container).
fn covered(path: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| path.starts_with(d))
}

/// Writes `bundle/config.json` and a fresh `bundle/rootfs`.
pub fn write_bundle(bundle: &Path, spec: &BundleSpec) -> io::Result<()> {
    let rootfs = fresh_rootfs(bundle)?;
    let mut base = match spec.rootless {
        Some((uid, gid)) => Spec::rootless(uid, gid),
        None => Spec::default(),
    };
    let mounts = mounts(spec, &rootfs, base.mounts().clone().unwrap_or_default())?;
    base.set_mounts(Some(mounts));
    let (uid, gid) = agent_ids(spec)?;
    if spec.rootless.is_none() {
        std::os::unix::fs::chown(&spec.home, Some(uid), Some(gid))?;
    }
    base.set_process(Some(process(spec, uid, gid)?));
    let mut hooks = base.hooks().clone().unwrap_or_default();
    let mut hooked = false;
    if spec.workspace.path() != Path::new("/") {
        // After runc's own mounts, in the container's mount namespace, before pivot_root.
        let mut create = hooks.create_container().clone().unwrap_or_default();
        create.push(workspace_hook(spec, &rootfs)?);
        hooks.set_create_container(Some(create));
        hooked = true;
    }
    if let Some(hook) = &spec.network_hook {
        // createRuntime: in the host's namespaces, once the container's exist, before the agent
        // runs; a failure fails the start.
        let mut create = hooks.create_runtime().clone().unwrap_or_default();
        create.push(
            HookBuilder::default()
                .path(&hook.path)
                .args(hook.args.clone())
                .env(Vec::<String>::new())
                .timeout(HOOK_TIMEOUT_SECS)
                .build()
                .map_err(oci)?,
        );
        hooks.set_create_runtime(Some(create));
        hooked = true;
    }
    if hooked {
        base.set_hooks(Some(hooks));
    }
    base.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build()
            .map_err(oci)?,
    ));
    base.set_hostname(Some(format!("moorline-{}", spec.session_id)));
    base.set_version("1.0.2".into());
    base.set_annotations(Some(
        [
            ("org.moorline.session", spec.session_id.clone()),
            ("org.moorline.generation", spec.generation.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    ));
    let defaults = base.linux().clone().unwrap_or_default();
    base.set_linux(Some(linux(spec, &defaults)?));
    // The spec holds the agent's environment (API keys): readable by its owner only.
    let path = bundle.join("config.json");
    base.save(&path).map_err(oci)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
}

/// An empty `bundle/rootfs` (the container's root is read-only: only mount points in it).
fn fresh_rootfs(bundle: &Path) -> io::Result<PathBuf> {
    let _ = std::fs::remove_dir_all(bundle);
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    // runc gives a tmpfs the mode of an existing mount point, so /tmp must already be 1777
    // (otherwise agents that need a writable /tmp, like Claude Code, exit silently).
    let tmp = rootfs.join("tmp");
    std::fs::create_dir(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    Ok(rootfs)
}

/// What the container sees: runc's defaults, the system directories read-only, a private
/// `/tmp`, its home, the session's data directory, and the agent and init programs.
fn mounts(spec: &BundleSpec, rootfs: &Path, mut mounts: Vec<Mount>) -> io::Result<Vec<Mount>> {
    // Agents need neither POSIX message queues nor a view of the cgroup tree; leaving them out
    // also makes a container start a few milliseconds sooner.
    mounts.retain(|m| {
        m.destination() != Path::new("/dev/mqueue")
            && m.destination() != Path::new("/sys/fs/cgroup")
    });
    let mut visible = Vec::new();
    for dir in &spec.system_dirs {
        let Ok(meta) = std::fs::symlink_metadata(dir) else {
            continue;
        };
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        if meta.file_type().is_symlink() {
            // Merged-/usr systems: /bin -> usr/bin. Recreate the link inside.
            let target = std::fs::read_link(dir)?;
            if let Some(parent) = rootfs.join(relative).parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(target, rootfs.join(relative))?;
        } else if meta.is_dir() {
            mounts.push(bind(dir, dir, false)?);
            visible.push(dir.clone());
        }
    }
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec!["nosuid".into(), "nodev".into(), "mode=1777".into()])
            .build()
            .map_err(oci)?,
    );
    mounts.push(bind(&spec.home, Path::new(CONTAINER_HOME), true)?);
    for dir in &spec.extra_rw {
        if dir.is_dir() {
            mounts.push(bind(dir, dir, true)?);
        }
    }
    for path in &spec.extra_ro {
        if path.exists() {
            mounts.push(bind(path, path, false)?);
        }
    }
    if let Some(file) = &spec.resolv_conf {
        mounts.push(bind(file, Path::new("/etc/resolv.conf"), false)?);
    }
    for file in [&spec.program, &spec.tini] {
        if !covered(file, &visible) {
            mounts.push(bind(file, file, false)?);
        }
    }
    Ok(mounts)
}

/// Who the agent is inside the container; never root over the host's files.
fn agent_ids(spec: &BundleSpec) -> io::Result<(u32, u32)> {
    match (spec.rootless, spec.user) {
        // Container root is the only mapped id: this unprivileged user on the host.
        (Some(_), _) => Ok((0, 0)),
        // As root, the agent runs as the user chosen for it, without any capability.
        (None, Some((uid, gid))) if uid != 0 && gid != 0 => Ok((uid, gid)),
        (None, _) => Err(io::Error::other(
            "refusing to run an agent as root (no unprivileged user was chosen for it)",
        )),
    }
}

/// The agent under tini, in its workspace, without capabilities or new privileges.
fn process(spec: &BundleSpec, uid: u32, gid: u32) -> io::Result<Process> {
    let mut args = vec![
        spec.tini.display().to_string(),
        "-g".into(),
        "--".into(),
        spec.program.display().to_string(),
    ];
    args.extend(spec.args.iter().cloned());
    let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut no_caps = LinuxCapabilities::default();
    no_caps.set_bounding(Some(Default::default()));
    no_caps.set_effective(Some(Default::default()));
    no_caps.set_inheritable(Some(Default::default()));
    no_caps.set_permitted(Some(Default::default()));
    no_caps.set_ambient(Some(Default::default()));
    ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(oci)?,
        )
        .args(args)
        .env(env)
        .cwd(spec.workspace.path())
        .no_new_privileges(true)
        .capabilities(no_caps)
        .build()
        .map_err(oci)
}

/// The hook that mounts the workspace, opened beneath its anchor (see [`super::workspace`]).
fn workspace_hook(spec: &BundleSpec, rootfs: &Path) -> io::Result<Hook> {
    let anchor = serde_json::to_string(&spec.workspace).map_err(io::Error::other)?;
    HookBuilder::default()
        .path(&spec.moorline_exe)
        .args(vec![
            "moorline".into(),
            "mount-workspace".into(),
            anchor,
            rootfs.display().to_string(),
        ])
        .build()
        .map_err(oci)
}

/// Namespaces, seccomp, id mappings (rootless) and resource limits.
fn linux(spec: &BundleSpec, defaults: &Linux) -> io::Result<Linux> {
    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if spec.network != NetworkMode::Host {
        kinds.push(LinuxNamespaceType::Network);
    }
    if spec.rootless.is_some() {
        kinds.push(LinuxNamespaceType::User);
    }
    let namespaces = kinds
        .into_iter()
        .map(|typ| {
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(oci)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .seccomp(super::seccomp::profile().map_err(oci)?)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default());
    if let Some((uid, gid)) = spec.rootless {
        let map = |host: u32| {
            LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(host)
                .size(1u32)
                .build()
                .map_err(oci)
        };
        linux = linux
            .uid_mappings(vec![map(uid)?])
            .gid_mappings(vec![map(gid)?]);
    }
    if spec.limits_allowed {
        linux = linux
            .resources(resources(spec)?)
            .cgroups_path(PathBuf::from(cgroups_path(&spec.container_id)));
    }
    linux.build().map_err(oci)
}

/// The pids and memory limits (memory without swap on top).
fn resources(spec: &BundleSpec) -> io::Result<LinuxResources> {
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(limit) = spec.pids_limit {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(limit)
                .build()
                .map_err(oci)?,
        );
    }
    if let Some(limit) = spec.memory_limit {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                // Same as the limit: no swap on top of it.
                .swap(limit)
                .build()
                .map_err(oci)?,
        );
    }
    resources.build().map_err(oci)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> BundleSpec {
        BundleSpec {
            container_id: "moorline-0123456789ab-1-cafe".into(),
            session_id: "0123456789ab".into(),
            generation: 1,
            program: "/opt/agents/bin/agent".into(),
            args: vec!["--rpc".into()],
            env: BTreeMap::from([("HOME".into(), CONTAINER_HOME.into())]),
            workspace: Anchor::literal(dir),
            moorline_exe: "/usr/bin/moorline".into(),
            user: Some((1000, 1000)),
            home: dir.join("home"),
            tini: "/usr/bin/tini".into(),
            system_dirs: vec!["/usr".into(), "/bin".into(), "/nonexistent".into()],
            extra_rw: Vec::new(),
            extra_ro: Vec::new(),
            network: NetworkMode::None,
            network_hook: None,
            resolv_conf: None,
            pids_limit: Some(64),
            memory_limit: Some(64 << 20),
            rootless: None,
            limits_allowed: true,
        }
    }

    #[test]
    fn the_bundle_says_what_the_container_gets() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("home")).expect("home");
        let bundle = tmp.path().join("bundle");
        write_bundle(&bundle, &spec(tmp.path())).expect("bundle");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("read"))
                .expect("json");
        let p = &config["process"];
        assert_eq!(p["args"][0], "/usr/bin/tini");
        assert_eq!(p["args"][3], "/opt/agents/bin/agent");
        assert_eq!(p["env"], serde_json::json!(["HOME=/home/moorline"]));
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["capabilities"]["bounding"], serde_json::json!([]));
        assert_eq!(config["root"]["readonly"], true);
        let mounts = config["mounts"].as_array().expect("mounts");
        let find = |dest: &str| mounts.iter().find(|m| m["destination"] == dest).cloned();
        assert!(
            find("/usr").expect("usr")["options"]
                .as_array()
                .expect("opts")
                .contains(&"ro".into())
        );
        assert!(
            find("/nonexistent").is_none(),
            "missing system dirs are skipped"
        );
        assert_eq!(
            find("/opt/agents/bin/agent").expect("program bound")["options"][1],
            "ro"
        );
        assert!(
            find("/usr/bin/tini").is_none(),
            "tini is already visible under /usr"
        );
        // The workspace is mounted by a hook that opens it beneath its anchor, never by path.
        let cwd = tmp.path().display().to_string();
        assert!(find(&cwd).is_none(), "not a mount of runc's");
        let hook = &config["hooks"]["createContainer"][0];
        assert_eq!(hook["path"], "/usr/bin/moorline");
        assert_eq!(hook["args"][1], "mount-workspace");
        assert_eq!(p["cwd"], cwd);
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(
            config["linux"]["seccomp"]["defaultAction"],
            "SCMP_ACT_ALLOW"
        );
        let linux = &config["linux"];
        assert_eq!(linux["resources"]["pids"]["limit"], 64);
        assert_eq!(linux["resources"]["memory"]["limit"], 64 << 20);
        let ns: Vec<&str> = linux["namespaces"]
            .as_array()
            .expect("ns")
            .iter()
            .map(|n| n["type"].as_str().expect("t"))
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(
            config["annotations"]["org.moorline.session"],
            "0123456789ab"
        );
        let tmp_mode = std::fs::metadata(bundle.join("rootfs/tmp"))
            .expect("tmp")
            .permissions()
            .mode();
        assert_eq!(tmp_mode & 0o7777, 0o1777);
        if std::fs::symlink_metadata("/bin").is_ok_and(|m| m.file_type().is_symlink()) {
            assert!(
                std::fs::symlink_metadata(bundle.join("rootfs/bin"))
                    .expect("link")
                    .file_type()
                    .is_symlink()
            );
        }
    }

    #[test]
    fn an_isolated_container_gets_its_network_from_a_hook() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("home")).expect("home");
        let bundle = tmp.path().join("bundle");
        let resolv = tmp.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 10.0.2.3\n").expect("resolv");
        let mut s = spec(tmp.path());
        s.network = NetworkMode::Isolated;
        s.network_hook = Some(NetworkHook::new(
            Path::new("/opt/moorline"),
            Path::new("/run/x"),
        ));
        s.resolv_conf = Some(resolv.clone());
        write_bundle(&bundle, &s).expect("bundle");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("read"))
                .expect("json");
        let hook = &config["hooks"]["createRuntime"][0];
        assert_eq!(hook["path"], "/opt/moorline");
        assert_eq!(
            hook["args"],
            serde_json::json!(["/opt/moorline", "net-hook", "/run/x"])
        );
        assert!(
            config["linux"]["namespaces"]
                .as_array()
                .expect("ns")
                .iter()
                .any(|n| n["type"] == "network")
        );
        let mounts = config["mounts"].as_array().expect("mounts");
        let dns = mounts
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .expect("resolv.conf mounted");
        assert_eq!(dns["source"], resolv.display().to_string());

        // The host's network: no namespace, no hook.
        s.network = NetworkMode::Host;
        s.network_hook = None;
        write_bundle(&bundle, &s).expect("bundle");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("read"))
                .expect("json");
        assert!(config["hooks"]["createRuntime"].is_null());
        assert!(
            !config["linux"]["namespaces"]
                .as_array()
                .expect("ns")
                .iter()
                .any(|n| n["type"] == "network")
        );
    }

    #[test]
    fn container_ids_name_their_session() {
        assert_eq!(
            session_of("moorline-0123456789ab-3-ffee"),
            Some("0123456789ab")
        );
        assert_eq!(session_of("other-0123456789ab"), None);
        assert_eq!(session_of("moorline-xyz"), None);
    }
}
