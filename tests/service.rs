//! Running as a service: systemd notifications, every credential source, and STS credentials
//! that expire and are rotated make-before-break with nothing lost. Real binary, emulator.

mod common;

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{ids, json_message, Client, World, KEY_ID, KEY_SECRET};
use iot_sub::emulator::StsToken;
use iot_sub::secret::Secret;

const T: Duration = Duration::from_secs(30);

fn listen_cmd(config: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.arg("listen")
        .arg("--config")
        .arg(config)
        .args(["--profile", "t"])
        .args(args)
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC");
    cmd
}

/// Datagrams received so far.
fn drain(socket: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_status_watchdog_and_stopping() {
    let world = World::start().await;
    let socket_path = world.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_nonblocking(true).unwrap();
    for i in 0..5 {
        world.emulator.publish(json_message(i));
    }
    // A profile with the wrong secret first: no READY=1 without an attached link.
    let profile = world.profile("backoff_initial = \"200ms\"");
    let mut cmd = listen_cmd(&profile, &[]);
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "wrong");
    let mut client = Client::spawn(cmd);
    client.wait_stderr("LOGIN REJECTED", 2, T);
    std::thread::sleep(Duration::from_millis(500));
    let mut got = Vec::new();
    drain(&socket, &mut got);
    assert!(
        !got.iter().any(|m| m.contains("READY=1")),
        "no READY before a link: {got:?}"
    );
    assert!(
        got.iter().any(|m| m.contains("STATUS=0/1 links attached")),
        "{got:?}"
    );
    client.signal("TERM");
    assert!(client.wait(T).success());

    let mut cmd = listen_cmd(&profile, &[]);
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", KEY_SECRET);
    let mut client = Client::spawn(cmd);
    client.read_lines(5, T);
    std::thread::sleep(Duration::from_millis(800));
    client.signal("TERM");
    assert!(client.wait(T).success());
    let mut got = Vec::new();
    drain(&socket, &mut got);
    let ready = got
        .iter()
        .position(|m| m.contains("READY=1"))
        .expect("READY=1 sent");
    assert!(
        got[ready].contains("STATUS="),
        "READY comes with a status: {got:?}"
    );
    let pings = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 4, "pinged about every 100 ms: {pings} in {got:?}");
    assert!(
        got.iter()
            .any(|m| m.contains("STATUS=1/1 links attached; 5 written")),
        "{got:?}"
    );
    assert!(got.last().unwrap().contains("STOPPING=1"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_a_systemd_credential() {
    let world = World::start().await;
    world.emulator.publish(json_message(1));
    let creds = world.dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("ak-secret"), format!("{KEY_SECRET}\n")).unwrap();
    let profile = world.profile("access_key_secret = { credential = \"ak-secret\" }");
    let mut cmd = listen_cmd(&profile, &["--count", "1"]);
    cmd.env("CREDENTIALS_DIRECTORY", &creds);
    let mut client = Client::spawn(cmd);
    assert_eq!(client.read_lines(1, T).len(), 1);
    assert!(client.wait(T).success(), "{}", client.stderr());

    // Outside systemd the error says what is missing, at start (exit 78).
    let out = listen_cmd(&profile, &["--count", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CREDENTIALS_DIRECTORY is not set"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_a_command_and_from_the_aliyun_cli() {
    let mut config = common::test_config();
    config.sts_tokens = vec![StsToken {
        access_key_id: "STS.cli".into(),
        access_key_secret: Secret::new("cli-sts-secret"),
        token: Secret::new("cli-token"),
        expires_at: None,
    }];
    let world = World::start_with(config).await;

    // A command printing JSON the way `aliyun sts AssumeRole` does.
    world.emulator.publish(json_message(1));
    let command = format!(
        "echo '{{\"Credentials\":{{\"AccessKeyId\":\"{KEY_ID}\",\"AccessKeySecret\":\"{KEY_SECRET}\"}}}}'"
    );
    let profile = world.profile("").to_string_lossy().to_string();
    let text = std::fs::read_to_string(&profile).unwrap().replace(
        &format!("access_key_id = \"{KEY_ID}\""),
        &format!("credential_command = \"\"\"{command}\"\"\""),
    );
    std::fs::write(&profile, text).unwrap();
    let mut client = Client::spawn(listen_cmd(
        std::path::Path::new(&profile),
        &["--count", "1"],
    ));
    assert_eq!(client.read_lines(1, T).len(), 1);
    assert!(client.wait(T).success(), "{}", client.stderr());

    // The Alibaba Cloud CLI's profiles, AK and StsToken modes.
    let home = world.dir.path().join("home");
    std::fs::create_dir_all(home.join(".aliyun")).unwrap();
    std::fs::write(
        home.join(".aliyun/config.json"),
        format!(
            r#"{{"current":"ak","profiles":[
                {{"name":"ak","mode":"AK","access_key_id":"{KEY_ID}","access_key_secret":"{KEY_SECRET}","region_id":"cn-shanghai"}},
                {{"name":"sts","mode":"StsToken","access_key_id":"STS.cli","access_key_secret":"cli-sts-secret","sts_token":"cli-token"}},
                {{"name":"role","mode":"RamRoleArn","access_key_id":"x","access_key_secret":"y"}}]}}"#
        ),
    )
    .unwrap();
    for name in ["ak", "sts"] {
        world.emulator.publish(json_message(10));
        let profile = world.profile(&format!("aliyun_profile = \"{name}\""));
        let text = std::fs::read_to_string(&profile)
            .unwrap()
            .replace(&format!("access_key_id = \"{KEY_ID}\"\n"), "");
        std::fs::write(&profile, text).unwrap();
        let mut cmd = listen_cmd(&profile, &["--count", "1"]);
        cmd.env("HOME", &home);
        let mut client = Client::spawn(cmd);
        assert_eq!(client.read_lines(1, T).len(), 1, "{name}");
        assert!(client.wait(T).success(), "{name}: {}", client.stderr());
        assert!(!client.stderr().contains("cli-token"), "token leaked");
        if name == "sts" {
            assert!(
                client.stderr().contains("authMode=ststoken"),
                "a token means ststoken"
            );
        }
    }
    let profile = world.profile("aliyun_profile = \"role\"");
    let text = std::fs::read_to_string(&profile)
        .unwrap()
        .replace(&format!("access_key_id = \"{KEY_ID}\"\n"), "");
    std::fs::write(&profile, text).unwrap();
    let mut cmd = listen_cmd(&profile, &["--count", "1"]);
    cmd.env("HOME", &home);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mode RamRoleArn"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_sts_credentials_are_rotated_make_before_break_with_nothing_lost() {
    // Three STS credentials, as a role would hand them out: the first two expire in seconds.
    let start = SystemTime::now();
    let lifetimes = [4u64, 8, 120];
    let mut config = common::test_config();
    config.sts_tokens = lifetimes
        .iter()
        .enumerate()
        .map(|(i, secs)| StsToken {
            access_key_id: format!("STS.k{i}"),
            access_key_secret: Secret::new(format!("sts-secret-{i}")),
            token: Secret::new(format!("sts-token-{i}")),
            expires_at: Some(start + Duration::from_secs(*secs)),
        })
        .collect();
    let world = World::start_with(config).await;
    let dir = world.dir.path().join("sts");
    std::fs::create_dir(&dir).unwrap();
    for (i, secs) in lifetimes.iter().enumerate() {
        let expiration = humantime::format_rfc3339_seconds(start + Duration::from_secs(*secs));
        std::fs::write(
            dir.join(format!("{i}.json")),
            format!(r#"{{"id":"STS.k{i}","secret":"sts-secret-{i}","token":"sts-token-{i}","expiration":"{expiration}"}}"#),
        )
        .unwrap();
    }
    // Each run of the command hands out the next credential.
    let command = format!(
        "d='{}'; n=$(cat \"$d/n\" 2>/dev/null || echo 0); echo $((n+1)) > \"$d/n\"; cat \"$d/$n.json\"",
        dir.display()
    );
    let profile = world.profile("");
    let text = std::fs::read_to_string(&profile).unwrap().replace(
        &format!("access_key_id = \"{KEY_ID}\""),
        &format!("credential_command = \"\"\"{command}\"\"\""),
    );
    std::fs::write(&profile, text).unwrap();

    let client = Client::spawn(listen_cmd(&profile, &[]));
    // Messages keep coming while the credentials change hands.
    let emulator = &world.emulator;
    let started = Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(10) {
        emulator.publish(json_message(sent));
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        emulator.wait_accepted(sent, T).await,
        "{:?}\n{}",
        emulator.stats(),
        client.stderr()
    );
    client.signal("TERM");
    let mut client = client;
    assert!(client.wait(T).success());
    let lines = client.rest_of_lines(T);
    let stats = emulator.stats();
    let stderr = client.stderr();

    assert_eq!(
        stats.closed_token_expired, 0,
        "rotated before expiry: {stats:?}\n{stderr}"
    );
    assert_eq!(stats.logins_failed, 0, "{stats:?}");
    assert_eq!(
        stats.connections_accepted, 3,
        "one connection per credential: {stats:?}\n{stderr}"
    );
    assert_eq!(
        stderr
            .matches("replaced the connection before its credentials expire")
            .count(),
        2,
        "{stderr}"
    );
    let got = ids(&lines);
    let unique: HashSet<_> = got.iter().cloned().collect();
    assert_eq!(unique.len(), sent, "nothing lost");
    assert_eq!(got.len(), sent, "nothing written twice");
    assert!(
        !stderr.contains("sts-secret") && !stderr.contains("sts-token"),
        "secrets leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_for_log_shippers() {
    let world = World::start().await;
    world.emulator.publish(json_message(1));
    let profile = world.profile("");
    let mut cmd = listen_cmd(&profile, &["--count", "1", "--log-format", "json"]);
    cmd.env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", KEY_SECRET);
    let mut client = Client::spawn(cmd);
    assert_eq!(client.read_lines(1, T).len(), 1);
    assert!(client.wait(T).success());
    let stderr = client.stderr();
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(events.len() >= 3, "{stderr}");
    assert!(events
        .iter()
        .all(|e| e["level"].is_string() && e["timestamp"].is_string()));
    assert!(events
        .iter()
        .any(|e| e["fields"]["message"] == "receiver link attached; receiving"));
    assert!(!stderr.contains('\u{1b}'), "no colour codes");
}
