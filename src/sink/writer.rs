//! Where rendered lines go: stdout, or one long-lived child process (`--exec`) that is restarted
//! with backoff when it dies. A batch counts as written only once it is flushed, and for
//! `--exec` only once the child has read it out of the pipe: bytes still in the pipe when a
//! child dies are lost with it, so they must not have been accepted.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio_util::sync::CancellationToken;

use crate::supervisor::Backoff;

/// A child that ran this long resets the restart backoff.
const HEALTHY_CHILD: Duration = Duration::from_secs(30);
/// How long a child may take to exit after its stdin is closed at shutdown.
const CHILD_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The output of `iot-sub listen`.
pub enum Writer {
    /// Standard output.
    Stdout(super::stdout::StdoutWriter),
    /// `--exec`: lines go to the child's stdin.
    Exec(Box<ExecChild>),
}

impl Writer {
    /// Writes and flushes `batch`. `Ok` means every line in it is out; an error means none of
    /// its deliveries may be accepted. `--exec` retries with a restarted child until it works
    /// or `shutdown` is cancelled (then `ErrorKind::Interrupted`).
    pub async fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        match self {
            Writer::Stdout(out) => out.write_all(batch).await,
            Writer::Exec(child) => child.write_batch(batch).await,
        }
    }

    /// At the end: closes the child's stdin and waits for it (bounded).
    pub async fn close(&mut self) {
        if let Writer::Exec(child) = self {
            child.close().await;
        }
    }
}

/// Waits until the child has read everything in its stdin pipe (FIONREAD, which Linux answers
/// for the write end too, reaches 0). Fails with `BrokenPipe` if the child exits first: a
/// child that stops reading without exiting holds the link's credit, as a slow one does.
async fn wait_until_read(stdin: &ChildStdin) -> io::Result<()> {
    let mut pause = Duration::from_micros(200);
    loop {
        let unread = rustix::io::ioctl_fionread(stdin).map_err(io::Error::from)?;
        if unread == 0 {
            return Ok(());
        }
        // A closed read end shows as writable-with-error; a zero-length write detects nothing,
        // so look at the pipe's readiness instead.
        if stdin_closed(stdin) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the child exited before reading its input",
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Whether the read end of the child's stdin is gone (POLLERR on the write end).
fn stdin_closed(stdin: &ChildStdin) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stdin, PollFlags::OUT)];
    // Zero timeout: only look, never block the runtime.
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP),
        Err(_) => true,
    }
}

/// `--exec CMD`: `sh -c CMD` with the JSON lines on its stdin; stdout and stderr are inherited.
pub struct ExecChild {
    command: String,
    running: Option<(Child, ChildStdin, Instant)>,
    backoff: Backoff,
    shutdown: CancellationToken,
    spawned: u64,
}

impl ExecChild {
    /// Prepares the command; the first child starts with the first batch.
    pub fn new(command: String, shutdown: CancellationToken) -> Self {
        ExecChild {
            command,
            running: None,
            backoff: Backoff::new(
                Duration::from_millis(500),
                Duration::from_secs(30),
                fastrand::Rng::new(),
            ),
            shutdown,
            spawned: 0,
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the child has no stdin"))?;
        self.spawned += 1;
        tracing::info!(command = %self.command, pid = child.id(), start = self.spawned, "exec: child started");
        self.running = Some((child, stdin, Instant::now()));
        Ok(())
    }

    async fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        // Where the next child starts: the first line a dead child did not read in full.
        let mut from = 0usize;
        loop {
            if self.running.is_none() {
                if let Err(e) = self.spawn() {
                    tracing::error!(command = %self.command, error = %e, "exec: cannot start the command");
                    self.wait_before_restart().await?;
                    continue;
                }
            }
            let Some((_, stdin, _)) = self.running.as_mut() else {
                continue;
            };
            let rest = &batch[from..];
            let mut written = 0usize;
            let result = async {
                while written < rest.len() {
                    written += stdin.write(&rest[written..]).await?;
                }
                stdin.flush().await?;
                wait_until_read(stdin).await
            }
            .await;
            let Err(e) = result else { return Ok(()) };
            // The child is gone. What it read is its own; what is still in the pipe goes to
            // the next child, from the start of the line it is in.
            let (mut child, stdin, started) = self.running.take().expect("running");
            let unread = rustix::io::ioctl_fionread(&stdin).unwrap_or(written as u64) as usize;
            drop(stdin);
            let consumed = from + written.saturating_sub(unread);
            let resume = batch[..consumed]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            // A child that read whole lines before it exited made progress (some commands
            // exit after N lines on purpose); only one that dies without reading backs off.
            if resume > from {
                self.backoff.reset();
            }
            from = resume;
            let status = match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                _ => {
                    let _ = child.kill().await;
                    "killed (did not exit)".to_string()
                }
            };
            if started.elapsed() >= HEALTHY_CHILD {
                self.backoff.reset();
            }
            tracing::warn!(
                command = %self.command,
                %status,
                error = %e,
                resend_bytes = batch.len() - from,
                "exec: child stopped taking input; restarting it"
            );
            if from == batch.len() {
                return Ok(());
            }
            self.wait_before_restart().await?;
        }
    }

    async fn wait_before_restart(&mut self) -> io::Result<()> {
        let delay = self.backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.shutdown.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "stopping while the exec child is down")),
        }
    }

    async fn close(&mut self) {
        if let Some((mut child, stdin, _)) = self.running.take() {
            drop(stdin);
            match tokio::time::timeout(CHILD_EXIT_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) => tracing::info!(%status, "exec: child exited"),
                _ => {
                    tracing::warn!("exec: child did not exit {CHILD_EXIT_TIMEOUT:?} after its input closed; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}
