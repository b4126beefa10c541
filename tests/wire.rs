//! End to end against a scripted AMQP 1.0 server: the real `iot-sub listen` binary (a
//! `kind = "amqp"` profile, real TLS) receives from a server written here frame by frame, so
//! the tests can send what the emulator never does (deliveries split over frames, aborted and
//! pre-settled deliveries, echo flows, silence, a Close with an error) and check every frame
//! the client sends back (dispositions, credit, heartbeats).
//!
//! The server is an independent peer: it encodes performatives with fe2o3-amqp's types and
//! serde_amqp, decodes with fe2o3's frame decoders, and uses none of iot-sub's transport code.
//! Every Flow the client sends is checked against the credit bound (deliveries unsettled plus
//! credit left never exceed the configured credit), in every test.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{ChildStdout, Command};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use common::Client;
use fe2o3_amqp::frames::amqp::{FrameBody, FrameDecoder};
use fe2o3_amqp::frames::sasl;
use fe2o3_amqp::types::definitions::{self, ConnectionError, Role};
use fe2o3_amqp::types::messaging::{DeliveryState, Source};
use fe2o3_amqp::types::performatives::{Attach, Begin, Close, Disposition, Flow, Open, Transfer};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::codec::{Decoder, Encoder};

/// Generous deadline for anything that should happen (a slow, shared 2-core machine).
const T: Duration = Duration::from_secs(30);
const USER: &str = "wire-user";
const PASSWORD: &str = "wire-password-5b9e";
const SOURCE: &str = "wire-queue";
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

// ---- the scripted server ------------------------------------------------------------------

/// A TLS listener on 127.0.0.1 with a throw-away CA, and a directory for the CA and profiles.
struct Server {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Server {
    async fn start() -> Server {
        let (ca_pem, config) = tls_identity();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        Server {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            tls: tokio_rustls::TlsAcceptor::from(config),
            dir,
            ca,
        }
    }

    /// Runs `iot-sub listen` on an amqp profile pointing here, with `extra` profile lines.
    fn client(&self, extra: &str) -> Client {
        Client::spawn(self.command(extra))
    }

    /// Like [`Server::client`], with stdout left to the caller (unread, it blocks the output).
    fn client_unread(&self, extra: &str) -> (Client, ChildStdout) {
        Client::spawn_unread(self.command(extra))
    }

    fn command(&self, extra: &str) -> Command {
        let config = self.profile(extra);
        let mut cmd = Command::new(common::bin());
        cmd.arg("listen")
            .arg("--config")
            .arg(&config)
            .args(["--profile", "t"])
            .env("IOT_SUB_AMQP_PASSWORD", PASSWORD)
            .env("RUST_LOG", "info");
        cmd
    }

    fn profile(&self, extra: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("config-{}.toml", fastrand::u32(..)));
        let text = format!(
            "[profiles.t]\nkind = \"amqp\"\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n\
             username = \"{USER}\"\nsource = \"{SOURCE}\"\nclient_id = \"wire-client\"\n\
             backoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\n{extra}\n",
            self.listener.local_addr().unwrap().port(),
            self.ca.display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Takes the next connection through TLS, SASL PLAIN, Open, Begin and Attach, and reads
    /// the client's first Flow. `idle_ms` is the idle-time-out our Open advertises.
    async fn accept(&self, credit: u32, idle_ms: Option<u32>) -> Conn {
        let (tcp, _) = timeout(T, self.listener.accept())
            .await
            .expect("the client connects in time")
            .unwrap();
        let io = timeout(T, self.tls.accept(tcp))
            .await
            .expect("TLS in time")
            .expect("TLS handshake");
        let mut conn = Conn {
            io,
            buf: BytesMut::new(),
            out: BytesMut::new(),
            credit,
            client_idle_ms: None,
            last_write: Instant::now(),
            sent: 0,
            limit: 0,
            unsettled: BTreeSet::new(),
            dispositions: Vec::new(),
            flows: Vec::new(),
            closed: false,
        };
        conn.handshake(idle_ms).await;
        conn
    }
}

/// Generates a throw-away CA and a certificate for `localhost` signed by it.
fn tls_identity() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "iot-sub wire test CA (throw-away)");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf_cert.der().clone()], key)
    .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

