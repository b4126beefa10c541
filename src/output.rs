//! Where JSON lines go: one writer shared by every connection, flushed before anything is
//! accepted (at-least-once).

use std::io;
use std::pin::Pin;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

/// A destination for batches of JSON lines.
pub struct Output {
    writer: Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
}

impl Output {
    /// Standard output.
    pub fn stdout() -> Self {
        Self::new(tokio::io::stdout())
    }

    /// Any writer (tests, child processes).
    pub fn new(writer: impl AsyncWrite + Send + 'static) -> Self {
        Output {
            writer: Mutex::new(Box::pin(writer)),
        }
    }

    /// Writes `batch` (whole lines) and flushes. Only after `Ok` may its deliveries be accepted;
    /// an error (for example `BrokenPipe` when the reader went away) means none of them may be.
    pub async fn write_batch(&self, batch: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().await;
        writer.write_all(batch).await?;
        writer.flush().await
    }
}
