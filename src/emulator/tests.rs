//! Tests of the emulator, driven by a real fe2o3 client over TLS in-process (plus a few
//! unit tests of the login check and the backlog).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::connection::{ConnectionHandle, OpenError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::{self, AmqpError, ConnectionError, ErrorCondition};
use fe2o3_amqp::types::messaging::{Data, MessageId};
use fe2o3_amqp::types::primitives::SimpleValue;
use fe2o3_amqp::types::sasl::SaslCode;
use fe2o3_amqp::{Connection, Delivery, Receiver, Sender, Session};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::backlog::{Backlog, Settled};
use super::sasl::Authenticator;
use super::*;
use crate::cloud::alibaba::{sign, AuthMode, LoginParams, SignMethod};
use crate::cloud::SaslCredentials;
use crate::secret::Secret;

const AK_ID: &str = "LTAItestKey";
const AK_SECRET: &str = "ak-secret-value";
const STS_ID: &str = "STS.NTtestKey";
const STS_SECRET: &str = "sts-secret-value";
const STS_TOKEN: &str = "CAIS.token/+=abc";
const GROUP: &str = "DEFAULT_GROUP";
/// Upper bound for any single step of a test.
const STEP: Duration = Duration::from_secs(5);

fn config() -> EmulatorConfig {
    EmulatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        access_keys: vec![(AK_ID.into(), Secret::new(AK_SECRET))],
        sts_tokens: vec![StsToken {
            access_key_id: STS_ID.into(),
            access_key_secret: Secret::new(STS_SECRET),
            token: Secret::new(STS_TOKEN),
            expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
        }],
        consumer_group_id: Some(GROUP.into()),
        attach_deadline: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(10),
        redelivery_delay: Duration::from_millis(200),
        ..EmulatorConfig::default()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn login(mode: AuthMode, method: SignMethod, secret: &str) -> SaslCredentials {
    let params = LoginParams {
        client_id: "emulator-test".into(),
        iot_instance_id: Some("iot-06z00test".into()),
        consumer_group_id: GROUP.into(),
        auth_mode: mode,
        sign_method: method,
        access_key_id: match mode {
            AuthMode::Aksign => AK_ID.into(),
            AuthMode::Ststoken => STS_ID.into(),
        },
        access_key_secret: Secret::new(secret),
        security_token: Some(Secret::new(STS_TOKEN)),
    };
    sign(&params, now_ms())
}

fn good_login() -> SaslCredentials {
    login(AuthMode::Aksign, SignMethod::Hmacsha1, AK_SECRET)
}

fn message(i: usize) -> DeviceMessage {
    DeviceMessage {
        topic: format!("/a1Test/dev{i}/thing/event/property/post"),
        message_id: format!("{}", 1_500_000_000_000_000_000u64 + i as u64),
        generate_time: 1_714_528_800_000 + i as i64,
        body: format!("{{\"n\":{i}}}").into_bytes(),
        extra_properties: vec![("qos".into(), ExtraValue::Int(1))],
    }
}

fn publish_n(emu: &Emulator, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let m = message(i);
            let id = m.message_id.clone();
            emu.publish(m);
            id
        })
        .collect()
}

fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

/// Opens a connection the way `iot-sub` does: TCP, TLS straight away, then fe2o3 on the stream.
/// `idle_ms` is the builder value (fe2o3 halves it on the wire).
async fn open_with(
    emu: &Emulator,
    creds: &SaslCredentials,
    idle_ms: Option<u32>,
    max_frame: Option<u32>,
) -> Result<ConnectionHandle<()>, OpenError> {
    let tcp = TcpStream::connect(emu.local_addr()).await?;
    tcp.set_nodelay(true)?;
    let tls = connector(emu.ca_pem())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut b = Connection::builder()
        .container_id("emulator-test")
        .sasl_profile(SaslProfile::Plain {
            username: creds.username.clone(),
            password: creds.password.expose().to_string(),
        });
    if let Some(ms) = idle_ms {
        b = b.idle_time_out(ms);
    }
    if let Some(n) = max_frame {
        b = b.max_frame_size(n);
    }
    tokio::time::timeout(STEP, b.open_with_stream(tls))
        .await
        .expect("open timed out")
}