/// One client connection, from the server's side, with the link's bookkeeping.
struct Conn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    buf: BytesMut,
    /// Frames queued by the script, written by [`Conn::flush`].
    out: BytesMut,
    /// The client's configured credit: the bound its Flows must respect.
    credit: u32,
    /// The idle-time-out in the client's Open.
    client_idle_ms: Option<u32>,
    /// When we last wrote anything.
    last_write: Instant,
    /// Our delivery-count: deliveries sent (aborted ones too).
    sent: u32,
    /// The client's delivery-count + link-credit from its latest Flow: we may send below it.
    limit: u32,
    /// Delivery ids sent unsettled and not yet settled by a Disposition.
    unsettled: BTreeSet<u32>,
    dispositions: Vec<Disposition>,
    flows: Vec<Flow>,
    /// The client has closed the connection (EOF or reset).
    closed: bool,
}

/// How a delivery is sent: for the client to settle, or settled by us already.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Unsettled,
    PreSettled,
}

impl Conn {
    async fn handshake(&mut self, idle_ms: Option<u32>) {
        assert_eq!(self.header().await, SASL_HEADER);
        self.out.extend_from_slice(&SASL_HEADER);
        self.put_sasl(sasl::Frame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: Array::from(vec![Symbol::from("PLAIN")]),
        }));
        self.flush().await;
        let sasl::Frame::Init(init) = self.sasl_frame().await else {
            panic!("expected a SASL init")
        };
        assert_eq!(init.mechanism, Symbol::from("PLAIN"));
        let want = format!("\0{USER}\0{PASSWORD}");
        assert_eq!(
            init.initial_response.as_deref().map(|r| &r[..]),
            Some(want.as_bytes()),
            "SASL PLAIN response"
        );
        self.put_sasl(sasl::Frame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        }));
        self.flush().await;

        assert_eq!(self.header().await, AMQP_HEADER);
        let FrameBody::Open(open) = self.control().await else {
            panic!("expected Open")
        };
        self.client_idle_ms = open.idle_time_out;
        self.out.extend_from_slice(&AMQP_HEADER);
        self.put(&Open {
            container_id: "wire-server".into(),
            hostname: None,
            max_frame_size: 65_536.into(),
            channel_max: 0.into(),
            idle_time_out: idle_ms,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        self.flush().await;
        let FrameBody::Begin(_) = self.control().await else {
            panic!("expected Begin")
        };
        self.put(&Begin {
            remote_channel: Some(0),
            next_outgoing_id: 0,
            incoming_window: 1 << 16,
            outgoing_window: 1 << 16,
            handle_max: 0u32.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        });
        self.flush().await;
        let FrameBody::Attach(attach) = self.control().await else {
            panic!("expected Attach")
        };
        assert_eq!(attach.role, Role::Receiver);
        self.put(&Attach {
            role: Role::Sender,
            source: Some(Box::new(Source::builder().address(SOURCE).build())),
            initial_delivery_count: Some(0),
            ..attach
        });
        self.flush().await;
        // The client grants its credit right after the Attach.
        while self.flows.is_empty() {
            self.control().await;
        }
    }

    // -- writing --

    fn put_sasl(&mut self, frame: sasl::Frame) {
        let mut body = BytesMut::new();
        sasl::FrameCodec {}.encode(frame, &mut body).unwrap();
        self.out.put_u32(body.len() as u32 + 4);
        self.out.extend_from_slice(&body);
    }

    /// Queues an AMQP frame on channel 0 carrying `performative` and `payload`.
    fn put_with<P: serde::Serialize>(&mut self, performative: &P, payload: &[u8]) {
        let body = serde_amqp::to_vec(performative).unwrap();
        self.out.put_u32((8 + body.len() + payload.len()) as u32);
        self.out.put_slice(&[2, 0, 0, 0]); // doff 2, AMQP frame, channel 0
        self.out.put_slice(&body);
        self.out.put_slice(payload);
    }

    fn put<P: serde::Serialize>(&mut self, performative: &P) {
        self.put_with(performative, &[]);
    }

    /// Writes what is queued.
    async fn flush(&mut self) {
        let out = std::mem::take(&mut self.out);
        timeout(T, async {
            self.io.write_all(&out).await?;
            self.io.flush().await
        })
        .await
        .expect("the client reads in time")
        .expect("write to the client");
        self.last_write = Instant::now();
    }

    fn credit_left(&self) -> u32 {
        let left = self.limit.wrapping_sub(self.sent);
        // A limit behind our count means none.
        if left > u32::MAX / 2 {
            0
        } else {
            left
        }
    }

    /// Waits (reading the client's frames) for credit, then queues one delivery of `message`
    /// cut into `pieces` transfer frames; returns its delivery-id.
    async fn deliver(&mut self, message: &[u8], pieces: usize, kind: Kind) -> u32 {
        self.wait_for_credit().await;
        let id = self.sent;
        self.sent += 1;
        if kind == Kind::Unsettled {
            self.unsettled.insert(id);
        }
        let size = message.len().div_ceil(pieces);
        let chunks: Vec<&[u8]> = message.chunks(size).collect();
        assert_eq!(chunks.len(), pieces, "message too short to cut");
        for (i, chunk) in chunks.iter().enumerate() {
            let first = i == 0;
            let transfer = transfer(
                first.then_some(id),
                first && kind == Kind::PreSettled,
                i + 1 < pieces,
                false,
            );
            self.put_with(&transfer, chunk);
        }
        id
    }

    /// Queues a delivery the sender gives up on: a first frame with `more`, then one with
    /// `aborted`. It takes a credit but is never settled.
    async fn abort(&mut self, first_part: &[u8]) -> u32 {
        self.wait_for_credit().await;
        let id = self.sent;
        self.sent += 1;
        self.put_with(&transfer(Some(id), false, true, false), first_part);
        self.put(&transfer(None, false, false, true));
        id
    }

    async fn wait_for_credit(&mut self) {
        let deadline = Instant::now() + T;
        while self.credit_left() == 0 {
            if self.frame_by(deadline).await.is_none() {
                panic!(
                    "no credit from the client within {T:?} ({} sent, limit {}, {} unsettled, \
                     closed: {})",
                    self.sent,
                    self.limit,
                    self.unsettled.len(),
                    self.closed
                );
            }
        }
    }

    // -- reading --

    /// Reads more; false at `deadline` or when the client has closed the connection.
    async fn read_some(&mut self, deadline: Instant) -> bool {
        if self.closed {
            return false;
        }
        match timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.closed = true;
                false
            }
            Ok(Ok(_)) => true,
        }
    }

    async fn header(&mut self) -> [u8; 8] {
        let deadline = Instant::now() + T;
        while self.buf.len() < 8 {
            assert!(self.read_some(deadline).await, "no protocol header in time");
        }
        let mut h = [0u8; 8];
        self.buf.copy_to_slice(&mut h);
        h
    }

    /// The next whole frame without its size field, or `None` at `deadline`.
    async fn raw_frame(&mut self, deadline: Instant) -> Option<BytesMut> {
        loop {
            if self.buf.len() >= 4 {
                let size = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                assert!((8..=1 << 20).contains(&size), "frame size {size}");
                if self.buf.len() >= size {
                    let mut frame = self.buf.split_to(size);
                    frame.advance(4);
                    return Some(frame);
                }
            }
            if !self.read_some(deadline).await {
                return None;
            }
        }
    }

    async fn sasl_frame(&mut self) -> sasl::Frame {
        let mut raw = self
            .raw_frame(Instant::now() + T)
            .await
            .expect("a SASL frame in time");
        sasl::FrameCodec {}.decode(&mut raw).unwrap().unwrap()
    }

    /// The client's next frame (a heartbeat is `Empty`), or `None` at `deadline`. Flows and
    /// Dispositions are tracked, and every Flow is checked against the credit bound.
    async fn frame_by(&mut self, deadline: Instant) -> Option<FrameBody> {
        let mut raw = self.raw_frame(deadline).await?;
        let body = FrameDecoder {}
            .decode(&mut raw)
            .expect("the client's frame decodes")
            .expect("a frame")
            .body;
        match &body {
            FrameBody::Flow(flow) => self.on_flow(flow),
            FrameBody::Disposition(d) => {
                assert_eq!(d.role, Role::Receiver);
                for id in d.first..=d.last.unwrap_or(d.first) {
                    self.unsettled.remove(&id);
                }
                self.dispositions.push(d.clone());
            }
            _ => {}
        }
        Some(body)
    }

    /// The next frame that is not a heartbeat.
    async fn control(&mut self) -> FrameBody {
        let deadline = Instant::now() + T;
        loop {
            match self.frame_by(deadline).await {
                Some(FrameBody::Empty) => {}
                Some(body) => return body,
                None => panic!(
                    "no frame from the client within {T:?} (closed: {})",
                    self.closed
                ),
            }
        }
    }

    fn on_flow(&mut self, flow: &Flow) {
        if flow.handle.is_some() {
            let count = flow
                .delivery_count
                .expect("a link Flow has a delivery-count");
            let credit = flow.link_credit.expect("a link Flow has link-credit");
            self.limit = count.wrapping_add(credit);
            // What the client now lets be outstanding: what is unsettled, plus what we may
            // still send.
            let outstanding = self.unsettled.len() as u32 + self.credit_left();
            assert!(
                outstanding <= self.credit,
                "credit bound broken: {} unsettled + {} credit left > {} (flow: delivery-count \
                 {count}, link-credit {credit}; we sent {})",
                self.unsettled.len(),
                self.credit_left(),
                self.credit,
                self.sent
            );
        }
        self.flows.push(flow.clone());
    }

    /// Reads the client's frames until `ids` are all settled.
    async fn wait_settled(&mut self, ids: impl IntoIterator<Item = u32>) {
        let ids: Vec<u32> = ids.into_iter().collect();
        let deadline = Instant::now() + T;
        while ids.iter().any(|id| self.unsettled.contains(id)) {
            if self.frame_by(deadline).await.is_none() {
                let left: Vec<_> = ids
                    .iter()
                    .filter(|id| self.unsettled.contains(id))
                    .collect();
                panic!(
                    "deliveries {left:?} not settled within {T:?} (closed: {})",
                    self.closed
                );
            }
        }
    }

    /// The delivery ids the client's Dispositions settled, each as often as it was settled.
    fn settled_ids(&self) -> Vec<u32> {
        self.dispositions
            .iter()
            .flat_map(|d| d.first..=d.last.unwrap_or(d.first))
            .collect()
    }

    /// Every Disposition so far settles (settled = true) with Accepted.
    fn assert_all_accepted(&self) {
        for d in &self.dispositions {
            assert!(d.settled, "{d:?}");
            assert!(matches!(d.state, Some(DeliveryState::Accepted(_))), "{d:?}");
        }
    }
}

