//! Interop with an independent AMQP 1.0 implementation: the real binary with a `kind = "amqp"`
//! profile against RabbitMQ 3.10's AMQP 1.0 plugin (Debian's package) over TLS, fed by an
//! independent sender (python-qpid-proton, tests/rabbitmq/send.py).
//!
//! One broker for this whole test binary: a single test runs the scenarios in sequence, and the
//! broker (its Erlang VM and private epmd) is stopped by PID when the test ends, also on a panic.
//! Without RabbitMQ or python3-qpid-proton installed the test prints a skip line and passes,
//! unless `IOT_SUB_REQUIRE_RABBITMQ=1` (CI sets it).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, Client};

/// Ports 16870..16889: TLS 16871, Erlang distribution 16873, epmd 16874, CLI 16880-16889 (the
/// plain listener is off). Not the recipe's default base (16670), so a broker someone started
/// by hand with the defaults does not collide; below the ephemeral range, so no test's
/// `127.0.0.1:0` listener can take them.
const PORT_BASE: u16 = 16870;
/// Generous: the broker boots in 4-15 s on a loaded 2-core machine.
const T: Duration = Duration::from_secs(30);
/// The broker's only user (the recipe's defaults).
const USER: &str = "rmqtest";
const PASSWORD: &str = "rmqtest-secret";
/// Never accepted: must never show up in any output.
const WRONG_PASSWORD: &str = "wrong-password-4f9a1c";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rabbitmq/rabbitmq-amqp10.sh")
}

/// Why the interop test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<&'static str> {
    if !Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
        return Some("rabbitmq-server is not installed");
    }
    let proton = Command::new("/usr/bin/python3")
        .args(["-c", "import proton"])
        .stderr(Stdio::null())
        .status();
    if !proton.is_ok_and(|s| s.success()) {
        return Some("python3-qpid-proton is not installed");
    }
    None
}