struct Client {
    conn: ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    receiver: Receiver,
}

async fn attach(emu: &Emulator, creds: &SaslCredentials) -> Client {
    attach_with(emu, creds, None).await
}

async fn attach_with(emu: &Emulator, creds: &SaslCredentials, max_frame: Option<u32>) -> Client {
    let mut conn = open_with(emu, creds, Some(120_000), max_frame)
        .await
        .expect("open");
    let mut session = tokio::time::timeout(STEP, Session::begin(&mut conn))
        .await
        .expect("begin timed out")
        .expect("begin");
    let receiver =
        tokio::time::timeout(STEP, Receiver::attach(&mut session, "receiver", "default"))
            .await
            .expect("attach timed out")
            .expect("attach");
    Client {
        conn,
        session,
        receiver,
    }
}

async fn recv(client: &mut Client) -> Delivery<Data> {
    tokio::time::timeout(STEP, client.receiver.recv::<Data>())
        .await
        .expect("recv timed out")
        .expect("recv")
}

fn message_id_of(d: &Delivery<Data>) -> String {
    match d
        .message()
        .application_properties
        .as_ref()
        .and_then(|p| p.get("messageId"))
    {
        Some(SimpleValue::String(s)) => s.clone(),
        Some(SimpleValue::Long(n)) => n.to_string(),
        other => panic!("messageId missing or of an unexpected type: {other:?}"),
    }
}

/// The error a connection was closed with right after Open, seen by the client.
/// (Only `on_close`: a `Session::begin` racing the Close can hang inside fe2o3.)
async fn close_error(conn: &mut ConnectionHandle<()>) -> definitions::Error {
    match tokio::time::timeout(STEP, conn.on_close()).await {
        Ok(Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(e))) => e,
        other => panic!("expected a close with an error, got {other:?}"),
    }
}

/// Waits until a condition on the emulator holds (the emulator settles asynchronously).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// No message is lost: each published id is accepted (once) or still pending, never both.
fn assert_no_loss(emu: &Emulator, published: &[String]) {
    let accepted = emu.accepted_ids();
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    assert_eq!(
        accepted.len(),
        accepted_set.len(),
        "an id was accepted twice"
    );
    let pending: HashSet<String> = emu.pending_ids().into_iter().collect();
    for id in published {
        let a = accepted_set.contains(id);
        let p = pending.contains(id);
        assert!(a ^ p, "message {id}: accepted={a} pending={p}");
    }
}