fn transfer(id: Option<u32>, settled: bool, more: bool, aborted: bool) -> Transfer {
    Transfer {
        handle: 0u32.into(),
        delivery_id: id,
        delivery_tag: id.map(|i| i.to_be_bytes().to_vec().into()),
        message_format: id.map(|_| 0),
        settled: settled.then_some(true),
        more,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted,
        batchable: false,
    }
}

// ---- messages -----------------------------------------------------------------------------

/// A message encoded by hand (AMQP 1.0 part 3): application-properties with `messageId`, and
/// one data section holding `body`.
fn message(message_id: &str, body: &str) -> Vec<u8> {
    fn str8(out: &mut Vec<u8>, s: &str) {
        out.push(0xa1);
        out.push(u8::try_from(s.len()).unwrap());
        out.extend_from_slice(s.as_bytes());
    }
    let mut pairs = Vec::new();
    str8(&mut pairs, "messageId");
    str8(&mut pairs, message_id);
    let mut m = vec![
        0x00,
        0x53,
        0x74,
        0xc1,
        u8::try_from(pairs.len() + 1).unwrap(),
        2,
    ];
    m.extend_from_slice(&pairs);
    m.extend_from_slice(&[0x00, 0x53, 0x75, 0xb0]);
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body.as_bytes());
    m
}

