//! What a session's tmux pane runs (`moorline keeper-pane RUN_DIR`): it starts the keeper
//! detached and shows the agent's stderr to whoever attaches with `tmux attach`.

use std::io;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::layout::RunDir;
use super::protocol;

/// `moorline keeper-pane RUN_DIR`: what a tmux pane shows. Starts the keeper detached, then
/// shows the agent's stderr until the keeper exits. Ctrl-C and Ctrl-Z are ignored here; the
/// agent never sees them.
pub fn pane_main(run_dir: &Path, moorline_exe: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moorline: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(pane(run_dir, moorline_exe)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moorline: {e}");
            // Keep the message readable for a moment if someone is attached.
            std::thread::sleep(Duration::from_secs(2));
            ExitCode::from(1)
        }
    }
}

async fn pane(run_dir: &Path, moorline_exe: &Path) -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut tstp = signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGTSTP as i32,
    ))?;
    let mut quit = signal(SignalKind::quit())?;
    let spec = protocol::load_spec(&RunDir::new(run_dir))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.stderr_file)?;
    let start = log.metadata()?.len();
    let mut keeper = tokio::process::Command::new(moorline_exe)
        .arg("keeper")
        .arg(run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    println!(
        "moorline session {}: the agent's stderr follows.\r\nCtrl-C does not stop the agent; detach with C-b d.\r",
        spec.session_id
    );
    let mut file = tokio::fs::File::open(&spec.stderr_file).await?;
    {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let mut out = tokio::io::stdout();
    let mut buf = vec![0u8; 16 * 1024];
    let mut done = false;
    loop {
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // The pane is a terminal: turn bare newlines into CRLF.
            let text = String::from_utf8_lossy(&buf[..n]).replace('\n', "\r\n");
            out.write_all(text.as_bytes()).await?;
            out.flush().await?;
        }
        if done {
            return Ok(());
        }
        tokio::select! {
            _ = keeper.wait() => done = true,
            // A growing file has nothing to wait on: look again shortly, as `tail -f` does.
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = int.recv() => { out.write_all(b"\r\n(Ctrl-C ignored: the agent keeps running; detach with C-b d)\r\n").await?; }
            _ = tstp.recv() => {}
            _ = quit.recv() => {}
        }
    }
}
