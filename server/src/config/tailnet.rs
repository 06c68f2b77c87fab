//! This machine's tailnet names, from `tailscale status`, so `Host: NAME.TAILNET.ts.net` is
//! accepted without listing it in `allowed_hosts`.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

/// How long `tailscale status` may take at startup.
pub(super) const TIMEOUT: Duration = Duration::from_secs(3);

/// What is read of `tailscale status --json`.
#[derive(Debug, Deserialize)]
struct Status {
    #[serde(rename = "Self")]
    this: Option<Node>,
}

#[derive(Debug, Deserialize)]
struct Node {
    #[serde(rename = "DNSName", default)]
    dns_name: String,
}

/// Asks the local tailscaled, through `program` (`tailscale`), for this machine's DNS name
/// and its first label. Nothing if tailscale is missing, fails or says nothing; gives up after
/// `timeout` and kills it: a stuck tailscaled must not keep the server from serving.
pub(super) async fn names(program: &OsStr, timeout: Duration) -> Vec<String> {
    let child = tokio::process::Command::new(program)
        .args(["status", "--json", "--peers=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(child) = child else {
        return Vec::new();
    };
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(_)) => return Vec::new(),
        Err(_) => {
            // The child is killed as the dropped future drops it.
            tracing::warn!("`tailscale status` did not answer; not adding tailnet names");
            return Vec::new();
        }
    };
    let Ok(Status { this: Some(node) }) = serde_json::from_slice(&output.stdout) else {
        return Vec::new();
    };
    let dns = node.dns_name.trim_end_matches('.');
    match dns.split('.').next() {
        Some(short) if !dns.is_empty() => vec![dns.to_owned(), short.to_owned()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A `tailscale` that runs `body` (a shell script) whatever it is asked.
    fn fake(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("tailscale");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[tokio::test]
    async fn names_come_from_the_dns_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = fake(
            dir.path(),
            r#"echo '{"Self":{"DNSName":"box.tail1234.ts.net."}}'"#,
        );
        assert_eq!(
            names(ok.as_os_str(), TIMEOUT).await,
            ["box.tail1234.ts.net", "box"]
        );
        let logged_out = fake(dir.path(), r#"echo '{"Self":{"DNSName":""}}'"#);
        assert!(names(logged_out.as_os_str(), TIMEOUT).await.is_empty());
        assert!(
            names(OsStr::new("/nonexistent/tailscale"), TIMEOUT)
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_stuck_tailscale_is_given_up_on_and_killed() {
        let dir = tempfile::tempdir().expect("tmp");
        let pid_file = dir.path().join("pid");
        let stuck = fake(
            dir.path(),
            &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
        );
        let started = std::time::Instant::now();
        assert!(
            names(stuck.as_os_str(), Duration::from_millis(300))
                .await
                .is_empty()
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        // Killed (and reaped by tokio): the process goes away.
        let gone = || {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !gone() {
            assert!(
                std::time::Instant::now() < deadline,
                "tailscale {pid} still runs"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
