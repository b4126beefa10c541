//! The stream tap under fe2o3's acceptor: copies the client's first bytes (to decode its Open),
//! tracks when the client last sent anything (idle watchdog), counts the client's Disposition
//! frames, and can abort the socket.
//!
//! fe2o3's acceptor does not expose the remote Open nor let us drop the socket, so both go
//! through this wrapper around the TLS stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fe2o3_amqp::frames::amqp::{FrameBody, FrameDecoder};
use fe2o3_amqp::types::performatives::Open;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::codec::Decoder;

/// Bytes of plaintext kept for the Open decode: SASL header and frames, AMQP header, Open.
pub(crate) const CAPTURE_LIMIT: usize = 16 * 1024;

const ALIVE: u8 = 0;
const ABORT: u8 = 1;
const RESET: u8 = 2;

/// State shared between the tap (inside fe2o3's engine) and the connection task.
pub(crate) struct TapState {
    base: Instant,
    last_read_ms: AtomicU64,
    capture: Mutex<Vec<u8>>,
    capturing: AtomicBool,
    // The client's Open, decoded as soon as its last byte is read: before fe2o3 even sees
    // it, so the idle-time-out is recorded before the emulator's Open goes out.
    open: Mutex<Option<Open>>,
    last_open_idle: Arc<Mutex<Option<u32>>>,
    kill: AtomicU8,
    linger_set: AtomicBool,
    read_waker: AtomicWaker,
    write_waker: AtomicWaker,
    frames: Mutex<FrameCounter>,
    dispositions: Arc<AtomicU64>,
}

impl TapState {
    fn new(last_open_idle: Arc<Mutex<Option<u32>>>, dispositions: Arc<AtomicU64>) -> Self {
        TapState {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            capture: Mutex::new(Vec::with_capacity(1024)),
            capturing: AtomicBool::new(true),
            open: Mutex::new(None),
            last_open_idle,
            frames: Mutex::new(FrameCounter::default()),
            dispositions,
            kill: AtomicU8::new(ALIVE),
            linger_set: AtomicBool::new(false),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
        }
    }

    /// How long since the client last sent a byte (or since the tap was made).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Stops capturing; returns the client's Open, or why it could not be read.
    pub fn take_open(&self) -> Result<Open, OpenDecodeError> {
        self.capturing.store(false, Ordering::Relaxed);
        if let Some(open) = self.open.lock().ok().and_then(|mut o| o.take()) {
            return Ok(open);
        }
        let capture = self
            .capture
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        decode_client_open(&capture)
    }

    /// Makes every further read and write fail, so fe2o3's engine stops without a Close.
    /// With `reset`, the socket is also closed with RST (SO_LINGER 0) when it is dropped.
    pub fn kill(&self, reset: bool) {
        let code = if reset { RESET } else { ABORT };
        // RESET wins over ABORT; never go back to ALIVE.
        self.kill.fetch_max(code, Ordering::SeqCst);
        self.read_waker.wake();
        self.write_waker.wake();
    }

    fn note_read(&self, bytes: &[u8]) {
        let now = self.base.elapsed().as_millis() as u64;
        self.last_read_ms.store(now, Ordering::Relaxed);
        if let Ok(mut frames) = self.frames.lock() {
            let n = frames.feed(bytes);
            if n > 0 {
                self.dispositions.fetch_add(n, Ordering::Relaxed);
            }
        }
        if !self.capturing.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut c) = self.capture.lock() else {
            return;
        };
        let room = CAPTURE_LIMIT.saturating_sub(c.len());
        c.extend_from_slice(&bytes[..bytes.len().min(room)]);
        match decode_client_open(&c) {
            Ok(open) => {
                if let Ok(mut last) = self.last_open_idle.lock() {
                    *last = open.idle_time_out;
                }
                if let Ok(mut slot) = self.open.lock() {
                    *slot = Some(open);
                }
                c.clear();
                self.capturing.store(false, Ordering::Relaxed);
            }
            // Keep the bytes: `take_open` reports the error from them.
            Err(OpenDecodeError::Incomplete) if c.len() < CAPTURE_LIMIT => {}
            Err(_) => self.capturing.store(false, Ordering::Relaxed),
        }
    }
}

