//! Where rendered lines go: stdout, or one long-lived child process (`--exec`) that is restarted
//! with backoff when it dies. A batch counts as written only once it is flushed.

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
    Stdout(tokio::io::Stdout),
    /// `--exec`: lines go to the child's stdin.
    Exec(Box<ExecChild>),
}

impl Writer {
    /// Writes and flushes `batch`. `Ok` means every line in it is out; an error means none of
    /// its deliveries may be accepted. `--exec` retries with a restarted child until it works
    /// or `shutdown` is cancelled (then `ErrorKind::Interrupted`).
    pub async fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        match self {
            Writer::Stdout(out) => {
                out.write_all(batch).await?;
                out.flush().await
            }
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
            let written = async {
                stdin.write_all(batch).await?;
                stdin.flush().await
            }
            .await;
            match written {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // The child is gone (EPIPE): nothing of this batch is accepted; the whole
                    // batch goes to the next child.
                    let (mut child, stdin, started) = self.running.take().expect("running");
                    drop(stdin);
                    let status =
                        match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                            Ok(Ok(s)) => s.to_string(),
                            _ => {
                                let _ = child.kill().await;
                                "killed (did not exit)".to_string()
                            }
                        };
                    if started.elapsed() >= HEALTHY_CHILD {
                        self.backoff.reset();
                    }
                    tracing::warn!(command = %self.command, %status, error = %e, "exec: child stopped taking input; restarting it");
                    self.wait_before_restart().await?;
                }
            }
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
