//! TLS failures end to end through the real binary: no trusted CA, another CA, a certificate
//! for another name, an expired certificate, and a peer that does not speak TLS. Each is one
//! clear stderr line with a hint, never reaches a login, is retried with backoff by `listen`,
//! and makes `check` exit 12. And no option, flag or field turns certificate checks off.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{run, Client, World, KEY_SECRET};

const T: Duration = Duration::from_secs(20);

/// What is wrong with the server the profile points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The profile has no `ca_file`: the emulator's CA is not a trusted root.
    NoCaFile,
    /// `ca_file` is another emulator's CA.
    OtherCa,
    /// The certificate names `iot.emulator.invalid` (and the loopback IPs), not `localhost`.
    WrongName,
    /// The certificate expired a day ago.
    Expired,
    /// The port speaks plain AMQP: the ClientHello meets an AMQP protocol header.
    PlainAmqp,
}

impl Fault {
    /// What rustls says (in the error) and what the hint says (the fix).
    fn expected(self) -> (&'static str, &'static str) {
        match self {
            Fault::NoCaFile => ("UnknownIssuer", "set `ca_file`"),
            // Both emulator CAs have the same name: the other one is found and fails to verify.
            Fault::OtherCa => ("BadSignature", "is `ca_file` an old copy?"),
            Fault::WrongName => ("not valid for name \"localhost\"", "check `host`"),
            Fault::Expired => ("certificate expired", "has expired"),
            Fault::PlainAmqp => ("corrupt message", "check `port`"),
        }
    }

    /// The hint `check` prints for it.
    fn check_hint(self) -> &'static str {
        match self {
            Fault::NoCaFile => "hint: set `ca_file`",
            Fault::OtherCa => {
                "hint: the certificate is not signed by the CA of that name in `ca_file`"
            }
            Fault::WrongName => "hint: `host` is not a name in the server's certificate",
            Fault::Expired => "hint: the certificate is outside its validity period",
            Fault::PlainAmqp => "hint: the port does not speak TLS: check `port`",
        }
    }
}

/// A listener that answers every connection with the AMQP 1.0 SASL protocol header (what a
/// non-TLS AMQP broker on 5672 sends), then reads until the client goes. Counts connections.
struct PlainAmqp {
    port: u16,
    accepted: Arc<AtomicU64>,
}

impl PlainAmqp {
    fn start() -> PlainAmqp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = stream.write_all(b"AMQP\x03\x01\x00\x00");
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        PlainAmqp { port, accepted }
    }
}

/// The emulator (and whatever else the fault needs), and a profile `t` for host `localhost`.
struct Setup {
    world: World,
    _other: Option<World>,
    plain: Option<PlainAmqp>,
    config: PathBuf,
}

async fn setup(fault: Fault) -> Setup {
    let mut config = common::test_config();
    match fault {
        Fault::WrongName => config.tls_hostname = "iot.emulator.invalid".into(),
        Fault::Expired => {
            let day = Duration::from_secs(86_400);
            let now = SystemTime::now();
            config.tls_validity = Some((now - 30 * day, now - day));
        }
        _ => {}
    }
    let world = World::start_with(config).await;
    world.emulator.publish(common::json_message(1));
    let path = world.profile("backoff_initial = \"100ms\"\nbackoff_max = \"1s\"");
    let mut other = None;
    let mut plain = None;
    let text = std::fs::read_to_string(&path).unwrap();
    let ca_line = format!("ca_file = \"{}\"", world.ca.display());
    let text = match fault {
        Fault::NoCaFile => text.replace(&ca_line, ""),
        Fault::OtherCa => {
            let o = World::start().await;
            let t = text.replace(&ca_line, &format!("ca_file = \"{}\"", o.ca.display()));
            other = Some(o);
            t
        }
        Fault::PlainAmqp => {
            let p = PlainAmqp::start();
            let port_line = format!("port = {}", world.emulator.local_addr().port());
            let t = text.replace(&port_line, &format!("port = {}", p.port));
            plain = Some(p);
            t
        }
        Fault::WrongName | Fault::Expired => text,
    };
    std::fs::write(&path, text).unwrap();
    Setup {
        world,
        _other: other,
        plain,
        config: path,
    }
}

/// `retry_in` of the failure log line of `attempt`, in milliseconds.
fn retry_in_ms(stderr: &str, attempt: u64) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains(&format!("attempt={attempt} ")) && l.contains("retry_in="))
        .unwrap_or_else(|| panic!("no failure line for attempt {attempt}:\n{stderr}"));
    let value = line.split("retry_in=").nth(1).unwrap();
    let value = value.split_whitespace().next().unwrap();
    humantime::parse_duration(value)
        .unwrap_or_else(|e| panic!("retry_in `{value}`: {e}"))
        .as_millis() as u64
}