fn json_body(n: usize) -> String {
    format!(r#"{{"n":{n},"text":"wire test message number {n}"}}"#)
}

/// Checks a written line is message `id` with body `json_body(n)`.
fn assert_line(line: &Value, id: &str, n: usize) {
    assert_eq!(line["messageId"], id, "{line}");
    assert_eq!(line["topic"], SOURCE, "{line}");
    assert_eq!(line["bodyEncoding"], "json", "{line}");
    let want: Value = serde_json::from_str(&json_body(n)).unwrap();
    assert_eq!(line["body"], want, "{line}");
}

/// Reads `n` stdout lines (blocking this worker; the server's frames wait in the socket).
fn lines(client: &Client, n: usize) -> Vec<Value> {
    tokio::task::block_in_place(|| client.read_lines(n, T))
}

/// A short look for lines that should not come.
fn no_more_lines(client: &Client) {
    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(300)));
    let extra = client.lines_so_far();
    assert!(extra.is_empty(), "unexpected lines: {extra:?}");
}

fn wait_stderr(client: &Client, needle: &str) {
    tokio::task::block_in_place(|| client.wait_stderr(needle, 1, T));
}

// ---- the tests ----------------------------------------------------------------------------

/// A delivery split over 3 transfer frames (delivery-id only on the first) is one message:
/// written once, whole, and accepted by a Disposition covering its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_split_over_three_frames_is_written_once_whole_and_accepted() {
    let server = Server::start().await;
    let client = server.client("credit = 10");
    let mut conn = server.accept(10, None).await;
    // Three equal pieces: none is a message by itself, only the three together.
    let split = conn
        .deliver(&message("split-1", &json_body(1)), 3, Kind::Unsettled)
        .await;
    let whole = conn
        .deliver(&message("whole-2", &json_body(2)), 1, Kind::Unsettled)
        .await;
    conn.flush().await;
    let got = lines(&client, 2);
    assert_line(&got[0], "split-1", 1);
    assert_line(&got[1], "whole-2", 2);
    conn.wait_settled([split, whole]).await;
    conn.assert_all_accepted();
    let mut settled = conn.settled_ids();
    settled.sort_unstable();
    assert_eq!(settled, [split, whole], "each settled exactly once");
    no_more_lines(&client);
}

