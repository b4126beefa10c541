//! The binary's command line: config errors (exit 78, one clear message), the built-in demo,
//! and the dependency rule that keeps aws-lc-rs out of the build.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Client;

/// Runs `listen` with `profile_body` as profile `p`; returns (exit code, stderr).
fn listen_with(profile_body: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("[profiles.p]\n{profile_body}\n")).unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.args(["listen", "--profile", "p", "--config"])
        .arg(&path);
    cmd.env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("IOT_SUB_AMQP_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.stdout.is_empty(), "stdout carries data only");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "names the file: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stderr)
}

const BASE: &str = "host = \"iot-x.amqp.iothub.aliyuncs.com\"\nconsumer_group_id = \"G\"\n";

#[test]
fn each_bad_field_gets_its_message_and_exit_78() {
    let cases: &[(&str, &str, &str)] = &[
        ("idle_timeout = \"10s\"", "idle_timeout", "30s to 300s"),
        ("idle_timeout = \"301s\"", "idle_timeout", "30s to 300s"),
        ("idle_timeout = \"a while\"", "idle_timeout", "invalid"),
        ("port = 0", "port", "1 to 65535"),
        ("credit = 100000", "credit", "2 to 5000"),
        (
            "sign_method = \"hmacsha512\"",
            "sign_method",
            "hmacmd5 | hmacsha1 | hmacsha256",
        ),
        ("auth_mode = \"password\"", "auth_mode", "aksign | ststoken"),
        (
            "client_id = \"{nodename}\"",
            "client_id",
            "{hostname}, {pid}",
        ),
        ("client_id = \"a|b\"", "client_id", "1 to 64 characters"),
        (
            "consumer_gruop_id = \"G\"",
            "consumer_gruop_id",
            "unknown field",
        ),
        ("host = \"amqps://x:5671\"", "host", "not a host name"),
        ("security_token = \"t\"", "security_token", "ststoken"),
        (
            "access_key_secret = { vault = \"k\" }",
            "access_key_secret",
            "`env`, `file` or `credential`",
        ),
        ("backoff_max = \"2h\"", "backoff_max", "1h"),
    ];
    for (line, field, allowed) in cases {
        // A later key replaces nothing in TOML, so BASE keys are only given when not under test.
        let body = if line.starts_with("host") {
            format!("consumer_group_id = \"G\"\n{line}")
        } else {
            format!("{BASE}{line}")
        };
        let (code, stderr) = listen_with(
            &body,
            &[
                ("ALIBABA_CLOUD_ACCESS_KEY_ID", "id"),
                ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "s"),
            ],
        );
        assert_eq!(code, 78, "{line}: {stderr}");
        assert!(
            stderr.contains(&format!("field `{field}`")),
            "{line}: {stderr}"
        );
        assert!(stderr.contains(allowed), "{line}: {stderr}");
        assert!(stderr.contains("profile `p`"), "{line}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn missing_endpoint_group_and_credentials_are_config_errors() {
    let (code, stderr) = listen_with("consumer_group_id = \"G\"", &[]);
    assert_eq!(code, 78);
    assert!(stderr.contains("field `host`"), "{stderr}");

    let (code, stderr) = listen_with("host = \"h\"", &[]);
    assert_eq!(code, 78);
    assert!(stderr.contains("field `consumer_group_id`"), "{stderr}");

    let (code, stderr) = listen_with(BASE, &[("ALIBABA_CLOUD_ACCESS_KEY_ID", "id")]);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("field `access_key_secret`")
            && stderr.contains("ALIBABA_CLOUD_ACCESS_KEY_SECRET is not set"),
        "{stderr}"
    );

    let (code, stderr) = listen_with(
        &format!("{BASE}ca_file = \"/nonexistent/ca.pem\""),
        &[
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", "id"),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "s"),
        ],
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("field `ca_file`"), "{stderr}");
}

#[test]
fn amqp_profiles_reject_alibaba_fields_and_need_their_password() {
    const AMQP: &str =
        "kind = \"amqp\"\nhost = \"mq.example\"\nusername = \"u\"\nsource = \"/amq/queue/q\"\n";
    let (code, stderr) = listen_with(
        &format!("{AMQP}consumer_group_id = \"G\""),
        &[("IOT_SUB_AMQP_PASSWORD", "pw-1f3c9a")],
    );
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("field `consumer_group_id`") && stderr.contains("Alibaba Cloud field"),
        "{stderr}"
    );

    let (code, stderr) = listen_with(&format!("{BASE}password = \"pw\""), &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("field `password`"), "{stderr}");

    let (code, stderr) = listen_with(&format!("{AMQP}cloud = \"amqp\""), &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("field `cloud`"), "{stderr}");

    let (code, stderr) = listen_with(AMQP, &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("field `password`") && stderr.contains("IOT_SUB_AMQP_PASSWORD is not set"),
        "{stderr}"
    );
}

#[test]
fn unknown_profile_and_missing_file_are_config_errors() {
    let (code, stderr) = listen_with(BASE, &[]);
    assert_eq!(code, 78, "{stderr}"); // no credentials in env

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("[profiles.prod]\n{BASE}")).unwrap();
    let out = Command::new(common::bin())
        .args(["listen", "--profile", "staging", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no profile `staging`") && stderr.contains("prod"),
        "{stderr}"
    );

    let out = Command::new(common::bin())
        .args([
            "listen",
            "--profile",
            "x",
            "--config",
            "/nonexistent/iot-sub.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/iot-sub.toml"));
}