/// Splits the client's plaintext into protocol headers and frames as it arrives, and counts
/// Disposition frames (descriptor 0x15): how many deliveries one settles is the client's choice,
/// and tests hold iot-sub to settling many per frame.
#[derive(Default)]
struct FrameCounter {
    /// Bytes of the current frame still to skip.
    skip: usize,
    /// The start of the next header or frame: enough to read its size and descriptor.
    head: Vec<u8>,
}

/// A protocol header: `AMQP` and four bytes (no frame size starts with `AMQP`: 1 GiB).
const HEADER_LEN: usize = 8;
const DISPOSITION: u8 = 0x15;

impl FrameCounter {
    /// Takes the next bytes; returns how many Disposition frames they completed the start of.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut found = 0;
        loop {
            if self.skip > 0 {
                if bytes.is_empty() {
                    break;
                }
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            // Enough of the start to classify: the 8-byte frame header, then the descriptor
            // (0x00, then 0x53 and a one-byte code, or 0x80 and an eight-byte code).
            let want = match self.head.get(..HEADER_LEN) {
                None => HEADER_LEN,
                Some(h) if h.starts_with(b"AMQP") => HEADER_LEN,
                Some(h) => {
                    let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                    let body = usize::from(h[4]) * 4;
                    match self.head.get(body + 1) {
                        Some(0x80) => (body + 10).min(size),
                        _ => (body + 3).min(size),
                    }
                }
            };
            if self.head.len() < want {
                if bytes.is_empty() {
                    break;
                }
                let n = (want - self.head.len()).min(bytes.len());
                self.head.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                continue;
            }
            if self.head.starts_with(b"AMQP") {
                self.head.clear();
                continue;
            }
            let h = &self.head;
            let size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let body = usize::from(h[4]) * 4;
            let code = match (h.get(body), h.get(body + 1)) {
                (Some(0x00), Some(0x53)) => h.get(body + 2).copied(),
                (Some(0x00), Some(0x80)) => h.get(body + 9).copied(),
                _ => None,
            };
            // Only a frame long enough for its header can be a performative (8 is a heartbeat).
            if h[5] == 0 && size > body && code == Some(DISPOSITION) {
                found += 1;
            }
            self.skip = size.saturating_sub(self.head.len());
            self.head.clear();
        }
        found
    }
}

/// The TLS stream with the tap around it. This is the `Io` fe2o3's acceptor owns.
pub(crate) struct Tap {
    inner: TlsStream<TcpStream>,
    state: Arc<TapState>,
}

impl Tap {
    /// Wraps the stream; the client's Open idle-time-out is written to `last_open_idle`, and
    /// each Disposition frame it sends counts in `dispositions`.
    pub fn new(
        inner: TlsStream<TcpStream>,
        last_open_idle: Arc<Mutex<Option<u32>>>,
        dispositions: Arc<AtomicU64>,
    ) -> (Self, Arc<TapState>) {
        let state = Arc::new(TapState::new(last_open_idle, dispositions));
        (
            Tap {
                inner,
                state: state.clone(),
            },
            state,
        )
    }

    fn killed(&self) -> Option<io::Error> {
        match self.state.kill.load(Ordering::SeqCst) {
            ALIVE => None,
            RESET => {
                if !self.state.linger_set.swap(true, Ordering::SeqCst) {
                    // Linger 0 turns the close that follows the engine's exit into a RST.
                    let tcp = self.inner.get_ref().0;
                    if let Err(e) = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO)) {
                        tracing::debug!(error = %e, "could not set SO_LINGER 0");
                    }
                }
                Some(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "emulator reset the connection",
                ))
            }
            _ => Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "emulator aborted the connection",
            )),
        }
    }
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap").finish_non_exhaustive()
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        this.state.read_waker.register(cx.waker());
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            let filled = &buf.filled()[before..];
            if !filled.is_empty() {
                this.state.note_read(filled);
            }
        }
        res
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        this.state.write_waker.register(cx.waker());
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        this.state.write_waker.register(cx.waker());
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        this.state.write_waker.register(cx.waker());
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Why the client's Open could not be read from the capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenDecodeError {
    /// The capture ends before the Open frame does (an Open larger than the capture).
    Incomplete,
    /// The first AMQP frame after the AMQP header is not an Open.
    NotOpen(String),
    /// The bytes are not valid AMQP framing.
    Malformed(String),
}