/// A running broker; stopped (by PID, as the recipe does) and its directory removed on drop.
struct Broker {
    dir: PathBuf,
    ca: PathBuf,
    tls_port: u16,
    _tmp: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let tmp = tempfile::Builder::new()
            .prefix("iot-sub-rabbitmq.")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("node");
        let broker = Broker {
            ca: dir.join("tls/ca.pem"),
            dir,
            tls_port: PORT_BASE + 1,
            _tmp: tmp,
        };
        // From here on, a failed start is cleaned up by Drop.
        let out = broker.script(&["start", broker.dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "the broker did not start:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        broker
    }

    /// Runs the recipe with this broker's settings, bounded by `timeout`.
    fn script(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["120", "bash"])
            .arg(script())
            .args(args)
            .env("RMQ_PORT_BASE", PORT_BASE.to_string())
            .env("RMQ_TCP_PORT", "none")
            .env("RMQ_NODE", "iotsubinterop@localhost")
            .env("RMQ_USER", USER)
            .env("RMQ_PASS", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("bash runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.script(args);
        assert!(
            out.status.success(),
            "rabbitmq-amqp10.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dir(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn declare_queue(&self, queue: &str) {
        self.ok(&["declare-queue", self.dir(), queue]);
    }

    /// Sends `n` messages of `shape` (see send.py) to `queue`; the broker accepted them all.
    fn send(&self, queue: &str, n: usize, shape: &str) {
        let address = format!("/amq/queue/{queue}");
        self.ok(&["send", self.dir(), &address, &n.to_string(), shape]);
    }

    /// (ready, unacknowledged) of `queue`, from rabbitmqctl list_queues.
    fn counts(&self, queue: &str) -> (u64, u64) {
        let text = self.ok(&["counts", self.dir(), queue]);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        match (it.next(), it.next()) {
            (Some(ready), Some(unacked)) => (ready, unacked),
            _ => panic!("no counts for queue {queue}: {text:?}"),
        }
    }

    /// Polls the queue's counts until `want` holds; returns them.
    fn wait_counts(&self, queue: &str, what: &str, want: impl Fn(u64, u64) -> bool) -> (u64, u64) {
        let deadline = Instant::now() + T;
        loop {
            let (ready, unacked) = self.counts(queue);
            if want(ready, unacked) {
                return (ready, unacked);
            }
            assert!(
                Instant::now() < deadline,
                "queue {queue}: {ready} ready / {unacked} unacked; expected {what} within {T:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A config file with profile `t` of kind amqp receiving from `queue`.
    fn profile(&self, queue: &str) -> PathBuf {
        let path = self.dir.join(format!("config-{queue}.toml"));
        let text = format!(
            "[profiles.t]\nkind = \"amqp\"\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n\
             username = \"{USER}\"\nsource = \"/amq/queue/{queue}\"\nclient_id = \"interop-{queue}\"\n\
             backoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n",
            self.tls_port,
            self.ca.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // `clean` ends exactly the PIDs `start` recorded (beam.smp, its wrapper, our epmd).
        let out = self.script(&["clean", self.dir()]);
        if !out.status.success() {
            eprintln!(
                "stopping the broker failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `iot-sub <command> --config <config> --profile t <args>` with `password` in the environment.
fn iot_sub(command: &str, config: &Path, args: &[&str], password: &str) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg(command)
        .arg("--config")
        .arg(config)
        .args(["--profile", "t"])
        .args(args)
        .env("IOT_SUB_AMQP_PASSWORD", password)
        .env("RUST_LOG", "info");
    cmd
}

#[test]
fn interop_with_rabbitmq_over_tls() {
    if let Some(why) = missing_prerequisite() {
        if std::env::var("IOT_SUB_REQUIRE_RABBITMQ").as_deref() == Ok("1") {
            panic!("IOT_SUB_REQUIRE_RABBITMQ=1, but {why} (see tests/rabbitmq/rabbitmq-amqp10.sh install)");
        }
        // Straight to stderr, past the test harness's capture, so the skip is seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED interop_with_rabbitmq_over_tls: {why}; run `bash tests/rabbitmq/rabbitmq-amqp10.sh install` \
             and `apt-get install python3-qpid-proton`, or set IOT_SUB_REQUIRE_RABBITMQ=1 to make this a failure"
        );
        return;
    }
    let broker = Broker::start();
    check_passes(&broker);
    every_message_is_written_and_accepted(&broker);
    unaccepted_messages_come_back_after_a_kill(&broker);
    wrong_password_is_a_clear_error_without_secrets(&broker);
    missing_queue_is_a_clear_error(&broker);
}

/// `iot-sub check` goes through every step against the broker.
fn check_passes(broker: &Broker) {
    broker.declare_queue("checked");
    let config = broker.profile("checked");
    let out = iot_sub("check", &config, &["--json"], PASSWORD)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    for step in [
        "config",
        "credentials",
        "dns",
        "tcp",
        "tls",
        "sasl",
        "open",
        "attach",
    ] {
        let s = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == step)
            .unwrap_or_else(|| panic!("no step {step}: {report:#}"));
        assert_eq!(s["status"], "ok", "step {step}: {report:#}");
    }
    assert_eq!(report["credentials"]["username"], USER);
    assert_eq!(report["credentials"]["auth_mode"], "plain");
    assert_eq!(report["endpoint"]["source"], "/amq/queue/checked");
    assert_eq!(report["endpoint"]["server_idle_timeout_ms"], 60_000);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(PASSWORD));
}

/// (a) Messages of three shapes are each written once, mapped as documented, and accepted: the
/// queue ends with nothing ready and nothing unacknowledged.
fn every_message_is_written_and_accepted(broker: &Broker) {
    const PLAIN: usize = 40;
    const ALIYUN: usize = 3;
    const BARE: usize = 3;
    broker.declare_queue("orders");
    broker.send("orders", PLAIN, "plain");
    broker.send("orders", ALIYUN, "aliyun");
    broker.send("orders", BARE, "bare");
    assert_eq!(broker.counts("orders"), ((PLAIN + ALIYUN + BARE) as u64, 0));

    let config = broker.profile("orders");
    let total = (PLAIN + ALIYUN + BARE).to_string();
    let mut client = Client::spawn(iot_sub("listen", &config, &["--count", &total], PASSWORD));
    let lines = client.read_lines(PLAIN + ALIYUN + BARE, T);
    assert!(
        client.wait(T).success(),
        "--count reached: exit 0\n{}",
        client.stderr()
    );

    let mut plain: Vec<_> = lines
        .iter()
        .filter(|l| l["properties"]["kind"] == "test")
        .collect();
    plain.sort_by_key(|l| l["properties"]["seq"].as_i64());
    assert_eq!(plain.len(), PLAIN, "{lines:#?}");
    for (i, line) in plain.iter().enumerate() {
        // No Aliyun properties: subject, message-id and creation-time stand in.
        assert_eq!(line["topic"], format!("s{i}"));
        assert_eq!(line["messageId"], format!("msg-{i:05}"));
        assert_eq!(line["generateTime"], 1_714_528_800_000i64 + 1000 * i as i64);
        assert_eq!(line["productKey"], serde_json::Value::Null);
        assert_eq!(
            line["properties"],
            serde_json::json!({"seq": i, "kind": "test"})
        );
        assert_eq!(line["bodyEncoding"], "text");
        assert_eq!(line["body"], format!("payload-{i:05}"));
    }
    let aliyun: Vec<_> = lines
        .iter()
        .filter(|l| l["productKey"] == "a1Test")
        .collect();
    assert_eq!(aliyun.len(), ALIYUN, "{lines:#?}");
    for line in aliyun {
        let seq = line["body"]["seq"].as_i64().expect("JSON body");
        assert_eq!(
            line["topic"],
            format!("/a1Test/dev{}/thing/event/property/post", seq % 3)
        );
        assert_eq!(line["messageId"], format!("17000000000000000{seq:02}"));
        assert_eq!(line["generateTime"], 1_714_528_800_000 + seq);
        assert_eq!(line["deviceName"], format!("dev{}", seq % 3));
    }
    // Nothing to go by: the source address as the topic, no id; each one still written (no id
    // means no duplicate suppression, not one line for all of them).
    let mut bare: Vec<_> = lines
        .iter()
        .filter(|l| l["topic"] == "/amq/queue/orders")
        .map(|l| {
            assert_eq!(l["messageId"], serde_json::Value::Null);
            assert_eq!(l["generateTime"], serde_json::Value::Null);
            l["body"].as_str().unwrap().to_string()
        })
        .collect();
    bare.sort();
    let want: Vec<String> = (0..BARE).map(|i| format!("bare-{i:05}")).collect();
    assert_eq!(bare, want);

    broker.wait_counts("orders", "0 ready / 0 unacked", |r, u| r == 0 && u == 0);
}

/// (b) Messages received but not accepted when the client is killed come back and are written
/// by the next run: nothing is lost.
fn unaccepted_messages_come_back_after_a_kill(broker: &Broker) {
    // 16 KiB bodies: a few lines fill the stdout pipe nobody reads, so the rest of the
    // deliveries are held unaccepted.
    const N: usize = 30;
    broker.declare_queue("held");
    broker.send("held", N, "large");
    let config = broker.profile("held");
    let stderr_path = broker.dir.join("held-run1.stderr");
    let mut stalled = iot_sub("listen", &config, &[], PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let held = broker.wait_counts("held", "all delivered, some unacknowledged", |r, u| {
        r == 0 && u > 0
    });
    stalled.kill().unwrap(); // SIGKILL: no detach, no close, the socket just dies
    stalled.wait().unwrap();
    let mut written = String::new();
    stalled
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut written)
        .unwrap();
    // The pipe may end in a partly written line; whole lines only.
    let first_run: Vec<i64> = written
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|l| l["properties"]["seq"].as_i64().unwrap())
        .collect();

    let (ready, _) = broker.wait_counts("held", "nothing unacknowledged after the kill", |_, u| {
        u == 0
    });
    assert_eq!(
        ready, held.1,
        "every delivery held unaccepted is back in the queue"
    );
    let accepted = N as u64 - ready;
    assert!(
        accepted <= first_run.len() as u64,
        "only written messages may be accepted: {accepted} accepted, {} written",
        first_run.len()
    );

    let mut client = Client::spawn(iot_sub(
        "listen",
        &config,
        &["--count", &ready.to_string()],
        PASSWORD,
    ));
    let second_run = client.read_lines(ready as usize, T);
    assert!(client.wait(T).success(), "{}", client.stderr());
    broker.wait_counts("held", "0 ready / 0 unacked", |r, u| r == 0 && u == 0);

    let mut seen: Vec<i64> = first_run
        .iter()
        .copied()
        .chain(
            second_run
                .iter()
                .map(|l| l["properties"]["seq"].as_i64().unwrap()),
        )
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (0..N as i64).collect::<Vec<_>>(), "nothing lost");
    for line in &second_run {
        let body = line["body"].as_str().unwrap();
        assert_eq!(body.len(), "payload-00000 ".len() + 16384, "body intact");
    }
}

/// (c) A wrong password: the login is rejected, said plainly, and no password is printed.
fn wrong_password_is_a_clear_error_without_secrets(broker: &Broker) {
    let config = broker.profile("checked");
    let mut client = Client::spawn(iot_sub("listen", &config, &[], WRONG_PASSWORD));
    client.wait_stderr("LOGIN REJECTED", 1, T);
    client.signal("TERM");
    client.wait(T);
    let stderr = client.stderr();
    assert!(
        stderr.contains("login rejected by the server")
            && stderr.contains("check `username` and the password"),
        "{stderr}"
    );

    let out = iot_sub("check", &config, &[], WRONG_PASSWORD)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(13),
        "exit status of a refused login\n{report}"
    );
    assert!(report.contains("FAILED at step `sasl`"), "{report}");
    assert!(report.contains("login rejected"), "{report}");
    let everything = format!("{stderr}{report}{}", String::from_utf8_lossy(&out.stderr));
    for secret in [WRONG_PASSWORD, PASSWORD] {
        assert!(
            !everything.contains(secret),
            "a password was printed:\n{everything}"
        );
    }
}

/// (d) A source queue that does not exist: the broker's not-found, said plainly.
fn missing_queue_is_a_clear_error(broker: &Broker) {
    let config = broker.profile("no-such-queue");
    let mut client = Client::spawn(iot_sub("listen", &config, &[], PASSWORD));
    client.wait_stderr("amqp:not-found", 1, T);
    client.signal("TERM");
    client.wait(T);
    assert!(
        client.stderr().contains("no queue 'no-such-queue'"),
        "{}",
        client.stderr()
    );

    let out = iot_sub("check", &config, &[], PASSWORD).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(15),
        "exit status of a refused attach\n{report}"
    );
    assert!(report.contains("FAILED at step `attach`"), "{report}");
    assert!(report.contains("amqp:not-found"), "{report}");
    assert!(report.contains("the queue must exist"), "{report}");
}