/// An aborted delivery is neither written nor settled, and its credit comes back: with
/// credit 2, two aborted deliveries use it all, and the two good ones after must still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_deliveries_are_dropped_unsettled_and_their_credit_comes_back() {
    let server = Server::start().await;
    let client = server.client("credit = 2");
    let mut conn = server.accept(2, None).await;
    let msg = message("aborted", &json_body(0));
    let mut aborted = Vec::new();
    for _ in 0..2 {
        aborted.push(conn.abort(&msg[..msg.len() / 2]).await);
        conn.flush().await;
    }
    // Both credits went on aborted deliveries: `deliver` waits for the client to grant more.
    let mut good = Vec::new();
    for n in 1..=2 {
        good.push(
            conn.deliver(
                &message(&format!("good-{n}"), &json_body(n)),
                1,
                Kind::Unsettled,
            )
            .await,
        );
        conn.flush().await;
    }
    let got = lines(&client, 2);
    assert_line(&got[0], "good-1", 1);
    assert_line(&got[1], "good-2", 2);
    conn.wait_settled(good.iter().copied()).await;
    conn.assert_all_accepted();
    let settled = conn.settled_ids();
    for id in &aborted {
        assert!(
            !settled.contains(id),
            "aborted delivery {id} was settled: {settled:?}"
        );
    }
    no_more_lines(&client);
}