impl fmt::Display for OpenDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenDecodeError::Incomplete => {
                write!(f, "Open not found in the first {CAPTURE_LIMIT} bytes")
            }
            OpenDecodeError::NotOpen(what) => write!(f, "first AMQP frame is {what}, not Open"),
            OpenDecodeError::Malformed(why) => write!(f, "malformed AMQP bytes: {why}"),
        }
    }
}

/// Walks the client's plaintext: protocol headers (8 bytes each, `AMQP` + id), SASL frames,
/// then decodes the first AMQP frame after the AMQP header with fe2o3's public decoder.
pub(crate) fn decode_client_open(buf: &[u8]) -> Result<Open, OpenDecodeError> {
    let mut p = 0usize;
    let mut amqp_header_seen = false;
    while p < buf.len() {
        let rest = &buf[p..];
        if rest.starts_with(b"AMQP") || (rest.len() < 4 && b"AMQP".starts_with(rest)) {
            if rest.len() < 8 {
                return Err(OpenDecodeError::Incomplete);
            }
            // Protocol id 0 is plain AMQP; 3 is SASL.
            if rest[4] == 0 {
                amqp_header_seen = true;
            }
            p += 8;
            continue;
        }
        if rest.len() < 8 {
            return Err(OpenDecodeError::Incomplete);
        }
        let size = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if size < 8 {
            return Err(OpenDecodeError::Malformed(format!("frame size {size} < 8")));
        }
        if rest.len() < size {
            return Err(OpenDecodeError::Incomplete);
        }
        let frame_type = rest[5];
        if amqp_header_seen && frame_type == 0 {
            let mut body = BytesMut::from(&rest[4..size]);
            let frame = FrameDecoder {}
                .decode(&mut body)
                .map_err(|e| OpenDecodeError::Malformed(e.to_string()))?
                .ok_or(OpenDecodeError::Incomplete)?;
            return match frame.body {
                FrameBody::Open(open) => Ok(open),
                other => Err(OpenDecodeError::NotOpen(frame_body_name(&other).into())),
            };
        }
        p += size;
    }
    Err(OpenDecodeError::Incomplete)
}

fn frame_body_name(body: &FrameBody) -> &'static str {
    match body {
        FrameBody::Attach(_) => "Attach",
        FrameBody::Flow(_) => "Flow",
        FrameBody::Transfer { .. } => "Transfer",
        FrameBody::Disposition(_) => "Disposition",
        FrameBody::Detach(_) => "Detach",
        FrameBody::Begin(_) => "Begin",
        FrameBody::End(_) => "End",
        FrameBody::Open(_) => "Open",
        FrameBody::Close(_) => "Close",
        FrameBody::Empty => "an empty frame",
    }
}

#[cfg(test)]
mod tests {
    use super::FrameCounter;

    /// SASL header, a SASL frame, AMQP header, a heartbeat, a Disposition (small descriptor),
    /// a Transfer, a Disposition (ulong descriptor, doff 3): two Dispositions.
    fn stream() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"AMQP\x03\x01\x00\x00");
        b.extend_from_slice(&[0, 0, 0, 12, 2, 1, 0, 0, 0x00, 0x53, 0x41, 0x45]);
        b.extend_from_slice(b"AMQP\x00\x01\x00\x00");
        b.extend_from_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
        b.extend_from_slice(&[0, 0, 0, 14, 2, 0, 0, 0, 0x00, 0x53, 0x15, 0xc0, 1, 0]);
        b.extend_from_slice(&[
            0, 0, 0, 16, 2, 0, 0, 0, 0x00, 0x53, 0x14, 0xc0, 3, 1, 0x43, 0,
        ]);
        let mut d = vec![0, 0, 0, 24, 3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        d.extend_from_slice(&[0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x15, 0x45, 0, 0]);
        d.truncate(24);
        b.extend_from_slice(&d);
        b
    }

    #[test]
    fn counts_dispositions_however_the_bytes_are_split() {
        let bytes = stream();
        for chunk in [bytes.len(), 1, 2, 3, 5, 7, 11] {
            let mut counter = FrameCounter::default();
            let found: u64 = bytes.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(found, 2, "chunks of {chunk}");
            assert_eq!(counter.skip, 0);
            assert!(counter.head.is_empty());
        }
    }
}
