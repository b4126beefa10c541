//! The benchmark's own AMQP 1.0 peer and timing tools (see `bench/README.md`): a pre-encoded
//! TLS source that pushes messages as fast as credit allows, a minimal receiver that measures
//! that source's ceiling, and the two stdout timers the harness puts behind a receiver.
//!
//! Subcommands:
//! - `serve`: the source. TLS straight away (rustls on ring, a throw-away rcgen CA written to
//!   `--ca-out`), SASL PLAIN (checks Aliyun's signed password with `--secret`), then one session
//!   and one sender link per connection. Each distinct message is encoded once as a whole
//!   transfer frame; per delivery only the delivery-id, tag, `messageId` digits and
//!   `generateTime` are patched. Deliveries are unsettled, so every one must be accepted.
//!   `--count N` is spread over `--connections K` (connection i gets N/K, the first N%K one
//!   more); each round prints one JSON line. `--rate R` paces each connection at R msgs/s.
//! - `sink`: the minimal receiver: big credit, one disposition per batch, no decoding beyond
//!   the transfer's delivery-id. Its rate is the source's ceiling.
//! - `first-byte`: runs a command several times; time from spawn to its first stdout byte.
//! - `delays`: reads JSON lines on stdin; `generateTime` vs arrival time, as percentiles.
//!
//! Incoming frames are decoded with fe2o3's public decoders (`frames::amqp::FrameDecoder`,
//! `frames::sasl::FrameCodec`); the few outgoing performatives are encoded by hand (fe2o3's
//! AMQP frame encoder is crate-private), with fixed-width fields so templates can be patched.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use clap::{Args, Parser, Subcommand};
use fe2o3_amqp::frames::amqp::{Frame, FrameBody, FrameDecoder};
use fe2o3_amqp::frames::sasl;
use fe2o3_amqp::types::definitions::Role;
use fe2o3_amqp::types::messaging::DeliveryState;
use fe2o3_amqp::types::performatives::{Attach, Flow};
use fe2o3_amqp::types::primitives::{Array, Binary, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use iot_sub::cloud::alibaba::{parse_username, string_to_sign, SignMethod};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::codec::{Decoder, Encoder};

const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
const EMPTY_FRAME: [u8; 8] = [0, 0, 0, 8, 2, 0, 0, 0];
/// Largest frame we advertise; clients only send small control frames.
const OUR_MAX_FRAME: u32 = 64 * 1024;
/// Handshake steps (TLS through attach) must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Plaintext bytes built per write: large writes keep syscalls and TLS records few.
const WRITE_CHUNK: usize = 256 * 1024;
/// Our link handle and channel (one session, one link per connection).
const HANDLE: u32 = 0;

#[derive(Parser)]
#[command(about = "AMQP 1.0 benchmark source, minimal receiver and timers for iot-sub")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// The pre-encoded TLS source.
    Serve(ServeArgs),
    /// The minimal receiver that measures the source's ceiling.
    Sink(SinkArgs),
    /// Run a command RUNS times; print the time from spawn to its first stdout byte.
    FirstByte(FirstByteArgs),
    /// Read JSON lines on stdin; print generateTime-to-arrival percentiles at EOF.
    Delays(DelaysArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5671")]
    listen: SocketAddr,
    /// Where to write the CA certificate (PEM); written once the port is bound.
    #[arg(long, default_value = "bench-ca.pem")]
    ca_out: PathBuf,
    /// Messages per round, spread over the round's connections.
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Bytes of each message's JSON body (at least 16).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    body_size: u32,
    /// Connections per round; `--count` is spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,
    /// Messages per second per connection (0: as fast as credit allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Rounds to serve before exiting (0: forever). Each round prints one JSON line.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Check the Aliyun-signed SASL password against this AccessKey secret (else accept any).
    #[arg(long)]
    secret: Option<String>,
    /// Runtime worker threads (1: everything on one thread).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// After a connection's messages are all settled, wait this long for the client to close.
    #[arg(long, default_value = "5000")]
    grace_ms: u64,
}

#[derive(Args)]
struct SinkArgs {
    /// host:port of the source; the host is also the TLS name.
    #[arg(long, default_value = "localhost:5671")]
    connect: String,
    /// CA certificate (PEM) to trust.
    #[arg(long)]
    ca: PathBuf,
    /// Messages to receive before closing.
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Link credit kept open.
    #[arg(long, default_value_t = 10_000)]
    credit: u32,
    /// Deliveries per disposition (and credit refill).
    #[arg(long, default_value_t = 2_000)]
    batch: u32,
    /// Also send a disposition when one has waited this long (ms; 0: only by `--batch`).
    #[arg(long, default_value_t = 0)]
    ack_ms: u64,
    /// Connections, each its own task on one thread; `--count` is spread over them.
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// Also decode each single-frame delivery with fe2o3's frame and message decoders and write
    /// iot-sub's JSON line for it to stdout (one write per read): what a receive path that
    /// handled connection, session and link in one task would do per message.
    #[arg(long)]
    render: bool,
    /// AccessKey id for the signed username.
    #[arg(long, default_value = "bench-id")]
    access_key_id: String,
    /// AccessKey secret for the signed password.
    #[arg(long, default_value = "bench-secret")]
    secret: String,
}

#[derive(Args)]
struct FirstByteArgs {
    /// How many times to run the command.
    #[arg(long, default_value_t = 7)]
    runs: u32,
    /// Pause between runs.
    #[arg(long, default_value_t = 300)]
    pause_ms: u64,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

#[derive(Args)]
struct DelaysArgs {
    /// Write the JSON summary here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Mode::Serve(a) => {
            let mut rt = if a.threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(a.threads as usize);
                b
            };
            rt.enable_all().build()?.block_on(serve(a))
        }
        Mode::Sink(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(sink(a)),
        Mode::FirstByte(a) => first_byte(a),
        Mode::Delays(a) => delays(a),
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-rolled AMQP encoding of the few values and performatives we send.
// ---------------------------------------------------------------------------------------------

/// Encodes values into a buffer; fixed-width forms are used where a later patch needs them.
mod enc {
    pub fn null(b: &mut Vec<u8>) {
        b.push(0x40);
    }
    pub fn boolean(b: &mut Vec<u8>, v: bool) {
        b.push(if v { 0x41 } else { 0x42 });
    }
    pub fn ubyte(b: &mut Vec<u8>, v: u8) {
        b.extend_from_slice(&[0x50, v]);
    }
    pub fn ushort(b: &mut Vec<u8>, v: u16) {
        b.push(0x60);
        b.extend_from_slice(&v.to_be_bytes());
    }
    /// Always the 4-byte form, so it can be patched in place.
    pub fn uint(b: &mut Vec<u8>, v: u32) {
        b.push(0x70);
        b.extend_from_slice(&v.to_be_bytes());
    }
    pub fn long(b: &mut Vec<u8>, v: i64) {
        b.push(0x81);
        b.extend_from_slice(&v.to_be_bytes());
    }
    fn variable(b: &mut Vec<u8>, short: u8, long: u8, v: &[u8]) {
        match u8::try_from(v.len()) {
            Ok(n) => b.extend_from_slice(&[short, n]),
            Err(_) => {
                b.push(long);
                b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            }
        }
        b.extend_from_slice(v);
    }
    pub fn string(b: &mut Vec<u8>, v: &str) {
        variable(b, 0xa1, 0xb1, v.as_bytes());
    }
    pub fn binary(b: &mut Vec<u8>, v: &[u8]) {
        variable(b, 0xa0, 0xb0, v);
    }
    pub fn opt_string(b: &mut Vec<u8>, v: Option<&str>) {
        match v {
            Some(s) => string(b, s),
            None => null(b),
        }
    }

    /// A described list (a performative or a composite type): `fields` are already encoded.
    pub fn described(b: &mut Vec<u8>, code: u8, fields: &[Vec<u8>]) {
        b.extend_from_slice(&[0x00, 0x53, code]);
        if fields.is_empty() {
            b.push(0x45);
            return;
        }
        let len: usize = fields.iter().map(Vec::len).sum();
        b.push(0xd0);
        b.extend_from_slice(&(len as u32 + 4).to_be_bytes());
        b.extend_from_slice(&(fields.len() as u32).to_be_bytes());
        for f in fields {
            b.extend_from_slice(f);
        }
    }

    /// One field, built by `f`.
    pub fn field(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    /// An AMQP frame (type 0) on `channel` around an already encoded body.
    pub fn frame(out: &mut Vec<u8>, channel: u16, body: &[u8]) {
        out.extend_from_slice(&(body.len() as u32 + 8).to_be_bytes());
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(body);
    }
}

use enc::field;

fn performative(out: &mut Vec<u8>, channel: u16, code: u8, fields: &[Vec<u8>]) {
    let mut body = Vec::new();
    enc::described(&mut body, code, fields);
    enc::frame(out, channel, &body);
}

fn sasl_frame(frame: sasl::Frame) -> Result<Vec<u8>> {
    let mut body = BytesMut::new();
    sasl::FrameCodec {}
        .encode(frame, &mut body)
        .map_err(|e| anyhow!("encoding a SASL frame: {e:?}"))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Source (0x28) or target (0x29) terminus with just an address.
fn terminus(code: u8, address: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    enc::described(&mut b, code, &[field(|f| enc::opt_string(f, address))]);
    b
}

fn close_frame(out: &mut Vec<u8>) {
    performative(out, 0, 0x18, &[]);
}

// ---------------------------------------------------------------------------------------------
// Pre-encoded messages.
// ---------------------------------------------------------------------------------------------

/// One distinct message, encoded once as a complete single-frame transfer (channel 0,
/// handle 0, unsettled), with the offsets of what changes per delivery.
struct Template {
    frame: Vec<u8>,
    id_at: usize,
    tag_at: usize,
    more_at: usize,
    payload_at: usize,
    message_id_at: usize,
    time_at: usize,
}

/// Width of the decimal `messageId` (like Aliyun's 19-digit ids).
const MESSAGE_ID_DIGITS: usize = 19;

impl Template {
    fn new(topic: &str, body: &[u8]) -> Template {
        let mut f = vec![0, 0, 0, 0, 2, 0, 0, 0];
        // transfer: list8 of handle, delivery-id, delivery-tag, message-format, settled, more.
        f.extend_from_slice(&[0x00, 0x53, 0x14, 0xc0, 20, 6]);
        enc::uint(&mut f, HANDLE);
        let id_at = f.len() + 1;
        enc::uint(&mut f, 0);
        let tag_at = f.len() + 2;
        enc::binary(&mut f, &[0; 4]);
        f.push(0x43); // message-format 0
        enc::boolean(&mut f, false); // settled: the client must accept
        let more_at = f.len();
        enc::boolean(&mut f, false);
        debug_assert_eq!(f.len() - 13, 20);
        let payload_at = f.len();

        // application-properties: topic, messageId, generateTime (map32, patched below).
        f.extend_from_slice(&[0x00, 0x53, 0x74, 0xd1]);
        let map_size_at = f.len();
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&6u32.to_be_bytes());
        enc::string(&mut f, "topic");
        enc::string(&mut f, topic);
        enc::string(&mut f, "messageId");
        let message_id_at = f.len() + 2;
        enc::string(&mut f, &"0".repeat(MESSAGE_ID_DIGITS));
        enc::string(&mut f, "generateTime");
        let time_at = f.len() + 1;
        enc::long(&mut f, 0);
        let map_size = (f.len() - map_size_at - 4) as u32;
        f[map_size_at..map_size_at + 4].copy_from_slice(&map_size.to_be_bytes());

        // One data section.
        f.extend_from_slice(&[0x00, 0x53, 0x75]);
        enc::binary(&mut f, body);

        let size = f.len() as u32;
        f[..4].copy_from_slice(&size.to_be_bytes());
        Template {
            frame: f,
            id_at,
            tag_at,
            more_at,
            payload_at,
            message_id_at,
            time_at,
        }
    }

    /// Transfer frames per delivery under the client's max-frame-size.
    fn frames_per_message(&self, max_frame: usize) -> usize {
        if self.frame.len() <= max_frame {
            return 1;
        }
        let room = max_frame - self.payload_at;
        (self.frame.len() - self.payload_at).div_ceil(room)
    }

    /// Appends the delivery's frame(s) to `out`, patched for this delivery.
    fn emit(&self, out: &mut Vec<u8>, delivery_id: u32, message_id: u64, now_ms: i64, max: usize) {
        let start = out.len();
        out.extend_from_slice(&self.frame);
        let f = &mut out[start..];
        f[self.id_at..self.id_at + 4].copy_from_slice(&delivery_id.to_be_bytes());
        f[self.tag_at..self.tag_at + 4].copy_from_slice(&delivery_id.to_be_bytes());
        write_digits(
            &mut f[self.message_id_at..self.message_id_at + MESSAGE_ID_DIGITS],
            message_id,
        );
        f[self.time_at..self.time_at + 8].copy_from_slice(&now_ms.to_be_bytes());
        if self.frame.len() > max {
            self.split(out, start, max);
        }
    }

    /// Rare path (a client max-frame-size below the message): re-cuts the delivery just
    /// appended at `start` into several transfer frames, `more` set on all but the last.
    fn split(&self, out: &mut Vec<u8>, start: usize, max: usize) {
        let whole = out.split_off(start);
        let perf = &whole[4..self.payload_at];
        let payload = &whole[self.payload_at..];
        let room = max - self.payload_at;
        let chunks = payload.len().div_ceil(room);
        for (i, chunk) in payload.chunks(room).enumerate() {
            let size = (4 + perf.len() + chunk.len()) as u32;
            out.extend_from_slice(&size.to_be_bytes());
            let perf_at = out.len();
            out.extend_from_slice(perf);
            if i + 1 < chunks {
                out[perf_at + self.more_at - 4] = 0x41;
            }
            out.extend_from_slice(chunk);
        }
    }
}

/// Writes `v` as exactly `dst.len()` decimal digits (zero-padded).
fn write_digits(dst: &mut [u8], mut v: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// A property-post style JSON document of exactly `size` bytes.
fn json_body(device: &str, size: usize) -> Vec<u8> {
    let doc = format!(
        concat!(
            r#"{{"iotId":"Bx7kQ2mP9sWdLf0aZr3N","productKey":"a1BenchProd","deviceName":"{}","#,
            r#""gmtCreate":1795322625156,"items":{{"Temperature":{{"time":1795322624997,"#,
            r#""value":23.5}},"Humidity":{{"time":1795322624997,"value":41.0}}}},"pad":""#
        ),
        device
    );
    let doc = if doc.len() + 2 <= size {
        doc
    } else {
        String::from(r#"{"pad":""#)
    };
    let pad = size.saturating_sub(doc.len() + 2);
    let mut s = doc.into_bytes();
    s.extend(std::iter::repeat_n(b'x', pad));
    s.extend_from_slice(b"\"}");
    s
}

/// The distinct messages: eight devices, same topic shape and size (so every delivery takes
/// the same number of frames).
fn templates(body_size: usize) -> Vec<Template> {
    (1..=8)
        .map(|i| {
            let device = format!("dev-{i:04}");
            let topic = format!("/a1BenchProd/{device}/thing/event/property/post");
            Template::new(&topic, &json_body(&device, body_size))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Small shared helpers.
// ---------------------------------------------------------------------------------------------

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn epoch_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Process CPU seconds (user + sys): the sum of every thread's run time in
/// /proc/self/task/*/schedstat (nanoseconds; /proc/self/stat only counts 10 ms ticks).
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Peak resident set (VmHWM) in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Nanoseconds since the process's first call: a monotonic clock shared by all connections.
fn mono_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Reads until `buf` holds at least `n` bytes.
async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut, n: usize) -> Result<()> {
    while buf.len() < n {
        buf.reserve(64 * 1024);
        if s.read_buf(buf).await? == 0 {
            bail!("peer closed the connection");
        }
    }
    Ok(())
}

/// The next protocol header (8 bytes).
async fn read_header<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<[u8; 8]> {
    fill(s, buf, 8).await?;
    let mut h = [0u8; 8];
    buf.copy_to_slice(&mut h);
    Ok(h)
}

/// The next whole frame, without its 4-byte size (starts at doff).
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<BytesMut> {
    fill(s, buf, 4).await?;
    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if size < 8 {
        bail!("frame size {size} < 8");
    }
    fill(s, buf, size).await?;
    let mut f = buf.split_to(size);
    f.advance(4);
    Ok(f)
}

fn decode_amqp(mut f: BytesMut) -> Result<Frame> {
    FrameDecoder {}
        .decode(&mut f)
        .map_err(|e| anyhow!("undecodable AMQP frame: {e:?}"))?
        .ok_or_else(|| anyhow!("empty AMQP frame"))
}

fn decode_sasl(mut f: BytesMut) -> Result<sasl::Frame> {
    sasl::FrameCodec {}
        .decode(&mut f)
        .map_err(|e| anyhow!("undecodable SASL frame: {e:?}"))?
        .ok_or_else(|| anyhow!("empty SASL frame"))
}

/// Aliyun's signed login for `access_key_id` at `timestamp` (hmacsha1, like the samples).
fn aliyun_login(client_id: &str, access_key_id: &str, secret: &str) -> (String, String) {
    let ts = epoch_ms() as u64;
    let username = format!(
        "{client_id}|authMode=aksign,signMethod=hmacsha1,timestamp={ts},authId={access_key_id},consumerGroupId=DEFAULT_GROUP|"
    );
    let password = SignMethod::Hmacsha1.sign(
        secret.as_bytes(),
        string_to_sign(access_key_id, None, ts).as_bytes(),
    );
    (username, password)
}

/// Checks a PLAIN login the way Aliyun does (the password is the HMAC of the signed fields).
fn check_login(init: &SaslInit, secret: Option<&str>) -> Result<(), String> {
    if init.mechanism.as_str() != "PLAIN" {
        return Err(format!("mechanism {} not offered", init.mechanism.as_str()));
    }
    let response: &[u8] = init.initial_response.as_ref().map_or(&[], |b| &b[..]);
    let mut parts = response.split(|b| *b == 0);
    let (Some(_), Some(user), Some(pass)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("PLAIN response is not authzid NUL authcid NUL passwd".into());
    };
    let user = String::from_utf8_lossy(user).into_owned();
    let Some(secret) = secret else {
        return Ok(());
    };
    let parsed = parse_username(&user)?;
    let get = |k: &str| parsed.get(k).ok_or(format!("username lacks {k}"));
    let method: SignMethod = get("signMethod")?.parse()?;
    let ts: u64 = get("timestamp")?.parse().map_err(|_| "bad timestamp")?;
    let data = string_to_sign(get("authId")?, parsed.get("securityToken"), ts);
    if method.sign(secret.as_bytes(), data.as_bytes()).as_bytes() != pass {
        return Err("signature mismatch".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// serve: the source.
// ---------------------------------------------------------------------------------------------

/// Counters of one round, across its connections.
#[derive(Default)]
struct Round {
    first_send_ns: AtomicU64,
    last_settle_ns: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    released: AtomicU64,
    rejected: AtomicU64,
    modified: AtomicU64,
}

impl Round {
    fn new() -> Self {
        let r = Round::default();
        r.first_send_ns.store(u64::MAX, Ordering::Relaxed);
        r
    }
}

/// Link and session flow state of one connection, shared by its reader and writer.
struct State {
    /// The receiver's delivery-count + link-credit: we may send while our count is below it.
    credit_limit: u32,
    /// Our delivery-count (deliveries sent).
    delivery_count: u32,
    /// The receiver's next-incoming-id + incoming-window, in transfer ids.
    window_limit: u32,
    next_outgoing_id: u32,
    /// The receiver's next-outgoing-id (for our Flow frames).
    remote_next_outgoing_id: u32,
    drain: bool,
    /// Frames to send before anything else (replies).
    control: Vec<u8>,
    /// A Close went out or the connection is gone: stop writing.
    closing: bool,
    /// A Detach was received: send no more transfers.
    detached: bool,
    /// One flag per delivery-id: its outcome has been counted.
    settled: Vec<bool>,
    settled_count: u64,
    done_at: Option<Instant>,
}

impl State {
    fn credit(&self) -> u32 {
        let c = self.credit_limit.wrapping_sub(self.delivery_count);
        // A limit behind our count (a stale flow) means no credit, not 4 billion.
        if c > u32::MAX / 2 {
            0
        } else {
            c
        }
    }

    fn window(&self) -> u32 {
        let w = self.window_limit.wrapping_sub(self.next_outgoing_id);
        if w > u32::MAX / 2 {
            0
        } else {
            w
        }
    }

    /// Our flow state, for a drain answer or an echo.
    fn flow_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        performative(
            &mut out,
            0,
            0x13,
            &[
                field(|f| enc::uint(f, self.remote_next_outgoing_id)),
                field(|f| enc::uint(f, 2048)),
                field(|f| enc::uint(f, self.next_outgoing_id)),
                field(|f| enc::uint(f, u32::MAX >> 1)),
                field(|f| enc::uint(f, HANDLE)),
                field(|f| enc::uint(f, self.delivery_count)),
                field(|f| enc::uint(f, self.credit())),
                field(|f| enc::uint(f, 0)),
                field(|f| enc::boolean(f, self.drain)),
            ],
        );
        out
    }
}

struct Conn {
    state: Mutex<State>,
    wake: Notify,
    round: Arc<Round>,
    share: u64,
    /// First messageId of this connection.
    id_base: u64,
    max_frame: usize,
    client_idle: Option<Duration>,
    rate: f64,
    grace: Duration,
}

/// What the handshake learned about the client.
struct Peer {
    max_frame: u32,
    idle: Option<Duration>,
    begin: fe2o3_amqp::types::performatives::Begin,
}

async fn serve(a: ServeArgs) -> Result<()> {
    let (ca_pem, config) = tls_identity()?;
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    // Written after the bind, through a rename: its appearance tells the harness we are ready.
    let tmp = a.ca_out.with_extension("tmp");
    std::fs::write(&tmp, ca_pem).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.ca_out)?;
    eprintln!(
        "bench_source: listening on {}, {} msgs x {} B per round over {} connection(s), rate {}",
        a.listen,
        a.count,
        a.body_size,
        a.connections,
        if a.rate > 0.0 {
            format!("{} msgs/s per connection", a.rate)
        } else {
            "as fast as credit allows".into()
        }
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let templates = Arc::new(templates(a.body_size as usize));
    let secret: Option<Arc<str>> = a.secret.as_deref().map(Arc::from);
    let mut round_no = 0u64;
    while a.rounds == 0 || round_no < a.rounds {
        round_no += 1;
        let round = Arc::new(Round::new());
        let cpu0 = cpu_seconds();
        let id_base = epoch_ms() as u64 * 1_000_000;
        let mut tasks = tokio::task::JoinSet::new();
        let mut offset = 0u64;
        for k in 0..a.connections {
            let (tcp, peer) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let share = a.count / a.connections + u64::from(k < a.count % a.connections);
            let conn = ConnSetup {
                acceptor: acceptor.clone(),
                templates: templates.clone(),
                round: round.clone(),
                secret: secret.clone(),
                share,
                id_base: id_base + offset,
                rate: a.rate,
                grace: Duration::from_millis(a.grace_ms),
            };
            offset += share;
            tasks.spawn(async move {
                if let Err(e) = connection(tcp, conn).await {
                    eprintln!("bench_source: connection from {peer}: {e:#}");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let r = &round;
        let first = r.first_send_ns.load(Ordering::Relaxed);
        let last = r.last_settle_ns.load(Ordering::Relaxed);
        let seconds = if first == u64::MAX || last < first {
            0.0
        } else {
            (last - first) as f64 / 1e9
        };
        let accepted = r.accepted.load(Ordering::Relaxed);
        let report = serde_json::json!({
            "round": round_no,
            "connections": a.connections,
            "sent": r.sent.load(Ordering::Relaxed),
            "accepted": accepted,
            "released": r.released.load(Ordering::Relaxed),
            "rejected": r.rejected.load(Ordering::Relaxed),
            "modified": r.modified.load(Ordering::Relaxed),
            "seconds": seconds,
            "msgs_per_sec": if seconds > 0.0 { accepted as f64 / seconds } else { 0.0 },
            "source_cpu_s": cpu_seconds() - cpu0,
        });
        println!("{report}");
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Generates a throw-away CA and a server certificate for `localhost` (and the loopback IPs).
fn tls_identity() -> Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "iot-sub bench CA (throw-away)");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let mut leaf = CertificateParams::new(names)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![leaf_cert.der().clone()], key)?;
    Ok((ca_cert.pem(), Arc::new(config)))
}

struct ConnSetup {
    acceptor: tokio_rustls::TlsAcceptor,
    templates: Arc<Vec<Template>>,
    round: Arc<Round>,
    secret: Option<Arc<str>>,
    share: u64,
    id_base: u64,
    rate: f64,
    grace: Duration,
}

/// One client: TLS, SASL, Open/Begin/Attach, then a reader and a writer until Close.
async fn connection(tcp: TcpStream, c: ConnSetup) -> Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (tls, peer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = c.acceptor.accept(tcp).await.context("TLS handshake")?;
        let peer = handshake(&mut tls, &mut buf, c.secret.as_deref()).await?;
        anyhow::Ok((tls, peer))
    })
    .await
    .map_err(|_| anyhow!("handshake did not finish within {HANDSHAKE_TIMEOUT:?}"))??;

    let begin = &peer.begin;
    let conn = Arc::new(Conn {
        state: Mutex::new(State {
            credit_limit: 0,
            delivery_count: 0,
            // Until the first Flow, the window is what the client's Begin offered.
            window_limit: begin.incoming_window,
            next_outgoing_id: 0,
            remote_next_outgoing_id: begin.next_outgoing_id,
            drain: false,
            control: Vec::new(),
            closing: false,
            detached: false,
            settled: vec![false; c.share as usize],
            settled_count: 0,
            done_at: (c.share == 0).then(Instant::now),
        }),
        wake: Notify::new(),
        round: c.round,
        share: c.share,
        id_base: c.id_base,
        max_frame: peer.max_frame as usize,
        client_idle: peer.idle,
        rate: c.rate,
        grace: c.grace,
    });

    let (rd, wr) = tokio::io::split(tls);
    let reader = reader(rd, buf, conn.clone());
    let writer = writer(wr, conn.clone(), c.templates);
    tokio::pin!(reader, writer);
    // Either side ending ends the connection; the other gets a moment to finish its part.
    tokio::select! {
        r = &mut reader => {
            lock(&conn.state).closing = true;
            conn.wake.notify_one();
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            r
        }
        w = &mut writer => {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader).await;
            w
        }
    }
}

/// Server side of SASL PLAIN and Open/Begin/Attach, answering each as it arrives.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    secret: Option<&str>,
) -> Result<Peer> {
    let mut header = read_header(s, buf).await?;
    if header == SASL_HEADER {
        let mut out = SASL_HEADER.to_vec();
        out.extend(sasl_frame(sasl::Frame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: Array::from(vec![Symbol::from("PLAIN")]),
        }))?);
        s.write_all(&out).await?;
        s.flush().await?;
        let sasl::Frame::Init(init) = decode_sasl(read_frame(s, buf).await?)? else {
            bail!("expected SASL init");
        };
        let verdict = check_login(&init, secret);
        let code = if verdict.is_ok() {
            SaslCode::Ok
        } else {
            SaslCode::Auth
        };
        s.write_all(&sasl_frame(sasl::Frame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        }))?)
        .await?;
        s.flush().await?;
        verdict.map_err(|e| anyhow!("login refused: {e}"))?;
        header = read_header(s, buf).await?;
    }
    if header != AMQP_HEADER {
        bail!("unexpected protocol header {header:?}");
    }
    s.write_all(&AMQP_HEADER).await?;

    let mut max_frame = 512u32;
    let mut idle = None;
    let mut begin = None;
    loop {
        let frame = decode_amqp(read_frame(s, buf).await?)?;
        let channel = frame.channel;
        let mut out = Vec::new();
        match frame.body {
            FrameBody::Open(open) => {
                max_frame = open.max_frame_size.0.max(512);
                idle = open
                    .idle_time_out
                    .filter(|ms| *ms > 0)
                    .map(|ms| Duration::from_millis(u64::from(ms)));
                // No idle-time-out of our own: the client need not heartbeat at all.
                performative(
                    &mut out,
                    0,
                    0x10,
                    &[
                        field(|f| enc::string(f, "bench-source")),
                        field(enc::null),
                        field(|f| enc::uint(f, OUR_MAX_FRAME)),
                        field(|f| enc::ushort(f, 255)),
                    ],
                );
            }
            FrameBody::Begin(b) => {
                performative(
                    &mut out,
                    0,
                    0x11,
                    &[
                        field(|f| enc::ushort(f, channel)),
                        field(|f| enc::uint(f, 0)),
                        field(|f| enc::uint(f, 2048)),
                        field(|f| enc::uint(f, u32::MAX >> 1)),
                    ],
                );
                begin = Some(b);
            }
            FrameBody::Attach(attach) => {
                out = attach_reply(&attach)?;
                s.write_all(&out).await?;
                s.flush().await?;
                let begin = begin.ok_or_else(|| anyhow!("attach before begin"))?;
                return Ok(Peer {
                    max_frame,
                    idle,
                    begin,
                });
            }
            FrameBody::Empty => {}
            other => bail!("unexpected frame during the handshake: {other:?}"),
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
        }
    }
}

/// Our attach as the sender: unsettled deliveries, the client's source echoed back.
fn attach_reply(attach: &Attach) -> Result<Vec<u8>> {
    if attach.role != Role::Receiver {
        bail!("the client attached as a sender; this source only serves receivers");
    }
    let source = attach.source.as_ref().and_then(|s| s.address.as_deref());
    let target = match attach.target.as_deref() {
        Some(fe2o3_amqp::types::messaging::TargetArchetype::Target(t)) => t.address.as_deref(),
        _ => None,
    };
    let mut out = Vec::new();
    performative(
        &mut out,
        0,
        0x12,
        &[
            field(|f| enc::string(f, &attach.name)),
            field(|f| enc::uint(f, HANDLE)),
            field(|f| enc::boolean(f, false)), // role: sender
            field(|f| enc::ubyte(f, 0)),       // snd-settle-mode: unsettled
            field(|f| enc::ubyte(f, 0)),       // rcv-settle-mode: first
            terminus(0x28, source),
            terminus(0x29, target),
            field(enc::null),                  // unsettled
            field(|f| enc::boolean(f, false)), // incomplete-unsettled
            field(|f| enc::uint(f, 0)),        // initial-delivery-count
        ],
    );
    Ok(out)
}

/// Reads the client's frames: credit, windows, outcomes, and the closing handshake.
async fn reader<R: AsyncRead + Unpin>(mut rd: R, mut buf: BytesMut, conn: Arc<Conn>) -> Result<()> {
    loop {
        while buf.len() >= 4 {
            let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if size < 8 {
                bail!("frame size {size} < 8");
            }
            if buf.len() < size {
                break;
            }
            let mut f = buf.split_to(size);
            f.advance(4);
            if on_frame(decode_amqp(f)?, &conn)? {
                return Ok(());
            }
        }
        buf.reserve(64 * 1024);
        if rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Applies one incoming frame; true when the client closed the connection.
fn on_frame(frame: Frame, conn: &Conn) -> Result<bool> {
    let mut st = lock(&conn.state);
    let mut closed = false;
    match frame.body {
        FrameBody::Flow(flow) => on_flow(&mut st, &flow),
        FrameBody::Disposition(d) if d.role == Role::Receiver => {
            let last = d.last.unwrap_or(d.first);
            let counter = match &d.state {
                Some(DeliveryState::Accepted(_)) => &conn.round.accepted,
                Some(DeliveryState::Released(_)) => &conn.round.released,
                Some(DeliveryState::Rejected(_)) => &conn.round.rejected,
                Some(DeliveryState::Modified(_)) => &conn.round.modified,
                _ => return Ok(false),
            };
            let mut n = 0u64;
            for id in d.first..=last {
                if let Some(seen) = st.settled.get_mut(id as usize) {
                    if !*seen {
                        *seen = true;
                        n += 1;
                    }
                }
            }
            counter.fetch_add(n, Ordering::Relaxed);
            st.settled_count += n;
            if n > 0 {
                conn.round
                    .last_settle_ns
                    .fetch_max(mono_ns(), Ordering::Relaxed);
            }
            if st.settled_count == conn.share && st.done_at.is_none() {
                st.done_at = Some(Instant::now());
            }
        }
        FrameBody::Detach(_) => {
            st.detached = true;
            let mut out = Vec::new();
            performative(
                &mut out,
                0,
                0x16,
                &[
                    field(|f| enc::uint(f, HANDLE)),
                    field(|f| enc::boolean(f, true)),
                ],
            );
            st.control.extend(out);
        }
        FrameBody::End(_) => {
            st.detached = true;
            let mut out = Vec::new();
            performative(&mut out, 0, 0x17, &[]);
            st.control.extend(out);
        }
        FrameBody::Close(_) => {
            close_frame(&mut st.control);
            st.closing = true;
            closed = true;
        }
        _ => return Ok(false),
    }
    drop(st);
    conn.wake.notify_one();
    Ok(closed)
}

fn on_flow(st: &mut State, flow: &Flow) {
    st.window_limit = flow
        .next_incoming_id
        .unwrap_or(0)
        .wrapping_add(flow.incoming_window);
    st.remote_next_outgoing_id = flow.next_outgoing_id;
    if flow.handle.is_some() {
        let their_count = flow.delivery_count.unwrap_or(0);
        st.credit_limit = their_count.wrapping_add(flow.link_credit.unwrap_or(0));
        st.drain = flow.drain;
    }
    if flow.echo {
        let f = st.flow_frame();
        st.control.extend(f);
    }
}

/// Writes transfers as credit, window and pace allow; also replies and heartbeats.
async fn writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    conn: Arc<Conn>,
    templates: Arc<Vec<Template>>,
) -> Result<()> {
    let per_msg = templates[0].frame.len();
    let frames_per = templates[0].frames_per_message(conn.max_frame) as u32;
    let batch_cap = (WRITE_CHUNK / per_msg).max(1) as u64;
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_CHUNK + per_msg);
    let mut sent = 0u64;
    let mut pace_start: Option<Instant> = None;
    let mut last_write = Instant::now();
    loop {
        out.clear();
        let mut wait_until: Option<Instant> = None;
        let (n, first_id, closing) = {
            let mut st = lock(&conn.state);
            out.append(&mut st.control);
            let mut n = if st.detached || st.closing {
                0
            } else {
                u64::from(st.credit())
                    .min(u64::from(st.window() / frames_per))
                    .min(conn.share - sent)
                    .min(batch_cap)
            };
            if conn.rate > 0.0 && n > 0 {
                let start = *pace_start.get_or_insert_with(Instant::now);
                let due = (start.elapsed().as_secs_f64() * conn.rate) as u64 + 1;
                n = n.min(due.saturating_sub(sent));
                if n == 0 {
                    let next = start + Duration::from_secs_f64(sent as f64 / conn.rate);
                    wait_until = Some(next);
                }
            }
            let first_id = st.delivery_count;
            st.delivery_count = st.delivery_count.wrapping_add(n as u32);
            st.next_outgoing_id = st.next_outgoing_id.wrapping_add(n as u32 * frames_per);
            // Drain: nothing left to send, so the remaining credit is used up at once.
            if st.drain && sent + n == conn.share && st.credit() > 0 {
                st.delivery_count = st.credit_limit;
                let f = st.flow_frame();
                out.extend(f);
            }
            if let Some(done) = st.done_at {
                if !st.closing && done.elapsed() >= conn.grace {
                    close_frame(&mut out);
                    st.closing = true;
                }
            }
            (n, first_id, st.closing)
        };
        if n > 0 {
            conn.round
                .first_send_ns
                .fetch_min(mono_ns(), Ordering::Relaxed);
            // generateTime is stamped per batch: the batch is written right after.
            let now_ms = epoch_ms();
            for i in 0..n {
                let seq = sent + i;
                let t = &templates[(seq % templates.len() as u64) as usize];
                let id = first_id.wrapping_add(i as u32);
                t.emit(&mut out, id, conn.id_base + seq, now_ms, conn.max_frame);
            }
            sent += n;
            conn.round.sent.fetch_add(n, Ordering::Relaxed);
        }
        if out.is_empty() {
            if let Some(idle) = conn.client_idle {
                // Heartbeat at half the client's idle-time-out.
                if last_write.elapsed() >= idle / 2 {
                    out.extend_from_slice(&EMPTY_FRAME);
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
            last_write = Instant::now();
        }
        if closing {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        if n == 0 && out.is_empty() {
            let mut deadline = Instant::now() + Duration::from_secs(1);
            if let Some(t) = wait_until {
                deadline = deadline.min(t);
            }
            if let Some(idle) = conn.client_idle {
                deadline = deadline.min(last_write + idle / 2);
            }
            tokio::select! {
                _ = conn.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// sink: the minimal receiver.
// ---------------------------------------------------------------------------------------------

async fn sink(a: SinkArgs) -> Result<()> {
    let started = Instant::now();
    let a = Arc::new(a);
    let k = u64::from(a.connections.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..k {
        let count = a.count / k + u64::from(i < a.count % k);
        tasks.spawn(sink_one(a.clone(), count));
    }
    let (mut received, mut first, mut last) = (0u64, None::<Instant>, None::<Instant>);
    while let Some(done) = tasks.join_next().await {
        let (n, f, l) = done??;
        received += n;
        first = match (first, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = Some(last.map_or(l, |x: Instant| x.max(l)));
    }
    let seconds = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    let report = serde_json::json!({
        "mode": "sink",
        "connections": k,
        "received": received,
        "seconds": seconds,
        "msgs_per_sec": if seconds > 0.0 { received as f64 / seconds } else { 0.0 },
        "cpu_s": cpu_seconds(),
        "peak_rss_kib": peak_rss_kib(),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}

/// One connection of the minimal receiver: returns how many it received, and when the first
/// arrived and the last was settled.
async fn sink_one(a: Arc<SinkArgs>, count: u64) -> Result<(u64, Option<Instant>, Instant)> {
    let a = &*a;
    let (host, _) = a
        .connect
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--connect must be host:port"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&a.ca).with_context(|| a.ca.display().to_string())? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(&a.connect)
        .await
        .with_context(|| format!("connecting to {}", a.connect))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let mut buf = BytesMut::with_capacity(512 * 1024);

    let peer_next_outgoing = sink_attach(&mut s, &mut buf, a, host).await?;

    let flow = |transfers: u32, delivery_count: u32| {
        let mut out = Vec::new();
        performative(
            &mut out,
            0,
            0x13,
            &[
                field(|f| enc::uint(f, peer_next_outgoing.wrapping_add(transfers))),
                field(|f| enc::uint(f, u32::MAX >> 1)),
                field(|f| enc::uint(f, 0)),
                field(|f| enc::uint(f, u32::MAX >> 1)),
                field(|f| enc::uint(f, HANDLE)),
                field(|f| enc::uint(f, delivery_count)),
                field(|f| enc::uint(f, a.credit)),
            ],
        );
        out
    };
    s.write_all(&flow(0, 0)).await?;
    s.flush().await?;

    let mut received = 0u64;
    let mut transfers = 0u32;
    let mut pending = 0u32;
    let mut first_unsettled = 0u32;
    let mut last_id = 0u32;
    let mut first_at: Option<Instant> = None;
    let mut last_at = Instant::now();
    let mut last_disposition = Instant::now();
    let mut lines = Vec::new();
    let ack_after = (a.ack_ms > 0).then(|| Duration::from_millis(a.ack_ms));
    let mut checked = false;
    while received < count {
        while buf.len() >= 4 {
            let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if size < 8 {
                bail!("frame size {size} < 8");
            }
            if buf.len() < size {
                break;
            }
            if size > 11 && buf[8..11] == [0x00, 0x53, 0x14] {
                if !checked {
                    // Once: our hand parse must agree with fe2o3's decoder.
                    let mut f = BytesMut::from(&buf[4..size]);
                    check_transfer(&mut f, &buf[11..size])?;
                    checked = true;
                }
                let (id, more) = parse_transfer(&buf[11..size])?;
                if a.render && !more {
                    render_delivery(&buf[4..size], &mut lines)?;
                }
                transfers = transfers.wrapping_add(1);
                if !more {
                    if pending == 0 {
                        first_unsettled = id.unwrap_or(last_id.wrapping_add(1));
                    }
                    last_id = id.unwrap_or(last_id.wrapping_add(1));
                    received += 1;
                    pending += 1;
                    first_at.get_or_insert_with(Instant::now);
                }
            } else {
                let mut f = buf.split_to(size);
                f.advance(4);
                match decode_amqp(f)?.body {
                    FrameBody::Close(c) => bail!("the source closed: {c:?}"),
                    FrameBody::Detach(d) => bail!("the source detached: {d:?}"),
                    _ => {}
                }
                continue;
            }
            buf.advance(size);
            if received == count {
                break;
            }
        }
        let waited = ack_after.is_some_and(|d| last_disposition.elapsed() >= d);
        if pending >= a.batch || (received == count && pending > 0) || (pending > 0 && waited) {
            last_at = Instant::now();
            last_disposition = last_at;
            let mut out = Vec::new();
            performative(
                &mut out,
                0,
                0x15,
                &[
                    field(|f| enc::boolean(f, true)), // role: receiver
                    field(|f| enc::uint(f, first_unsettled)),
                    field(|f| enc::uint(f, last_id)),
                    field(|f| enc::boolean(f, true)), // settled
                    field(|f| enc::described(f, 0x24, &[])), // accepted
                ],
            );
            if received < count {
                out.extend(flow(transfers, received as u32));
            }
            s.write_all(&out).await?;
            s.flush().await?;
            pending = 0;
        }
        if !lines.is_empty() {
            std::io::stdout().lock().write_all(&lines)?;
            lines.clear();
        }
        if received < count {
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(256 * 1024);
            }
            if s.read_buf(&mut buf).await? == 0 {
                bail!("the source closed the connection after {received} messages");
            }
        }
    }

    // Close politely and wait briefly for the source's Close.
    let mut out = Vec::new();
    performative(
        &mut out,
        0,
        0x16,
        &[
            field(|f| enc::uint(f, HANDLE)),
            field(|f| enc::boolean(f, true)),
        ],
    );
    performative(&mut out, 0, 0x17, &[]);
    close_frame(&mut out);
    s.write_all(&out).await?;
    s.flush().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let f = read_frame(&mut s, &mut buf).await?;
            if f.len() > 7 && f[4..7] == [0x00, 0x53, 0x18] {
                return anyhow::Ok(());
            }
        }
    })
    .await;

    Ok((received, first_at, last_at))
}

/// The client side of SASL PLAIN (an Aliyun-signed login), Open, Begin and a receiver Attach;
/// returns the source's initial next-outgoing-id.
async fn sink_attach<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    a: &SinkArgs,
    host: &str,
) -> Result<u32> {
    // SASL PLAIN with an Aliyun-signed login.
    s.write_all(&SASL_HEADER).await?;
    s.flush().await?;
    if read_header(s, buf).await? != SASL_HEADER {
        bail!("the source did not answer with the SASL header");
    }
    let _mechanisms = decode_sasl(read_frame(s, buf).await?)?;
    let (user, pass) = aliyun_login("bench-sink", &a.access_key_id, &a.secret);
    let mut response = vec![0u8];
    response.extend_from_slice(user.as_bytes());
    response.push(0);
    response.extend_from_slice(pass.as_bytes());
    s.write_all(&sasl_frame(sasl::Frame::Init(SaslInit {
        mechanism: Symbol::from("PLAIN"),
        initial_response: Some(Binary::from(response)),
        hostname: Some(host.to_string()),
    }))?)
    .await?;
    s.flush().await?;
    match decode_sasl(read_frame(s, buf).await?)? {
        sasl::Frame::Outcome(o) if o.code == SaslCode::Ok => {}
        other => bail!("login refused: {other:?}"),
    }

    let mut out = AMQP_HEADER.to_vec();
    performative(
        &mut out,
        0,
        0x10,
        &[
            field(|f| enc::string(f, "bench-sink")),
            field(|f| enc::string(f, host)),
            field(|f| enc::uint(f, 1024 * 1024)),
            field(|f| enc::ushort(f, 0)),
        ],
    );
    performative(
        &mut out,
        0,
        0x11,
        &[
            field(enc::null),
            field(|f| enc::uint(f, 0)),
            field(|f| enc::uint(f, u32::MAX >> 1)),
            field(|f| enc::uint(f, u32::MAX >> 1)),
        ],
    );
    performative(
        &mut out,
        0,
        0x12,
        &[
            field(|f| enc::string(f, "bench-sink")),
            field(|f| enc::uint(f, HANDLE)),
            field(|f| enc::boolean(f, true)), // role: receiver
            field(|f| enc::ubyte(f, 2)),      // snd-settle-mode: mixed
            field(|f| enc::ubyte(f, 0)),      // rcv-settle-mode: first
            terminus(0x28, Some("default")),
            terminus(0x29, None),
        ],
    );
    s.write_all(&out).await?;
    s.flush().await?;
    if read_header(s, buf).await? != AMQP_HEADER {
        bail!("the source did not answer with the AMQP header");
    }
    let mut peer_next_outgoing = 0u32;
    loop {
        match decode_amqp(read_frame(s, buf).await?)?.body {
            FrameBody::Begin(b) => peer_next_outgoing = b.next_outgoing_id,
            FrameBody::Attach(_) => break,
            FrameBody::Open(_) | FrameBody::Empty => {}
            other => bail!("unexpected frame before attach: {other:?}"),
        }
    }
    Ok(peer_next_outgoing)
}

/// Reads an AMQP unsigned int (or null) at `p`; advances `p`.
fn read_uint(b: &[u8], p: &mut usize) -> Result<Option<u32>> {
    let c = *b.get(*p).ok_or_else(|| anyhow!("truncated transfer"))?;
    *p += 1;
    let v = match c {
        0x40 => return Ok(None),
        0x43 => 0,
        0x52 => {
            *p += 1;
            u32::from(b[*p - 1])
        }
        0x70 => {
            *p += 4;
            u32::from_be_bytes(b[*p - 4..*p].try_into()?)
        }
        _ => bail!("unexpected encoding 0x{c:02x} for a uint"),
    };
    Ok(Some(v))
}

/// Skips one primitive value of the kinds a transfer's leading fields use.
fn skip_value(b: &[u8], p: &mut usize) -> Result<()> {
    let c = *b.get(*p).ok_or_else(|| anyhow!("truncated transfer"))?;
    *p += 1;
    match c {
        0x40..=0x45 => {}
        0x50..=0x56 => *p += 1,
        0x60 => *p += 2,
        0x70..=0x73 => *p += 4,
        0x80..=0x84 => *p += 8,
        0xa0 | 0xa1 | 0xa3 => *p += 1 + usize::from(*b.get(*p).unwrap_or(&0)),
        0xb0 | 0xb1 | 0xb3 => {
            let n = u32::from_be_bytes(b.get(*p..*p + 4).unwrap_or(&[0; 4]).try_into()?);
            *p += 4 + n as usize;
        }
        _ => bail!("unexpected encoding 0x{c:02x} in a transfer"),
    }
    Ok(())
}

/// From the transfer list (after its descriptor): delivery-id (if present) and `more`.
fn parse_transfer(b: &[u8]) -> Result<(Option<u32>, bool)> {
    let (mut p, count) = match b.first() {
        Some(0x45) => return Ok((None, false)),
        Some(0xc0) => (3usize, usize::from(b[2])),
        Some(0xd0) => (9usize, u32::from_be_bytes(b[5..9].try_into()?) as usize),
        _ => bail!("transfer is not a list"),
    };
    skip_value(b, &mut p)?; // handle
    let id = if count > 1 {
        read_uint(b, &mut p)?
    } else {
        None
    };
    let mut more = false;
    if count > 5 {
        for _ in 0..3 {
            skip_value(b, &mut p)?; // delivery-tag, message-format, settled
        }
        more = b.get(p) == Some(&0x41) || (b.get(p) == Some(&0x56) && b.get(p + 1) == Some(&1));
    }
    Ok((id, more))
}

/// `sink --render`: the frame (after its size) through fe2o3's frame and message decoders,
/// and iot-sub's JSON line for it appended to `out`.
fn render_delivery(frame: &[u8], out: &mut Vec<u8>) -> Result<()> {
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::primitives::Value;
    let FrameBody::Transfer { payload, .. } = decode_amqp(BytesMut::from(frame))?.body else {
        bail!("not a transfer");
    };
    let reader = serde_amqp::read::SliceReader::new(&payload);
    let message = Body::<Value>::decode_message_from_reader(reader)?;
    iot_sub::message::write_line(&message, out)?;
    Ok(())
}

/// Decodes one transfer with fe2o3 and compares it with the hand parse.
fn check_transfer(frame: &mut BytesMut, list: &[u8]) -> Result<()> {
    let FrameBody::Transfer {
        performative,
        payload,
    } = decode_amqp(frame.split())?.body
    else {
        bail!("not a transfer");
    };
    let (id, more) = parse_transfer(list)?;
    if performative.delivery_id != id || performative.more != more || payload.is_empty() {
        bail!("hand-parsed transfer differs from fe2o3's decode: {performative:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// first-byte and delays: timers the harness puts around a receiver.
// ---------------------------------------------------------------------------------------------

fn first_byte(a: FirstByteArgs) -> Result<()> {
    let mut runs = Vec::new();
    for i in 0..a.runs {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(a.pause_ms));
        }
        let t0 = Instant::now();
        let mut child = Command::new(&a.command[0])
            .args(&a.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", a.command[0]))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut b = [0u8; 64 * 1024];
        let n = stdout.read(&mut b)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        std::io::copy(&mut stdout, &mut std::io::sink())?;
        let status = child.wait()?;
        if n == 0 || !status.success() {
            bail!("run {}: no output or failure ({status})", i + 1);
        }
        runs.push(ms);
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "runs_ms": runs,
        "median_ms": sorted[sorted.len() / 2],
        "min_ms": sorted[0],
        "max_ms": sorted[sorted.len() - 1],
    });
    println!("{report}");
    Ok(())
}

fn delays(a: DelaysArgs) -> Result<()> {
    const KEY: &[u8] = b"\"generateTime\":";
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut filled = 0usize;
    let mut delays_us: Vec<i64> = Vec::with_capacity(1 << 18);
    let mut lines = 0u64;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = input.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        // Every line completed by this read arrived now.
        let now_us = epoch_us();
        filled += n;
        let mut start = 0;
        while let Some(nl) = buf[start..filled].iter().position(|&c| c == b'\n') {
            let line = &buf[start..start + nl];
            lines += 1;
            if let Some(k) = line.windows(KEY.len()).position(|w| w == KEY) {
                let digits = &line[k + KEY.len()..];
                let end = digits
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .unwrap_or(digits.len());
                if let Ok(ms) = std::str::from_utf8(&digits[..end])?.parse::<i64>() {
                    delays_us.push(now_us - ms * 1000);
                }
            }
            start += nl + 1;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
    delays_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if delays_us.is_empty() {
            return 0.0;
        }
        let rank = ((p * delays_us.len() as f64).ceil() as usize).clamp(1, delays_us.len());
        delays_us[rank - 1] as f64 / 1000.0
    };
    let report = serde_json::json!({
        "lines": lines,
        "timed": delays_us.len(),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
    });
    match a.out {
        Some(path) => std::fs::write(&path, format!("{report}\n"))
            .with_context(|| path.display().to_string())?,
        None => println!("{report}"),
    }
    Ok(())
}