/// A pre-settled delivery is written but gets no Disposition, and its credit still comes
/// back: with credit 2, six pre-settled deliveries and then two unsettled ones all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_settled_deliveries_are_written_without_a_disposition_and_credit_keeps_flowing() {
    let server = Server::start().await;
    let client = server.client("credit = 2");
    let mut conn = server.accept(2, None).await;
    let mut presettled = Vec::new();
    let mut unsettled = Vec::new();
    for n in 0..8 {
        let kind = if n < 6 {
            Kind::PreSettled
        } else {
            Kind::Unsettled
        };
        let id = conn
            .deliver(&message(&format!("m-{n}"), &json_body(n)), 1, kind)
            .await;
        conn.flush().await;
        match kind {
            Kind::PreSettled => presettled.push(id),
            Kind::Unsettled => unsettled.push(id),
        }
    }
    let got = lines(&client, 8);
    for (n, line) in got.iter().enumerate() {
        assert_line(line, &format!("m-{n}"), n);
    }
    // They are accepted in order, so a Disposition for a pre-settled one would come first.
    conn.wait_settled(unsettled.iter().copied()).await;
    conn.assert_all_accepted();
    let settled = conn.settled_ids();
    for id in &presettled {
        assert!(
            !settled.contains(id),
            "pre-settled delivery {id} got a Disposition: {settled:?}"
        );
    }
}

/// With credit 5 and stdout not read, the client's Flows never let more than 5 deliveries be
/// outstanding (checked on every Flow by the server), the credit is used to the full, and no
/// more arrives; once stdout is read, every message is written, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_what_is_outstanding_while_the_output_is_blocked() {
    const TOTAL: usize = 30;
    let server = Server::start().await;
    let (client, stdout) = server.client_unread("credit = 5");
    let mut conn = server.accept(5, None).await;
    // 40 KB lines: two of them fill the 64 KiB pipe nobody reads.
    let pad = "x".repeat(40_000);
    let body = |n: usize| format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
    let mut next = 0;
    // Send whatever the credit allows until the client holds 5, grants nothing, and has been
    // quiet for a second: the output is blocked.
    let deadline = Instant::now() + T;
    loop {
        while conn.credit_left() > 0 && next < TOTAL {
            conn.deliver(
                &message(&format!("c-{next}"), &body(next)),
                1,
                Kind::Unsettled,
            )
            .await;
            next += 1;
        }
        conn.flush().await;
        let quiet = conn
            .frame_by(Instant::now() + Duration::from_secs(1))
            .await
            .is_none();
        if quiet && conn.unsettled.len() == 5 && conn.credit_left() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline && !conn.closed,
            "the client never held 5 with no credit left: {} unsettled, {} credit, {next} sent",
            conn.unsettled.len(),
            conn.credit_left()
        );
    }
    assert!(next < TOTAL, "the output never blocked: all {TOTAL} sent");

    // Unblock: read stdout on a thread, and send the rest as credit comes.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while next < TOTAL {
        conn.deliver(
            &message(&format!("c-{next}"), &body(next)),
            1,
            Kind::Unsettled,
        )
        .await;
        conn.flush().await;
        next += 1;
    }
    conn.wait_settled(0..TOTAL as u32).await;
    conn.assert_all_accepted();
    for n in 0..TOTAL {
        let line = rx.recv_timeout(T).unwrap_or_else(|_| {
            panic!(
                "line {n} of {TOTAL} not written; stderr:\n{}",
                client.stderr()
            )
        });
        let line: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["messageId"], format!("c-{n}"));
        assert_eq!(line["body"]["n"], n);
        assert_eq!(line["body"]["pad"].as_str().map(str::len), Some(40_000));
    }
}