// ---------------------------------------------------------------------------------------------
// Login

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_logins_for_every_sign_method_and_auth_mode() {
    let emu = Emulator::start(config()).await.unwrap();
    let mut n = 0;
    for mode in [AuthMode::Aksign, AuthMode::Ststoken] {
        for method in [
            SignMethod::Hmacmd5,
            SignMethod::Hmacsha1,
            SignMethod::Hmacsha256,
        ] {
            let secret = if mode == AuthMode::Aksign {
                AK_SECRET
            } else {
                STS_SECRET
            };
            let mut client = attach(&emu, &login(mode, method, secret)).await;
            emu.publish(message(n));
            let d = recv(&mut client).await;
            assert_eq!(message_id_of(&d), message(n).message_id);
            client.receiver.accept(&d).await.unwrap();
            n += 1;
            assert!(emu.wait_accepted(n, STEP).await, "{mode:?}/{method:?}");
            // The builder's 120 000 goes out halved, decoded off the wire by the emulator.
            assert_eq!(emu.last_open_idle_timeout_ms(), Some(60_000));
            client.receiver.close().await.unwrap();
            client.session.end().await.unwrap();
            client.conn.close().await.unwrap();
        }
    }
    let s = emu.stats();
    assert_eq!(s.logins_failed, 0);
    assert_eq!(s.accepted, 6);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secret_is_refused_with_a_sasl_outcome() {
    let emu = Emulator::start(config()).await.unwrap();
    let creds = login(AuthMode::Aksign, SignMethod::Hmacsha256, "wrong-secret");
    match open_with(&emu, &creds, Some(120_000), None).await {
        Err(OpenError::SaslError { code, .. }) => assert_eq!(code, SaslCode::Auth),
        other => panic!("expected a SASL auth failure, got {other:?}"),
    }
    assert_eq!(emu.stats().logins_failed, 1);
    assert_eq!(emu.stats().live_connections, 0);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secret_is_refused_with_a_close_in_the_other_mode() {
    let emu = Emulator::start(EmulatorConfig {
        auth_failure: AuthFailure::CloseUnauthorized,
        ..config()
    })
    .await
    .unwrap();
    let creds = login(AuthMode::Ststoken, SignMethod::Hmacsha1, "wrong-secret");
    let mut conn = open_with(&emu, &creds, Some(120_000), None)
        .await
        .expect("SASL completes in this mode");
    let e = close_error(&mut conn).await;
    assert_eq!(
        e.condition,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
    );
    let description = e.description.unwrap_or_default();
    assert!(description.contains("signature mismatch"), "{description}");
    assert!(!description.contains("wrong-secret") && !description.contains(STS_TOKEN));
    assert_eq!(emu.stats().logins_failed, 1);
    emu.shutdown().await;
}

#[test]
fn login_check_reasons() {
    let auth = Authenticator {
        access_keys: vec![(AK_ID.into(), Secret::new(AK_SECRET))],
        sts_tokens: vec![StsToken {
            access_key_id: STS_ID.into(),
            access_key_secret: Secret::new(STS_SECRET),
            token: Secret::new(STS_TOKEN),
            expires_at: Some(SystemTime::now() - Duration::from_secs(10)),
        }],
        consumer_group_id: Some(GROUP.into()),
        max_clock_skew: Some(Duration::from_secs(300)),
    };
    let now = SystemTime::now();
    let check = |c: &SaslCredentials| auth.check(&c.username, c.password.expose(), now);

    let ok = check(&good_login()).expect("good login");
    assert_eq!(ok.consumer_group_id, GROUP);
    assert_eq!(ok.auth_id, AK_ID);

    // signMethod is matched case-insensitively (the Go sample sends `Hmacsha1`).
    let c = good_login();
    let upper = c
        .username
        .replace("signMethod=hmacsha1", "signMethod=Hmacsha1");
    assert!(auth.check(&upper, c.password.expose(), now).is_ok());

    let reason = |r: Result<_, sasl::Refusal>| r.expect_err("refused").reason;
    assert!(
        reason(check(&login(AuthMode::Aksign, SignMethod::Hmacmd5, "bad")))
            .contains("signature mismatch")
    );
    assert!(reason(check(&login(
        AuthMode::Ststoken,
        SignMethod::Hmacmd5,
        STS_SECRET
    )))
    .contains("expired"));

    let c = good_login();
    let other_group = c.username.replace(GROUP, "OTHER_GROUP");
    assert!(reason(auth.check(&other_group, c.password.expose(), now)).contains("OTHER_GROUP"));
    let no_mode = c.username.replace("authMode=aksign,", "");
    assert!(reason(auth.check(&no_mode, c.password.expose(), now)).contains("authMode"));
    let unknown = c.username.replace(AK_ID, "LTAIunknown");
    assert!(reason(auth.check(&unknown, c.password.expose(), now)).contains("unknown AccessKey"));
    let old = c.username.replace(
        &format!(
            "timestamp={}",
            &c.username.split("timestamp=").nth(1).unwrap()[..13]
        ),
        "timestamp=1573489088171",
    );
    assert!(reason(auth.check(&old, c.password.expose(), now)).contains("from the emulator clock"));
    assert!(reason(auth.check("no-bars", "x", now)).contains("malformed username"));

    // Without a window, any timestamp is fine (Aliyun documents none).
    let lax = Authenticator {
        max_clock_skew: None,
        ..auth
    };
    let p = LoginParams {
        client_id: "c".into(),
        iot_instance_id: None,
        consumer_group_id: GROUP.into(),
        auth_mode: AuthMode::Aksign,
        sign_method: SignMethod::Hmacsha256,
        access_key_id: AK_ID.into(),
        access_key_secret: Secret::new(AK_SECRET),
        security_token: None,
    };
    let c = sign(&p, 1_573_489_088_171);
    assert!(lax.check(&c.username, c.password.expose(), now).is_ok());

    // A token that does not match the issued one.
    let mut p2 = p.clone();
    p2.auth_mode = AuthMode::Ststoken;
    p2.access_key_id = STS_ID.into();
    p2.access_key_secret = Secret::new(STS_SECRET);
    p2.security_token = Some(Secret::new("another-token"));
    let c = sign(&p2, 1);
    let r = reason(lax.check(&c.username, c.password.expose(), now));
    assert!(
        r.contains("securityToken does not match") && !r.contains("another-token"),
        "{r}"
    );
}

// ---------------------------------------------------------------------------------------------
// Transport and Open checks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_never_gets_amqp() {
    let emu = Emulator::start(config()).await.unwrap();
    let mut tcp = TcpStream::connect(emu.local_addr()).await.unwrap();
    tcp.write_all(b"AMQP\x03\x01\x00\x00").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(STEP, tcp.read_to_end(&mut buf))
        .await
        .expect("server hung up");
    // Either an error, EOF, or a TLS alert: never an AMQP protocol header.
    if read.is_ok() {
        assert!(!buf.starts_with(b"AMQP"), "got {buf:?}");
    }
    eventually("the TLS failure", || emu.stats().connections_accepted == 1).await;
    assert_eq!(emu.stats().live_connections, 0);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_time_out_outside_the_range_is_refused() {
    let emu = Emulator::start(config()).await.unwrap();
    // 20 000 in the builder = 10 000 on the wire.
    let mut conn = open_with(&emu, &good_login(), Some(20_000), None)
        .await
        .unwrap();
    let e = close_error(&mut conn).await;
    assert_eq!(
        e.condition,
        ErrorCondition::ConnectionError(ConnectionError::ConnectionForced)
    );
    assert_eq!(
        e.description.as_deref(),
        Some("9601: idle-time-out 10000 outside 30000..300000 ms")
    );
    assert_eq!(emu.last_open_idle_timeout_ms(), Some(10_000));

    let mut conn = open_with(&emu, &good_login(), None, None).await.unwrap();
    let e = close_error(&mut conn).await;
    assert!(e
        .description
        .unwrap_or_default()
        .starts_with("9601: idle-time-out missing"));
    assert_eq!(emu.last_open_idle_timeout_ms(), None);

    // The bounds are inclusive: 60 000 in the builder is exactly 30 000 on the wire.
    let mut client = attach(&emu, &good_login()).await;
    client.conn.close().await.unwrap();
    let mut conn = open_with(&emu, &good_login(), Some(60_000), None)
        .await
        .unwrap();
    // Both peers send Open at once, so the emulator may read the client's Open just after
    // the client's open() returns; any later reply (Begin) orders it.
    let _session = Session::begin(&mut conn).await.unwrap();
    assert_eq!(emu.last_open_idle_timeout_ms(), Some(30_000));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_must_attach_before_the_deadline() {
    let emu = Emulator::start(EmulatorConfig {
        attach_deadline: Duration::from_millis(300),
        ..config()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut conn = open_with(&emu, &good_login(), Some(120_000), None)
        .await
        .unwrap();
    let _session = Session::begin(&mut conn).await.unwrap();
    match tokio::time::timeout(STEP, conn.on_close()).await {
        Ok(Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(e))) => {
            assert_eq!(
                e.description.as_deref(),
                Some("receiver link not attached within 300 ms")
            );
        }
        other => panic!("expected the attach deadline close, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(emu.stats().closed_attach_deadline, 1);

    // Attached in time: the deadline no longer applies.
    let mut client = attach(&emu, &good_login()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    emu.publish(message(1));
    let d = recv(&mut client).await;
    client.receiver.accept(&d).await.unwrap();
    assert_eq!(emu.stats().closed_attach_deadline, 1);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_in_a_group_are_refused() {
    let emu = Emulator::start(EmulatorConfig {
        max_connections: 1,
        ..config()
    })
    .await
    .unwrap();
    let _first = attach(&emu, &good_login()).await;
    eventually("one live connection", || emu.stats().live_connections == 1).await;
    let mut second = open_with(&emu, &good_login(), Some(120_000), None)
        .await
        .unwrap();
    let e = close_error(&mut second).await;
    assert!(e.description.unwrap_or_default().starts_with("9600:"));
    assert_eq!(emu.stats().live_connections, 1);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_for_idleness() {
    let emu = Emulator::start(config()).await.unwrap();
    // The real limit is the client's idle-time-out (>= 30 s); shorten it for the test.
    emu.set_idle_override(Some(Duration::from_millis(300)));
    let mut client = attach(&emu, &good_login()).await;
    // The emulator advertises no idle-time-out, so fe2o3 sends no heartbeats: silence.
    let err = tokio::time::timeout(STEP, client.receiver.recv::<Data>())
        .await
        .expect("closed in time")
        .expect_err("connection closed");
    assert!(format!("{err:?}").contains("idle-time-out"), "{err:?}");
    assert_eq!(emu.stats().closed_idle, 1);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_traffic_keeps_a_quiet_connection_alive() {
    let emu = Emulator::start(config()).await.unwrap();
    emu.set_idle_override(Some(Duration::from_millis(400)));
    let mut client = attach(&emu, &good_login()).await;
    // What iot-sub does against a server that advertises no idle-time-out: a Flow now and then.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.receiver.set_credit(200).await.unwrap();
    }
    emu.publish(message(1));
    let d = recv(&mut client).await;
    client.receiver.accept(&d).await.unwrap();
    let s = emu.stats();
    assert_eq!((s.closed_idle, s.live_connections), (0, 1));
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Links

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_receiver_and_no_sender_per_connection() {
    let emu = Emulator::start(config()).await.unwrap();
    let mut client = attach(&emu, &good_login()).await;

    let refused = |r: String| assert!(r.contains("NotAllowed"), "{r}");
    match Receiver::attach(&mut client.session, "second", "default").await {
        Err(e) => refused(format!("{e:?}")),
        Ok(mut second) => refused(format!(
            "{:?}",
            tokio::time::timeout(STEP, second.recv::<Data>())
                .await
                .expect("detached in time")
        )),
    }
    match Sender::attach(&mut client.session, "sender", "default").await {
        Err(e) => refused(format!("{e:?}")),
        Ok(mut sender) => {
            let r = tokio::time::timeout(STEP, sender.send("hello"))
                .await
                .expect("detached in time");
            refused(format!("{r:?}"));
        }
    }
    eventually("two refused links", || emu.stats().refused_links == 2).await;

    // The first receiver still works.
    emu.publish(message(7));
    let d = recv(&mut client).await;
    assert_eq!(message_id_of(&d), message(7).message_id);
    client.receiver.accept(&d).await.unwrap();
    assert!(emu.wait_accepted(1, STEP).await);
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Delivery and settlement

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_delivered_as_aliyun_sends_them() {
    let emu = Emulator::start(config()).await.unwrap();
    let mut client = attach(&emu, &good_login()).await;
    let mut m = message(3);
    m.body = vec![0, 159, 146, 150, 0, 255];
    m.extra_properties
        .push(("tag".into(), ExtraValue::String("t1".into())));
    m.extra_properties
        .push(("raw".into(), ExtraValue::Binary(vec![1, 0, 2])));
    emu.publish(m.clone());
    let d = recv(&mut client).await;
    let props = d.message().application_properties.as_ref().unwrap();
    assert_eq!(
        props.get("topic"),
        Some(&SimpleValue::String(m.topic.clone()))
    );
    assert_eq!(
        props.get("messageId"),
        Some(&SimpleValue::String(m.message_id.clone()))
    );
    assert_eq!(
        props.get("generateTime"),
        Some(&SimpleValue::Long(m.generate_time))
    );
    assert_eq!(props.get("qos"), Some(&SimpleValue::Int(1)));
    assert_eq!(props.get("tag"), Some(&SimpleValue::String("t1".into())));
    assert!(matches!(props.get("raw"), Some(SimpleValue::Binary(b)) if b.as_slice() == [1, 0, 2]));
    let message_id = d
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    assert_eq!(message_id, Some(MessageId::String(m.message_id.clone())));
    assert_eq!(d.body().0.as_slice(), m.body.as_slice());
    client.receiver.accept(&d).await.unwrap();
    emu.shutdown().await;

    // messageId as a long.
    let emu = Emulator::start(EmulatorConfig {
        message_id_as_long: true,
        ..config()
    })
    .await
    .unwrap();
    let mut client = attach(&emu, &good_login()).await;
    emu.publish(message(4));
    let d = recv(&mut client).await;
    let n: i64 = message(4).message_id.parse().unwrap();
    let props = d.message().application_properties.as_ref().unwrap();
    assert_eq!(props.get("messageId"), Some(&SimpleValue::Long(n)));
    let message_id = d
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    assert_eq!(message_id, Some(MessageId::Ulong(n as u64)));
    client.receiver.accept(&d).await.unwrap();
    assert!(emu.wait_accepted(1, STEP).await);
    assert_eq!(emu.accepted_ids(), vec![message(4).message_id]);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_are_delivered_and_accepted() {
    const N: usize = 500;
    let emu = Emulator::start(config()).await.unwrap();
    let published = publish_n(&emu, N);
    let mut client = attach(&emu, &good_login()).await;
    let mut got = Vec::new();
    for _ in 0..N {
        let d = recv(&mut client).await;
        got.push(message_id_of(&d));
        client.receiver.accept(&d).await.unwrap();
    }
    assert!(emu.wait_accepted(N, STEP).await);
    assert_eq!(got, published, "in publish order without reorder injection");
    assert_eq!(emu.accepted_ids(), published, "in acceptance order");
    let s = emu.stats();
    assert_eq!(
        (s.accepted, s.transfers_sent, s.backlog, s.in_flight),
        (N as u64, N as u64, 0, 0)
    );
    assert!(emu.delivery_counts().values().all(|n| *n == 1));
    assert_no_loss(&emu, &published);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_split_over_small_frames() {
    let emu = Emulator::start(config()).await.unwrap();
    let mut client = attach_with(&emu, &good_login(), Some(8192)).await;
    let mut m = message(9);
    m.body = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    emu.publish(m.clone());
    let d = recv(&mut client).await;
    assert_eq!(d.body().0.len(), m.body.len());
    assert_eq!(d.body().0.as_slice(), m.body.as_slice());
    client.receiver.accept(&d).await.unwrap();
    assert!(emu.wait_accepted(1, STEP).await);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_and_rejected_messages_come_back_after_the_delay() {
    let emu = Emulator::start(EmulatorConfig {
        redelivery_delay: Duration::from_millis(300),
        ..config()
    })
    .await
    .unwrap();
    let published = publish_n(&emu, 3);
    let mut client = attach(&emu, &good_login()).await;
    let first = recv(&mut client).await;
    let second = recv(&mut client).await;
    let third = recv(&mut client).await;
    let sent_back = std::time::Instant::now();
    client.receiver.release(&first).await.unwrap();
    client.receiver.reject(&second, None).await.unwrap();
    client.receiver.accept(&third).await.unwrap();

    let mut again = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut client).await;
        again.push(message_id_of(&d));
        client.receiver.accept(&d).await.unwrap();
    }
    assert!(
        sent_back.elapsed() >= Duration::from_millis(250),
        "not before the delay"
    );
    again.sort();
    assert_eq!(again, published[..2].to_vec());
    assert!(emu.wait_accepted(3, STEP).await);
    let s = emu.stats();
    assert_eq!((s.released, s.rejected, s.accepted), (1, 1, 3));
    let counts = emu.delivery_counts();
    assert_eq!(
        (
            counts[&published[0]],
            counts[&published[1]],
            counts[&published[2]]
        ),
        (2, 2, 1)
    );
    assert_no_loss(&emu, &published);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_deliveries_time_out_and_come_back() {
    let emu = Emulator::start(EmulatorConfig {
        ack_timeout: Duration::from_millis(300),
        redelivery_delay: Duration::from_millis(100),
        ..config()
    })
    .await
    .unwrap();
    let published = publish_n(&emu, 1);
    let mut client = attach(&emu, &good_login()).await;
    let first = recv(&mut client).await;
    let again = recv(&mut client).await; // no outcome sent for `first`
    assert_eq!(message_id_of(&first), message_id_of(&again));
    client.receiver.accept(&again).await.unwrap();
    assert!(emu.wait_accepted(1, STEP).await);
    assert!(emu.stats().timed_out >= 1);
    assert_no_loss(&emu, &published);
    emu.shutdown().await;
}

async fn drop_mid_stream(how: Drop) {
    const N: usize = 20;
    let emu = Emulator::start(config()).await.unwrap();
    let published = publish_n(&emu, N);
    let mut client = attach(&emu, &good_login()).await;
    let mut accepted = Vec::new();
    for i in 0..10 {
        let d = recv(&mut client).await;
        if i < 5 {
            client.receiver.accept(&d).await.unwrap();
            accepted.push(message_id_of(&d));
        }
    }
    assert!(emu.wait_accepted(5, STEP).await);
    emu.drop_connections(how.clone());

    // The client drains what was already transferred, then sees the connection go.
    let err = loop {
        match tokio::time::timeout(STEP, client.receiver.recv::<Data>())
            .await
            .expect("recv")
        {
            Ok(_) => continue,
            Err(e) => break format!("{e:?}"),
        }
    };
    match &how {
        Drop::ServerClose => assert!(err.contains("9602"), "{err}"),
        Drop::TcpReset => assert!(
            !err.contains("RemoteClosed"),
            "no Close frame on a reset: {err}"
        ),
        Drop::Close { description, .. } => assert!(err.contains(description.as_str()), "{err}"),
    }
    if how == Drop::TcpReset {
        let closed = tokio::time::timeout(STEP, client.conn.on_close())
            .await
            .expect("closed");
        assert!(!matches!(
            closed,
            Err(fe2o3_amqp::connection::Error::RemoteClosedWithError(_))
        ));
    }
    eventually("the dropped connection torn down", || {
        let s = emu.stats();
        s.live_connections == 0 && s.in_flight == 0
    })
    .await;
    // Every unaccepted message is back in the backlog; the accepted ones stay accepted.
    assert_eq!(emu.stats().backlog, N - 5);
    assert_no_loss(&emu, &published);

    let mut client = attach(&emu, &good_login()).await;
    for _ in 0..N - 5 {
        let d = recv(&mut client).await;
        assert!(
            !accepted.contains(&message_id_of(&d)),
            "an accepted message came back"
        );
        client.receiver.accept(&d).await.unwrap();
    }
    assert!(emu.wait_accepted(N, STEP).await);
    let mut all = emu.accepted_ids();
    all.sort();
    let mut want = published.clone();
    want.sort();
    assert_eq!(all, want);
    assert_no_loss(&emu, &published);
    let counts = emu.delivery_counts();
    assert!(accepted.iter().all(|id| counts[id] == 1));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_close_mid_stream_redelivers_unaccepted_on_a_new_connection() {
    drop_mid_stream(Drop::ServerClose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_reset_mid_stream_redelivers_unaccepted_on_a_new_connection() {
    drop_mid_stream(Drop::TcpReset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_sent_twice_but_accepted_once() {
    let emu = Emulator::start(config()).await.unwrap();
    emu.set_duplicate_probability(1.0);
    let published = publish_n(&emu, 5);
    let mut client = attach(&emu, &good_login()).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let d = recv(&mut client).await;
        ids.push(message_id_of(&d));
        client.receiver.accept(&d).await.unwrap();
    }
    assert!(emu.wait_accepted(5, STEP).await);
    eventually("both copies settled", || emu.stats().in_flight == 0).await;
    assert_eq!(emu.accepted_ids(), published);
    assert!(published.iter().all(|id| emu.delivery_counts()[id] == 2));
    assert!(published
        .iter()
        .all(|id| ids.iter().filter(|x| *x == id).count() == 2));
    assert_eq!(emu.stats().backlog, 0);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorder_shuffles_small_windows() {
    let emu = Emulator::start(config()).await.unwrap();
    emu.set_reorder(true);
    let published = publish_n(&emu, 60);
    let mut client = attach(&emu, &good_login()).await;
    let mut got = Vec::new();
    for _ in 0..60 {
        let d = recv(&mut client).await;
        got.push(message_id_of(&d));
        client.receiver.accept(&d).await.unwrap();
    }
    assert_ne!(got, published);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, published, "same messages, each once");
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Backlog invariant without the network

#[tokio::test]
async fn backlog_never_loses_a_message_across_a_drop() {
    let backlog = Backlog::new(Duration::ZERO, None);
    backlog.set_duplicate_probability(0.5);
    let published: Vec<String> = (0..50)
        .map(|i| {
            let m = message(i);
            let id = m.message_id.clone();
            backlog.publish(m);
            id
        })
        .collect();
    let check = |backlog: &Backlog| {
        let accepted = backlog.accepted_ids();
        let acc: HashSet<&String> = accepted.iter().collect();
        assert_eq!(acc.len(), accepted.len());
        let pending: HashSet<String> = backlog.pending_ids().into_iter().collect();
        for id in &published {
            assert!(acc.contains(id) ^ pending.contains(id), "{id}");
        }
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    // Connection 1 takes 30, settles a few different ways, then drops.
    let mut taken = Vec::new();
    for _ in 0..30 {
        taken.push(backlog.next(1, &cancel).await.unwrap());
    }
    for (i, t) in taken.iter().enumerate() {
        for s in &t.seqs {
            backlog.on_sent(*s);
        }
        let first = t.seqs[0];
        match i % 4 {
            0 => backlog.settle(first, Settled::Accepted),
            1 => backlog.settle(first, Settled::Released),
            2 => backlog.settle(first, Settled::TimedOut),
            _ => {}
        }
        check(&backlog);
    }
    backlog.requeue_connection(1);
    check(&backlog);
    assert_eq!(backlog.counters().in_flight, 0);

    // Connection 2 accepts everything that is left; nothing accepted comes back.
    let already: HashSet<String> = backlog.accepted_ids().into_iter().collect();
    backlog.set_duplicate_probability(0.0);
    while backlog.counters().backlog > 0 {
        let t = backlog.next(2, &cancel).await.unwrap();
        assert!(!already.contains(&t.msg.message_id));
        for s in t.seqs {
            backlog.settle(s, Settled::Accepted);
        }
        check(&backlog);
    }
    assert_eq!(backlog.accepted_ids().len(), 50);
    assert!(backlog.pending_ids().is_empty());
    cancel.cancel();
    assert!(backlog.next(3, &cancel).await.is_none());
}

// ---------------------------------------------------------------------------------------------
// Standalone

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_writes_the_ca_and_stops_on_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let ca_out = dir.path().join("ca.pem");
    let file = dir.path().join("msgs.jsonl");
    std::fs::write(&file, "{\"topic\":\"/a1/d1/user/x\",\"body\":{\"v\":1}}\n").unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let opts = StandaloneOptions {
        config: config(),
        ca_out: ca_out.clone(),
        rate: 500.0,
        devices: 5,
        seed: 1,
        from_file: Some(file),
        count: Some(20),
    };
    let task = tokio::spawn(run_standalone(opts, shutdown.clone()));
    eventually("the CA file", || ca_out.exists()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped in time")
        .unwrap()
        .unwrap();
    let pem = std::fs::read_to_string(&ca_out).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!pem.contains("PRIVATE KEY"));
}

#[test]
fn config_debug_shows_no_secret_or_token() {
    let shown = format!("{:?} {:#?}", config(), config());
    for secret in [AK_SECRET, STS_SECRET, STS_TOKEN] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains(AK_ID) && shown.contains(STS_ID), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_a_given_condition_mid_stream_redelivers_unaccepted() {
    drop_mid_stream(Drop::Close {
        condition: "amqp:internal-error".into(),
        description: "9399: internal error (emulated)".into(),
    })
    .await;
}