#[test]
fn demo_profile_works_with_no_config_file() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.args(["listen", "--profile", "demo", "--count", "3"])
        .env_remove("IOT_SUB_CONFIG")
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path());
    let mut client = Client::spawn(cmd);
    let lines = client.read_lines(3, Duration::from_secs(20));
    for line in &lines {
        assert!(line["topic"].as_str().unwrap().starts_with('/'), "{line}");
        assert!(line["messageId"].is_string());
        assert!(line["generateTime"].is_i64());
    }
    let status = client.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", client.stderr());
}

#[test]
fn the_build_has_no_aws_lc_rs() {
    // TLS is rustls on ring; fe2o3-amqp's own rustls feature would pull in aws-lc-rs.
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    assert!(
        lock.contains("name = \"rustls\""),
        "the lock file lists packages"
    );
    assert!(!lock.contains("name = \"aws-lc-rs\"") && !lock.contains("name = \"aws-lc-sys\""));
}

#[test]
fn standalone_emulator_serves_messages_from_a_file() {
    let feed_dir = tempfile::tempdir().unwrap();
    let feed = feed_dir.path().join("feed.jsonl");
    std::fs::write(
        &feed,
        "{\"topic\":\"/a1F/d1/user/up\",\"messageId\":\"f-1\",\"generateTime\":1700000000001,\"body\":{\"t\":1}}\n\
         {\"topic\":\"/a1F/d1/user/raw\",\"messageId\":\"f-2\",\"bodyBase64\":\"AAEC\"}\n\
         {\"topic\":\"/a1F/d1/user/text\",\"messageId\":\"f-3\",\"body\":\"hello\"}\n",
    )
    .unwrap();
    let (server, _dir, config) =
        standalone(&["--rate", "0", "--from-file", feed.to_str().unwrap()], "");
    let listen = listen_to(&config, &["--count", "3"]);
    let mut client = Client::spawn(listen);
    let lines = client.read_lines(3, Duration::from_secs(20));
    assert!(client.wait(Duration::from_secs(20)).success());
    let mut got: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["messageId"].as_str().unwrap().into(),
                l["bodyEncoding"].as_str().unwrap().into(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("f-1".into(), "json".into()),
            ("f-2".into(), "base64".into()),
            ("f-3".into(), "text".into())
        ]
    );
    server.signal("INT");
}

#[test]
fn emulate_drops_connections_on_sigusr1_and_the_client_reconnects() {
    let (server, _dir, config) = standalone(&["--rate", "50"], "backoff_initial = \"50ms\"");
    let listen = listen_to(&config, &[]);
    let mut client = Client::spawn(listen);
    client.read_lines(5, Duration::from_secs(20));
    server.signal("USR1");
    client.wait_stderr("9602", 1, Duration::from_secs(20));
    client.wait_stderr("receiver link attached", 2, Duration::from_secs(20));
    client.read_lines(5, Duration::from_secs(20));
    client.signal("TERM");
    assert!(client.wait(Duration::from_secs(20)).success());
    server.signal("INT");
}

#[test]
fn a_second_signal_exits_at_once_with_130() {
    // stdout is a pipe nobody reads: the first SIGTERM waits for the batch being written;
    // the second must not.
    let (server, _dir, config) = standalone(&["--rate", "5000"], "");
    let mut child = listen_to(&config, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let the pipe fill up (64 KiB at ~300 bytes a line).
    std::thread::sleep(Duration::from_secs(2));
    let pid = child.id().to_string();
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    kill("-TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still finishing the stalled write"
    );
    let sent = std::time::Instant::now();
    kill("-TERM");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "did not exit at once"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(130));
    server.signal("INT");
}

/// `iot-sub emulate` on a free loopback port with the AccessKey `id`/`secret`, and a profile `t`
/// (in the returned directory) pointing at it with `extra` lines. Returns the server too.
fn standalone(args: &[&str], extra: &str) -> (Client, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let mut emulate = Command::new(common::bin());
    emulate
        .args(["emulate", "--listen", "127.0.0.1:0", "--ca-out"])
        .arg(&ca)
        .args(args)
        .env("ALIBABA_CLOUD_ACCESS_KEY_ID", "sa-id")
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "sa-secret");
    let server = Client::spawn(emulate);
    server.wait_stderr("emulator ready", 1, Duration::from_secs(20));
    let log = server.stderr();
    let port: u16 = log
        .split("addr=127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port in {log}"));
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.t]\nhost = \"localhost\"\nport = {port}\nca_file = \"ca.pem\"\n\
             consumer_group_id = \"DEFAULT_GROUP\"\naccess_key_id = \"sa-id\"\n{extra}\n"
        ),
    )
    .unwrap();
    (server, dir, config)
}

/// `iot-sub listen --profile t --config <config> <args>` with the standalone emulator's secret.
fn listen_to(config: &std::path::Path, args: &[&str]) -> Command {
    let mut listen = Command::new(common::bin());
    listen
        .args(["listen", "--profile", "t", "--config"])
        .arg(config)
        .args(args)
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "sa-secret");
    listen
}