/// A Flow from the server with echo set is answered with the client's Flow, which does not
/// ask for an echo back (that would ping-pong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_flow_gets_a_flow_back() {
    let server = Server::start().await;
    let _client = server.client("credit = 10");
    let mut conn = server.accept(10, None).await;
    let before = conn.flows.len();
    conn.put(&Flow {
        next_incoming_id: Some(0),
        incoming_window: 1 << 16,
        next_outgoing_id: 0,
        outgoing_window: 1 << 16,
        handle: Some(0u32.into()),
        delivery_count: Some(0),
        link_credit: Some(10),
        available: Some(0),
        drain: false,
        echo: true,
        properties: None,
    });
    conn.flush().await;
    // Nothing else makes this client send a Flow now: no delivery was sent.
    let deadline = Instant::now() + T;
    while conn.flows.len() == before {
        let frame = conn.frame_by(deadline).await;
        assert!(frame.is_some(), "no Flow answered the echo within {T:?}");
    }
    let answer = conn.flows.last().unwrap();
    assert!(!answer.echo, "{answer:?}");
    assert_eq!(answer.handle, Some(0u32.into()));
    assert_eq!(answer.link_credit, Some(10));
}

/// The server's Open says idle-time-out 2000 ms and then it sends nothing: the client must be
/// heard from within those 2 s, every time (it aims at every 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sends_heartbeats_within_the_servers_idle_timeout() {
    let server = Server::start().await;
    // Its own idle-time-out (60 s) is not what sets the pace here.
    let client = server.client("idle_timeout = \"60s\"");
    let mut conn = server.accept(200, Some(2000)).await;
    assert_eq!(conn.client_idle_ms, Some(60_000));
    let start = Instant::now();
    let end = start + Duration::from_secs(6);
    let mut heard = vec![start];
    while conn.frame_by(end).await.is_some() {
        heard.push(Instant::now());
    }
    heard.push(end);
    let gaps: Vec<u128> = heard
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    let longest = gaps.iter().max().copied().unwrap_or(0);
    assert!(
        longest < 2000,
        "the client was silent for {longest} ms (gaps in ms: {gaps:?}); stderr:\n{}",
        client.stderr()
    );
}

/// A server that goes silent (socket open, nothing sent) is reported as a silent peer after
/// twice the client's own idle-time-out (3 s here: 6 s, told apart from 3 s and 9 s), and the
/// client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_detected_after_twice_the_idle_timeout_and_the_client_reconnects() {
    let server = Server::start().await;
    let client = server.client("idle_timeout = \"3s\"");
    let silent = server.accept(200, None).await;
    assert_eq!(silent.client_idle_ms, Some(3000));
    let quiet_since = silent.last_write;
    // Kept open, and unread: from here on the server says nothing at all.
    let mut again = server.accept(200, None).await;
    let after = quiet_since.elapsed();
    wait_stderr(&client, "the peer is silent");
    assert!(
        after >= Duration::from_millis(5900) && after <= Duration::from_millis(8500),
        "reconnected {after:?} after the server went silent; expected about 6 s; stderr:\n{}",
        client.stderr()
    );
    // The new connection works.
    let id = again
        .deliver(&message("after-silence", &json_body(7)), 1, Kind::Unsettled)
        .await;
    again.flush().await;
    assert_line(&lines(&client, 1)[0], "after-silence", 7);
    again.wait_settled([id]).await;
    drop(silent);
}