fn config_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `listen`: one line per attempt naming the problem and its fix, retried with growing
/// delays, and nothing past TLS on the server. `check`: exit 12 at the TLS step, with a hint.
async fn tls_failure_is_explained_retried_and_never_logs_in(fault: Fault) {
    let s = setup(fault).await;
    let (words, hint) = fault.expected();

    let mut client = Client::listen(&s.config, &[]);
    client.wait_stderr("TLS handshake with localhost failed", 3, T);
    client.signal("TERM");
    assert!(client.wait(T).success(), "{}", client.stderr());
    let stderr = client.stderr();
    let failures: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("TLS handshake with localhost failed"))
        .collect();
    assert!(failures.len() >= 3, "{stderr}");
    for line in &failures {
        assert!(
            line.contains("connection failed; reconnecting")
                && line.contains(words)
                && line.contains(hint),
            "{fault:?}: not `{words}` with `{hint}` on one line:\n{line}"
        );
    }
    assert!(!stderr.contains("receiver link attached"), "{stderr}");
    // Backoff: 100 ms initial, doubling with jitter in [half, full]: attempt 1 waits at most
    // 100 ms, attempt 3 at least 200 ms.
    let (first, third) = (retry_in_ms(&stderr, 1), retry_in_ms(&stderr, 3));
    assert!(first <= 100 && third >= 200, "{first} ms then {third} ms");

    let r = run(
        &["check", "--config", config_str(&s.config), "--profile", "t"],
        Some(KEY_SECRET),
        &[],
    );
    assert_eq!(r.code, 12, "{fault:?}:\n{}\n{}", r.stdout, r.stderr);
    let tls_line = r
        .stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("tls"))
        .unwrap_or_else(|| panic!("no tls step:\n{}", r.stdout));
    assert!(
        tls_line.contains("FAILED") && tls_line.contains(words),
        "{fault:?}: {tls_line}"
    );
    assert!(
        r.stdout.contains(fault.check_hint()),
        "{fault:?}:\n{}",
        r.stdout
    );
    assert!(r.stdout.contains("FAILED at step `tls` (exit 12)"));

    // The server saw TCP connections and nothing more: no TLS session, no login, no link.
    let stats = s.world.emulator.stats();
    match &s.plain {
        Some(plain) => {
            assert!(plain.accepted.load(Ordering::SeqCst) >= 4);
            assert_eq!(stats.connections_accepted, 0);
        }
        None => assert!(stats.connections_accepted >= 4, "{stats:?}"),
    }
    assert_eq!(stats.tls_established, 0, "{stats:?}");
    assert_eq!(stats.logins_failed, 0, "{stats:?}");
    assert_eq!(stats.live_connections, 0, "{stats:?}");
    assert_eq!(stats.transfers_sent, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_trusted_ca_is_refused_with_the_ca_file_hint() {
    tls_failure_is_explained_retried_and_never_logs_in(Fault::NoCaFile).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_is_refused_with_the_ca_file_hint() {
    tls_failure_is_explained_retried_and_never_logs_in(Fault::OtherCa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_with_the_host_hint() {
    tls_failure_is_explained_retried_and_never_logs_in(Fault::WrongName).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_with_the_clock_hint() {
    tls_failure_is_explained_retried_and_never_logs_in(Fault::Expired).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_amqp_port_is_refused_with_the_port_hint() {
    tls_failure_is_explained_retried_and_never_logs_in(Fault::PlainAmqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_names_the_configured_host_and_the_loopback_addresses() {
    // The control for the wrong-name case: the same certificate works for its own names.
    let mut config = common::test_config();
    config.tls_hostname = "iot.emulator.invalid".into();
    let world = World::start_with(config).await;
    let path = world.profile("");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("host = \"localhost\"", "host = \"127.0.0.1\"");
    std::fs::write(&path, text).unwrap();
    let r = run(
        &["check", "--config", config_str(&path), "--profile", "t"],
        Some(KEY_SECRET),
        &[],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(world.emulator.stats().tls_established, 1);
}

/// Names a user might try to switch certificate checks off with.
const SWITCHES: [&str; 10] = [
    "insecure = true",
    "tls_verify = false",
    "verify = false",
    "verify_certificate = false",
    "danger_accept_invalid_certs = true",
    "accept_invalid_certs = true",
    "insecure_skip_verify = true",
    "skip_verify = true",
    "tls_insecure = true",
    "tls = { verify = false }",
];

#[test]
fn no_profile_field_or_flag_turns_certificate_checks_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let base = "[profiles.t]\nhost = \"localhost\"\nport = 5671\nconsumer_group_id = \"G\"\n\
                access_key_id = \"id\"\n";
    for switch in SWITCHES {
        let field = switch.split(' ').next().unwrap();
        std::fs::write(&path, format!("{base}{switch}\n")).unwrap();
        for command in ["listen", "check"] {
            let r = run(
                &[command, "--config", config_str(&path), "--profile", "t"],
                Some(KEY_SECRET),
                &[],
            );
            assert_eq!(
                r.code, 78,
                "{command} with `{switch}`:\n{}{}",
                r.stdout, r.stderr
            );
            let said = format!("{}{}", r.stdout, r.stderr);
            assert!(
                said.contains(&format!("unknown field `{field}`")),
                "{command} with `{switch}`:\n{said}"
            );
        }
        // Outside the profile too: the file's top level takes `profiles` only.
        std::fs::write(&path, format!("{switch}\n{base}")).unwrap();
        let r = run(
            &["listen", "--config", config_str(&path), "--profile", "t"],
            Some(KEY_SECRET),
            &[],
        );
        assert_eq!(r.code, 78, "top-level `{switch}`:\n{}", r.stderr);
    }
    std::fs::write(&path, base).unwrap();
    for flag in ["--insecure", "--no-verify", "--tls-verify=false", "-k"] {
        let r = run(
            &[
                "listen",
                "--config",
                config_str(&path),
                "--profile",
                "t",
                flag,
            ],
            Some(KEY_SECRET),
            &[],
        );
        assert_eq!(r.code, 2, "`{flag}` is not a flag:\n{}", r.stderr);
        assert!(r.stderr.contains("unexpected argument"), "{}", r.stderr);
    }
}
