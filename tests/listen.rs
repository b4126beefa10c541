//! End to end: the real `iot-sub` binary against the emulator over TLS.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use common::{ids, json_message, Client, World, KEY_ID, KEY_SECRET};
use iot_sub::emulator::{AuthFailure, DeviceMessage, Drop, ExtraValue, StsToken};
use iot_sub::secret::Secret;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_printed_once_and_accepted_with_the_documented_schema() {
    let world = World::start().await;
    let mut sent = Vec::new();
    for i in 0..40 {
        sent.push(json_message(i));
    }
    // Text, binary (with NUL bytes) and extra properties.
    sent.push(DeviceMessage {
        topic: "/a1Test/dev1/user/log".into(),
        message_id: "9000000000000000001".into(),
        generate_time: 1714528800999,
        body: "boot ok\ttemp=21.5 °C".as_bytes().to_vec(),
        extra_properties: vec![("qos".into(), ExtraValue::Int(1))],
    });
    let raw = vec![0u8, 0xff, 0x10, 0x00, 0x80, b'{'];
    sent.push(DeviceMessage {
        topic: "/a1Test/dev2/user/raw".into(),
        message_id: "9000000000000000002".into(),
        generate_time: 1714528801000,
        body: raw.clone(),
        extra_properties: Vec::new(),
    });
    for m in &sent {
        world.emulator.publish(m.clone());
    }
    let config = world.profile("");
    let mut client = Client::listen(&config, &["--count", &sent.len().to_string()]);
    let raw_lines = client.read_raw_lines(sent.len(), T);
    let lines: Vec<serde_json::Value> = raw_lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let status = client.wait(T);
    assert!(
        status.success(),
        "exit {status:?}; stderr:\n{}",
        client.stderr()
    );
    assert!(client.rest_of_lines(T).is_empty(), "no line after --count");

    // Each message once.
    let got = ids(&lines);
    let unique: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        sent.len(),
        "each message exactly once: {got:?}"
    );
    let want: HashSet<_> = sent.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(unique, want);

    // Each accepted (the emulator's record).
    assert!(
        world.emulator.wait_accepted(sent.len(), T).await,
        "{:?}",
        world.emulator.stats()
    );
    let accepted: HashSet<_> = world.emulator.accepted_ids().into_iter().collect();
    assert_eq!(accepted, want);

    let by_id: HashMap<_, _> = lines
        .iter()
        .map(|l| (l["messageId"].as_str().unwrap().to_string(), l))
        .collect();
    let json = by_id["1700000000000000003"];
    assert_eq!(
        json,
        &serde_json::json!({
            "topic": "/a1Test/dev3/thing/event/property/post",
            "messageId": "1700000000000000003",
            "generateTime": 1714528800003i64,
            "productKey": "a1Test",
            "deviceName": "dev3",
            "properties": {},
            "bodyEncoding": "json",
            "body": {"items": {"Temp": {"value": 3, "time": 1714528800000i64}}}
        })
    );
    // Keys in the documented order, on every line.
    for raw in &raw_lines {
        let at = |key: &str| {
            raw.find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} in {raw}"))
        };
        let order = [
            "topic",
            "messageId",
            "generateTime",
            "properties",
            "bodyEncoding",
            "body",
        ]
        .map(at);
        assert!(raw.starts_with("{\"topic\":"), "{raw}");
        assert!(order.windows(2).all(|w| w[0] < w[1]), "key order in {raw}");
    }

    let text = by_id["9000000000000000001"];
    assert_eq!(text["bodyEncoding"], "text");
    assert_eq!(text["body"], "boot ok\ttemp=21.5 °C");
    assert_eq!(text["properties"], serde_json::json!({"qos": 1}));

    let bin = by_id["9000000000000000002"];
    assert_eq!(bin["bodyEncoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(bin["body"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sign_method_and_auth_mode_logs_in() {
    let mut config = common::test_config();
    config.sts_tokens = vec![StsToken {
        access_key_id: "STS.NTtest".into(),
        access_key_secret: Secret::new("sts-secret"),
        token: Secret::new("CAIS-token/with+chars="),
        expires_at: None,
    }];
    let world = World::start_with(config).await;
    for method in ["hmacmd5", "hmacsha1", "hmacsha256"] {
        for mode in ["aksign", "ststoken"] {
            let i = world.emulator.stats().accepted as usize;
            world.emulator.publish(json_message(1000 + i));
            let profile = if mode == "aksign" {
                world.profile(&format!(
                    "sign_method = \"{method}\"\nauth_mode = \"aksign\""
                ))
            } else {
                world.profile(&format!(
                    "sign_method = \"{method}\"\nauth_mode = \"ststoken\"\n\
                     access_key_secret = {{ env = \"STS_SECRET\" }}\nsecurity_token = {{ env = \"STS_TOKEN\" }}"
                ))
            };
            let text = std::fs::read_to_string(&profile).unwrap().replace(
                &format!("access_key_id = \"{KEY_ID}\""),
                if mode == "aksign" {
                    "access_key_id = \"LTAItestkey\""
                } else {
                    "access_key_id = \"STS.NTtest\""
                },
            );
            std::fs::write(&profile, text).unwrap();
            let mut cmd = std::process::Command::new(common::bin());
            cmd.args(["listen", "--profile", "t", "--count", "1", "--config"])
                .arg(&profile)
                .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", KEY_SECRET)
                .env("STS_SECRET", "sts-secret")
                .env("STS_TOKEN", "CAIS-token/with+chars=");
            let mut client = Client::spawn(cmd);
            let lines = client.read_lines(1, T);
            assert_eq!(lines.len(), 1);
            let status = client.wait(T);
            assert!(
                status.success(),
                "{method}/{mode}: {status:?}\n{}",
                client.stderr()
            );
            assert!(
                !client.stderr().contains("CAIS-token"),
                "token leaked:\n{}",
                client.stderr()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_carries_the_configured_idle_timeout_exactly() {
    let world = World::start().await;
    world.emulator.publish(json_message(1));
    let config = world.profile("idle_timeout = \"45s\"");
    let mut client = Client::listen(&config, &["--count", "1"]);
    client.read_lines(1, T);
    assert!(client.wait(T).success());
    assert_eq!(world.emulator.last_open_idle_timeout_ms(), Some(45_000));
}

/// Extracts the `retry_in` values (ms) from the log.
fn retry_delays(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.split("retry_in=").nth(1))
        .map(|rest| {
            let v = rest.split_whitespace().next().unwrap();
            humantime::parse_duration(v).unwrap().as_millis() as u64
        })
        .collect()
}

async fn wrong_secret_case(failure: AuthFailure) {
    let mut config = common::test_config();
    config.auth_failure = failure;
    let world = World::start_with(config).await;
    let profile = world.profile("backoff_initial = \"100ms\"\nbackoff_max = \"2s\"");
    let wrong = "wrong-secret-0123456789";
    let mut client = Client::listen_with_secret(&profile, &[], wrong);
    client.wait_stderr("LOGIN REJECTED", 5, T);
    client.signal("TERM");
    let status = client.wait(T);
    assert!(status.success(), "{status:?}");
    let stderr = client.stderr();

    // Growing delays: with jitter each delay is in [d/2, d] for d = 100ms, 200ms, 400ms, ...
    let delays = retry_delays(&stderr);
    assert!(delays.len() >= 5, "{stderr}");
    assert!(delays[3] > delays[0], "delays do not grow: {delays:?}");
    assert!(delays[4] >= 800, "delays do not grow: {delays:?}");
    assert!(
        stderr.contains("check the AccessKey id and secret"),
        "{stderr}"
    );
    if failure == AuthFailure::CloseUnauthorized {
        assert!(stderr.contains("amqp:unauthorized-access"), "{stderr}");
    }

    // No secret and no password in the output. The log shows each attempt's username with its
    // timestamp, so every password that was sent can be recomputed here and looked for.
    assert!(!stderr.contains(wrong) && !stderr.contains(KEY_SECRET));
    let mut checked = 0;
    let mut last_ts = 0;
    for ts in stderr.split("timestamp=").skip(1) {
        let ts: u64 = ts.split(',').next().unwrap().parse().unwrap();
        assert!(ts > last_ts, "every attempt signs with a fresh timestamp");
        last_ts = ts;
        let password = common::test_password(wrong, ts);
        assert!(!stderr.contains(&password), "password leaked:\n{stderr}");
        checked += 1;
    }
    assert!(checked >= 5, "each attempt logs its username");
    assert_eq!(world.emulator.stats().accepted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_sasl_outcome_is_reported_and_retried_with_growing_delays() {
    wrong_secret_case(AuthFailure::SaslOutcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_close_after_open_is_reported_and_retried() {
    wrong_secret_case(AuthFailure::CloseUnauthorized).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_drops_mid_stream_reconnect_loses_nothing_and_duplicates_only_unaccepted() {
    let world = World::start().await;
    const N: usize = 3000;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"");
    let mut client = Client::listen(&profile, &[]);
    assert!(world.emulator.wait_accepted(500, T).await);
    world.emulator.drop_connections(Drop::ServerClose);
    assert!(world.emulator.wait_accepted(1500, T).await);
    world.emulator.drop_connections(Drop::TcpReset);
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "not all accepted: {:?}\n{}",
        world.emulator.stats(),
        client.stderr()
    );
    client.signal("TERM");
    let status = client.wait(T);
    assert!(status.success(), "{status:?}");
    let lines = client.rest_of_lines(T);
    let stderr = client.stderr();
    assert!(
        stderr.contains("9602"),
        "server's close reason is logged verbatim:\n{stderr}"
    );
    assert!(
        stderr.matches("receiver link attached").count() >= 3,
        "{stderr}"
    );

    let mut seen: HashMap<String, u32> = HashMap::new();
    for id in ids(&lines) {
        *seen.entry(id).or_default() += 1;
    }
    let accepted = world.emulator.accepted_ids();
    assert_eq!(accepted.len(), N, "each message accepted exactly once");
    let deliveries = world.emulator.delivery_counts();
    for i in 0..N {
        let id = json_message(i).message_id;
        let times = seen.get(&id).copied().unwrap_or(0);
        assert!(times >= 1, "message {id} lost");
        if times > 1 {
            // Printed twice only if it was delivered again, i.e. its first delivery was not
            // accepted (the emulator never redelivers an accepted message).
            assert!(
                deliveries[&id] >= times,
                "{id} printed {times}x, delivered {}x",
                deliveries[&id]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_cleanly_and_accepts_only_what_was_written() {
    let world = World::start().await;
    const N: usize = 20_000;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("");
    let mut client = Client::listen(&profile, &[]);
    let mut lines = client.read_lines(200, T);
    client.signal("TERM");
    let status = client.wait(Duration::from_secs(12));
    assert!(status.success(), "{status:?}\n{}", client.stderr());
    lines.extend(client.rest_of_lines(T));

    let printed: HashSet<String> = ids(&lines).into_iter().collect();
    let accepted = world.emulator.accepted_ids();
    assert!(
        accepted.len() >= 200,
        "what was written before the signal was accepted"
    );
    assert!(accepted.len() < N, "the run stopped mid-stream");
    for id in &accepted {
        assert!(printed.contains(id), "accepted but never written: {id}");
    }
    // After the close, the emulator holds everything else for redelivery: nothing lost.
    let stats = world.emulator.stats();
    assert_eq!(
        stats.accepted as usize + stats.backlog + stats.in_flight,
        N,
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stdout_pipe_ends_cleanly_without_accepting_unwritten_messages() {
    let world = World::start().await;
    for i in 0..3 {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("");
    // A real `| head -n 3`; bash reports iot-sub's own exit status on stderr.
    let script = format!(
        "'{}' listen --config '{}' --profile t | head -n 3; echo \"iot-sub-status=${{PIPESTATUS[0]}}\" >&2",
        common::bin(),
        profile.display()
    );
    let mut cmd = std::process::Command::new("bash");
    cmd.args(["-c", &script])
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", KEY_SECRET);
    let mut client = Client::spawn(cmd);
    let first = client.read_lines(3, T);
    assert_eq!(ids(&first).len(), 3);
    assert!(world.emulator.wait_accepted(3, T).await);
    // head exits right after its third line; the next messages then hit a closed pipe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 3..8 {
        world.emulator.publish(json_message(i));
    }
    let status = client.wait(T);
    assert!(status.success());
    assert!(client.rest_of_lines(T).is_empty());
    client.wait_stderr("iot-sub-status=0", 1, T);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let accepted: HashSet<String> = world.emulator.accepted_ids().into_iter().collect();
    let expected: HashSet<String> = (0..3).map(|i| json_message(i).message_id).collect();
    assert_eq!(
        accepted, expected,
        "only the three written lines were accepted"
    );
    let stats = world.emulator.stats();
    assert_eq!(stats.backlog + stats.in_flight, 5, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_secret_in_a_readable_file_draws_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::start().await;
    world.emulator.publish(json_message(7));
    let profile = world.profile(&format!("access_key_secret = \"{KEY_SECRET}\""));
    std::fs::set_permissions(&profile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut client = Client::listen_with_secret(&profile, &["--count", "1"], "unused");
    client.read_lines(1, T);
    assert!(client.wait(T).success());
    let stderr = client.stderr();
    assert!(
        stderr.contains("readable by group or others") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY_SECRET));

    std::fs::set_permissions(&profile, std::fs::Permissions::from_mode(0o600)).unwrap();
    world.emulator.publish(json_message(8));
    let mut client = Client::listen_with_secret(&profile, &["--count", "1"], "unused");
    client.read_lines(1, T);
    assert!(client.wait(T).success());
    assert!(
        !client.stderr().contains("readable by group"),
        "{}",
        client.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_given_up_on_within_the_deadline() {
    // Accepts TCP and then says nothing: without deadlines the client would hang forever.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(2) {
            held.push(stream.unwrap());
        }
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.t]\nhost = \"localhost\"\nport = {port}\nconsumer_group_id = \"G\"\n\
             access_key_id = \"id\"\nbackoff_initial = \"100ms\"\n"
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut client = Client::listen(&config, &[]);
    client.wait_stderr("did not finish within 10s", 1, Duration::from_secs(15));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(14),
        "{took:?}"
    );
    client.signal("TERM");
    assert!(client.wait(T).success());
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_keeps_itself_alive() {
    // The emulator, like Aliyun, advertises no idle-time-out of its own and closes a connection
    // that sends nothing for the client's idle-time-out. fe2o3 then sends no heartbeats, so
    // only iot-sub's own keep-alive flows keep an idle link up.
    let world = World::start().await;
    let profile = world.profile("idle_timeout = \"30s\"");
    let mut client = Client::listen(&profile, &["--count", "1"]);
    client.wait_stderr("receiver link attached", 1, T);
    tokio::time::sleep(Duration::from_secs(36)).await;
    world.emulator.publish(json_message(1));
    client.read_lines(1, T);
    assert!(client.wait(T).success());
    let stats = world.emulator.stats();
    assert_eq!(stats.closed_idle, 0, "{stats:?}");
    assert_eq!(
        stats.connections_accepted,
        1,
        "never reconnected: {stats:?}\n{}",
        client.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_output_does_not_silence_the_connection() {
    // The output (a pipe nobody reads) is stalled for longer than the idle-time-out, so the
    // link's credit is used up and the receive loop waits for accepts that do not come. The
    // emulator closes a client that sends nothing for its idle-time-out: the connection must
    // keep sending its heartbeat meanwhile, and everything arrives once the output moves.
    let world = World::start().await;
    const N: usize = 1_000;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("idle_timeout = \"30s\"\ncredit = 50");
    let mut cmd = std::process::Command::new(common::bin());
    cmd.args([
        "listen",
        "--profile",
        "t",
        "--count",
        &N.to_string(),
        "--config",
    ])
    .arg(&profile)
    .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", KEY_SECRET)
    .env("RUST_LOG", "info");
    let (mut client, stdout) = Client::spawn_unread(cmd);
    client.wait_stderr("receiver link attached", 1, T);
    // 1 000 lines of ~600 bytes do not fit in a 64 KiB pipe: the output stalls.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let stats = world.emulator.stats();
    assert!(
        stats.accepted < N as u64,
        "the output never stalled: {stats:?}"
    );
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().count()
    });
    assert!(client.wait(T).success(), "{}", client.stderr());
    assert_eq!(lines.join().unwrap(), N);
    let stats = world.emulator.stats();
    assert_eq!(stats.closed_idle, 0, "{stats:?}\n{}", client.stderr());
    assert_eq!(
        stats.connections_accepted,
        1,
        "never reconnected: {stats:?}\n{}",
        client.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_deliveries_are_rejected_and_credit_never_stalls() {
    let world = World::start().await;
    // generateTime must be milliseconds; a boolean cannot be written in the schema.
    let poison = |i: usize| DeviceMessage {
        extra_properties: vec![("generateTime".into(), ExtraValue::Bool(true))],
        ..json_message(10_000 + i)
    };
    for i in 0..20 {
        world.emulator.publish(poison(i));
        world.emulator.publish(json_message(i));
    }
    // Credit 4: if rejections did not settle, the link would stall after four poison messages.
    let profile = world.profile("credit = 4");
    let mut client = Client::listen(&profile, &["--count", "20"]);
    let lines = client.read_lines(20, T);
    assert!(client.wait(T).success(), "{}", client.stderr());
    let want: HashSet<String> = (0..20).map(|i| json_message(i).message_id).collect();
    assert_eq!(ids(&lines).into_iter().collect::<HashSet<_>>(), want);
    assert!(
        world.emulator.stats().rejected >= 20,
        "{:?}",
        world.emulator.stats()
    );
    let stderr = client.stderr();
    assert!(
        stderr.contains("rejecting a delivery") && stderr.contains("generateTime"),
        "{stderr}"
    );
}