/// A Close with an error right after some deliveries: the client logs the condition and the
/// description verbatim and reconnects; what it had not accepted is sent again and written,
/// so nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_with_an_error_is_logged_verbatim_and_unaccepted_deliveries_come_back() {
    let server = Server::start().await;
    let client = server.client("credit = 10");
    let mut first = server.accept(10, None).await;
    let a = first
        .deliver(&message("a", &json_body(0)), 1, Kind::Unsettled)
        .await;
    let b = first
        .deliver(&message("b", &json_body(1)), 1, Kind::Unsettled)
        .await;
    first.flush().await;
    first.wait_settled([a, b]).await;
    // Two more and the Close in one write: the client cannot accept them before it reads it.
    let c = first
        .deliver(&message("c", &json_body(2)), 1, Kind::Unsettled)
        .await;
    let d = first
        .deliver(&message("d", &json_body(3)), 1, Kind::Unsettled)
        .await;
    first.put(&Close {
        error: Some(definitions::Error::new(
            ConnectionError::ConnectionForced,
            Some("9602 test".to_string()),
            None,
        )),
    });
    first.flush().await;
    // Whatever the client still says before it drops the connection counts.
    let until = Instant::now() + Duration::from_millis(500);
    while first.frame_by(until).await.is_some() {}
    let resend: Vec<(u32, &str, usize)> = [(c, "c", 2), (d, "d", 3)]
        .into_iter()
        .filter(|(id, _, _)| first.unsettled.contains(id))
        .collect();
    assert!(
        !resend.is_empty(),
        "both were accepted before the Close: nothing to check"
    );

    wait_stderr(
        &client,
        "server closed the connection: amqp:connection:forced: 9602 test",
    );
    let mut second = server.accept(10, None).await;
    let mut ids = Vec::new();
    for (_, mid, n) in &resend {
        ids.push(
            second
                .deliver(&message(mid, &json_body(*n)), 1, Kind::Unsettled)
                .await,
        );
    }
    second.flush().await;
    second.wait_settled(ids).await;
    second.assert_all_accepted();
    // Each of the four written exactly once (a repeat of one already written is suppressed).
    let mut written: Vec<String> = lines(&client, 4)
        .iter()
        .map(|l| l["messageId"].as_str().unwrap().to_string())
        .collect();
    written.sort();
    assert_eq!(written, ["a", "b", "c", "d"]);
    no_more_lines(&client);
    drop(first);
}

/// Deliveries accepted together are settled with ranges (first..last), not one Disposition
/// per delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispositions_for_consecutive_ids_are_ranges() {
    const N: u32 = 10;
    let server = Server::start().await;
    let client = server.client("credit = 20");
    let mut conn = server.accept(20, None).await;
    // All in one write, so they arrive together.
    for n in 0..N as usize {
        conn.deliver(
            &message(&format!("r-{n}"), &json_body(n)),
            1,
            Kind::Unsettled,
        )
        .await;
    }
    conn.flush().await;
    let got = lines(&client, N as usize);
    for (n, line) in got.iter().enumerate() {
        assert_line(line, &format!("r-{n}"), n);
    }
    conn.wait_settled(0..N).await;
    conn.assert_all_accepted();
    let mut settled = conn.settled_ids();
    settled.sort_unstable();
    assert_eq!(
        settled,
        (0..N).collect::<Vec<_>>(),
        "each settled exactly once"
    );
    let ranges: Vec<(u32, Option<u32>)> = conn
        .dispositions
        .iter()
        .map(|d| (d.first, d.last))
        .collect();
    assert!(
        ranges.len() < N as usize
            && ranges
                .iter()
                .any(|(first, last)| last.is_some_and(|l| l > *first)),
        "one Disposition per delivery: {ranges:?}"
    );
}
