//! Standard output without a thread hop per write. tokio's `Stdout` hands every write and
//! every flush to its blocking pool (two thread switches and a copy per batch); here a file or
//! `/dev/null` is written directly, and a pipe or socket with non-blocking writes
//! (`pwritev2(RWF_NOWAIT)`, which leaves the descriptor's flags, shared with other processes,
//! untouched). When the pipe is full the write is retried after a short, growing pause: the
//! reader is then the bottleneck, and registering fd 1 with the reactor would need `unsafe`.
//! A terminal, or a kernel without `RWF_NOWAIT` on pipes, keeps tokio's blocking path.

use std::fs::File;
use std::io::{self, IoSlice, IsTerminal, Write};
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use rustix::io::{Errno, ReadWriteFlags};
use tokio::io::AsyncWriteExt;

/// pwritev2's "use and update the current file offset" (a pipe or socket has none).
const CURRENT_OFFSET: u64 = u64::MAX;

/// The process's standard output, written in whole batches.
pub enum StdoutWriter {
    /// A regular file or a device that is not a terminal (`/dev/null`): writes do not wait
    /// for a reader.
    Direct(File),
    /// A pipe or socket: non-blocking writes; a pause when it is full.
    NoWait(File),
    /// A terminal, or where the above is not possible.
    Blocking(tokio::io::Stdout),
}

impl StdoutWriter {
    /// Chooses how to write by what fd 1 is. Must run inside the tokio runtime.
    pub fn open() -> StdoutWriter {
        let stdout = io::stdout();
        if stdout.is_terminal() {
            return StdoutWriter::Blocking(tokio::io::stdout());
        }
        let Ok(fd) = rustix::io::dup(&stdout) else {
            return StdoutWriter::Blocking(tokio::io::stdout());
        };
        let file = File::from(fd);
        let kind = match file.metadata() {
            Ok(meta) => meta.file_type(),
            Err(_) => return StdoutWriter::Blocking(tokio::io::stdout()),
        };
        if kind.is_file() || kind.is_char_device() || kind.is_block_device() {
            return StdoutWriter::Direct(file);
        }
        if kind.is_fifo() || kind.is_socket() {
            return StdoutWriter::NoWait(file);
        }
        StdoutWriter::Blocking(tokio::io::stdout())
    }

    /// Which way was chosen (for the log).
    pub fn mode(&self) -> &'static str {
        match self {
            StdoutWriter::Direct(_) => "direct",
            StdoutWriter::NoWait(_) => "non-blocking",
            StdoutWriter::Blocking(_) => "blocking thread",
        }
    }

    /// Writes all of `batch`. `Ok` means it is all with the kernel.
    pub async fn write_all(&mut self, batch: &[u8]) -> io::Result<()> {
        match self {
            StdoutWriter::Direct(file) => file.write_all(batch),
            StdoutWriter::NoWait(fd) => match write_nowait(fd, batch).await {
                Ok(result) => result,
                Err(Unsupported(written)) => {
                    tracing::debug!("RWF_NOWAIT not supported on stdout; using a blocking thread");
                    let mut out = tokio::io::stdout();
                    let result = write_blocking(&mut out, &batch[written..]).await;
                    *self = StdoutWriter::Blocking(out);
                    result
                }
            },
            StdoutWriter::Blocking(out) => write_blocking(out, batch).await,
        }
    }
}

/// tokio's path: the write and the flush each go to its blocking pool.
async fn write_blocking(out: &mut tokio::io::Stdout, bytes: &[u8]) -> io::Result<()> {
    out.write_all(bytes).await?;
    out.flush().await
}

/// The kernel refused `RWF_NOWAIT` after this many bytes were written.
struct Unsupported(usize);

/// The first pause when the pipe is full (tokio's timer rounds it up to 1 ms), and the longest.
const FULL_PAUSE: (Duration, Duration) = (Duration::from_micros(500), Duration::from_millis(10));

async fn write_nowait(fd: &File, batch: &[u8]) -> Result<io::Result<()>, Unsupported> {
    let mut written = 0usize;
    let mut pause = FULL_PAUSE.0;
    while written < batch.len() {
        let rest = [IoSlice::new(&batch[written..])];
        match rustix::io::pwritev2(fd, &rest, CURRENT_OFFSET, ReadWriteFlags::NOWAIT) {
            Ok(n) => {
                written += n;
                pause = FULL_PAUSE.0;
            }
            Err(Errno::AGAIN) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FULL_PAUSE.1);
            }
            Err(Errno::INTR) => {}
            Err(Errno::OPNOTSUPP | Errno::INVAL) => return Err(Unsupported(written)),
            Err(e) => return Ok(Err(e.into())),
        }
    }
    Ok(Ok(()))
}
