//! `iot-sub check` against the emulator over TLS (every step timed, the failing step named by
//! the exit status, nothing secret printed), and `completions` and `man`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{run, Run, World, KEY_ID, KEY_SECRET};
use iot_sub::emulator::AuthFailure;
use iot_sub::secret::Secret;

const STEPS: [&str; 9] = [
    "config",
    "credentials",
    "dns",
    "tcp",
    "tls",
    "sasl",
    "open",
    "attach",
    "close",
];

/// `iot-sub check --config <config> --profile t <extra>`.
fn check(config: &Path, extra: &[&str], secret: &str) -> Run {
    let config = config.to_str().unwrap();
    let mut args = vec!["check", "--config", config, "--profile", "t"];
    args.extend_from_slice(extra);
    run(&args, Some(secret), &[])
}

/// The line of step `name` in the readable output.
fn step_line<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no `{name}` step:\n{stdout}"))
}

/// Neither the secret nor the password signed with it at the printed timestamp appears
/// anywhere; the password's masked form does.
fn assert_nothing_secret(r: &Run, secret: &str) {
    let all = format!("{}\n{}", r.stdout, r.stderr);
    assert!(!all.contains(secret), "secret leaked:\n{all}");
    let ts: u64 = r
        .stdout
        .split("timestamp=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no signed username shown:\n{}", r.stdout));
    let password = common::test_password(secret, ts);
    assert!(!all.contains(&password), "password leaked:\n{all}");
    assert!(
        r.stdout.contains(&Secret::new(password.clone()).masked()),
        "the masked password is shown:\n{}",
        r.stdout
    );
}

/// A profile `t` for an endpoint with nothing behind it.
fn profile_at(host: &str, port: u16, extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[profiles.t]\nhost = \"{host}\"\nport = {port}\nconsumer_group_id = \"DEFAULT_GROUP\"\n\
             client_id = \"test-client\"\naccess_key_id = \"{KEY_ID}\"\n{extra}\n"
        ),
    )
    .unwrap();
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_profile_passes_every_step_with_its_time_and_prints_no_secret() {
    let world = World::start().await;
    let r = check(&world.profile(""), &[], KEY_SECRET);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for step in STEPS {
        let line = step_line(&r.stdout, step);
        assert!(line.trim_start().starts_with("ok "), "{line}");
        assert!(line.contains(" ms "), "no time: {line}");
    }
    assert!(r.stdout.contains("OK: every step passed (exit 0)"));
    assert!(r.stdout.contains(&format!("AccessKey id      {KEY_ID}")));
    assert!(
        r.stdout.contains("AccessKey secret  *** (22 chars)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("60000 ms sent in Open"), "{}", r.stdout);
    assert!(r
        .stdout
        .contains("test-client|authMode=aksign,signMethod=hmacsha1,timestamp="));
    assert_nothing_secret(&r, KEY_SECRET);
    let stats = world.emulator.stats();
    assert_eq!((stats.connections_accepted, stats.logins_failed), (1, 0));
}

async fn wrong_secret_case(failure: AuthFailure) -> Run {
    let mut config = common::test_config();
    config.auth_failure = failure;
    let world = World::start_with(config).await;
    let wrong = "wrong-secret-0123456789";
    let r = check(&world.profile(""), &[], wrong);
    assert_eq!(r.code, 13, "{}\n{}", r.stdout, r.stderr);
    let line = step_line(&r.stdout, "sasl");
    assert!(
        line.contains("FAILED") && line.contains("login rejected"),
        "{line}"
    );
    assert!(
        r.stdout
            .contains("hint: check the AccessKey id and secret, auth_mode"),
        "{}",
        r.stdout
    );
    for later in ["open", "attach", "close"] {
        assert!(step_line(&r.stdout, later).contains("not run"));
    }
    assert!(r.stdout.contains("FAILED at step `sasl` (exit 13)"));
    assert_nothing_secret(&r, wrong);
    assert!(!r.stdout.contains(KEY_SECRET) && !r.stderr.contains(KEY_SECRET));
    assert_eq!(world.emulator.stats().logins_failed, 1);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_refused_by_sasl_fails_the_login_step() {
    let r = wrong_secret_case(AuthFailure::SaslOutcome).await;
    assert!(r.stdout.contains("SASL outcome"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_refused_by_a_close_after_open_fails_the_login_step_with_a_note() {
    let r = wrong_secret_case(AuthFailure::CloseUnauthorized).await;
    assert!(
        r.stdout.contains("amqp:unauthorized-access"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("note: SASL PLAIN went through"),
        "{}",
        r.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_right_after_open_fails_the_open_step() {
    // A consumer group with no room left: refused like Aliyun's 9600, with a close after Open.
    let mut config = common::test_config();
    config.max_connections = 0;
    let world = World::start_with(config).await;
    let r = check(&world.profile(""), &[], KEY_SECRET);
    assert_eq!(r.code, 14, "{}\n{}", r.stdout, r.stderr);
    assert!(step_line(&r.stdout, "sasl").trim_start().starts_with("ok"));
    let line = step_line(&r.stdout, "open");
    assert!(line.contains("FAILED") && line.contains("9600"), "{line}");
    assert!(
        r.stdout
            .contains("hint: the server closed the connection right after Open"),
        "{}",
        r.stdout
    );
    assert!(step_line(&r.stdout, "attach").contains("not run"));
}

#[test]
fn a_port_with_nothing_listening_fails_the_tcp_step() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (_dir, config) = profile_at("localhost", port, "");
    let r = check(&config, &[], KEY_SECRET);
    assert_eq!(r.code, 11, "{}\n{}", r.stdout, r.stderr);
    assert!(step_line(&r.stdout, "dns").trim_start().starts_with("ok"));
    let line = step_line(&r.stdout, "tcp");
    assert!(
        line.contains("FAILED") && line.contains("TCP connect"),
        "{line}"
    );
    assert!(
        r.stdout.contains("hint: nothing accepts connections"),
        "{}",
        r.stdout
    );
}

#[test]
fn a_host_that_does_not_resolve_fails_the_dns_step() {
    let (_dir, config) = profile_at("nonexistent.invalid", 5671, "");
    let r = check(&config, &[], KEY_SECRET);
    assert_eq!(r.code, 10, "{}\n{}", r.stdout, r.stderr);
    let line = step_line(&r.stdout, "dns");
    assert!(
        line.contains("FAILED") && line.contains("nonexistent.invalid"),
        "{line}"
    );
    assert!(r.stdout.contains("hint: check `host`"), "{}", r.stdout);
    assert!(step_line(&r.stdout, "tcp").contains("not run"));
}

#[test]
fn a_bad_profile_or_a_missing_credential_is_exit_78() {
    let (_dir, config) = profile_at("localhost", 5671, "idle_timeout = \"10s\"");
    let r = check(&config, &[], KEY_SECRET);
    assert_eq!(r.code, 78, "{}\n{}", r.stdout, r.stderr);
    let line = step_line(&r.stdout, "config");
    assert!(
        line.contains("FAILED") && line.contains("idle_timeout") && line.contains("30s to 300s"),
        "{line}"
    );
    assert!(r.stdout.contains(config.to_str().unwrap()));

    let (_dir, config) = profile_at("localhost", 5671, "");
    let config = config.to_str().unwrap();
    let r = run(&["check", "--config", config, "--profile", "t"], None, &[]);
    assert_eq!(r.code, 78, "{}\n{}", r.stdout, r.stderr);
    let line = step_line(&r.stdout, "credentials");
    assert!(
        line.contains("FAILED") && line.contains("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
        "{line}"
    );
    assert!(step_line(&r.stdout, "dns").contains("not run"));

    let r = run(
        &["check", "--config", config, "--profile", "nope"],
        None,
        &[],
    );
    assert_eq!(r.code, 78, "{}\n{}", r.stdout, r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_has_every_step_and_the_servers_idle_timeout() {
    let mut config = common::test_config();
    config.advertised_idle_timeout = Some(Duration::from_secs(45));
    let world = World::start_with(config).await;
    let r = check(&world.profile(""), &["--json"], KEY_SECRET);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.stdout.lines().count(), 1, "one JSON object: {}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("stdout is JSON");
    assert_eq!(v["ok"], true);
    assert_eq!(v["exit_status"], 0);
    assert_eq!(v["profile"], "t");
    assert_eq!(v["endpoint"]["idle_timeout_ms"], 60_000);
    assert_eq!(v["endpoint"]["server_idle_timeout_ms"], 45_000);
    assert_eq!(v["credentials"]["access_key_id"], KEY_ID);
    assert_eq!(v["credentials"]["access_key_secret"], "*** (22 chars)");
    let steps = v["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, STEPS);
    for s in steps {
        assert_eq!(s["status"], "ok", "{s}");
        assert!(s["ms"].as_f64().unwrap() >= 0.0, "{s}");
    }
    assert_nothing_secret(&r, KEY_SECRET);

    // A failure: the failed step and the exit status say which.
    let (_dir, config) = profile_at("nonexistent.invalid", 5671, "");
    let r = check(&config, &["--json"], KEY_SECRET);
    assert_eq!(r.code, 10);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("stdout is JSON");
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_status"], 10);
    assert_eq!(v["failed_step"], "dns");
    assert_eq!(v["steps"][2]["status"], "failed");
    assert!(v["steps"][2]["hint"].is_string());
    assert_eq!(v["steps"][3]["status"], "skipped");
    assert!(v["steps"][3]["ms"].is_null());
}

#[test]
fn the_demo_profile_checks_out_with_no_config_file() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap();
    let r = run(
        &["check", "--profile", "demo"],
        None,
        &[("HOME", home), ("XDG_CONFIG_HOME", home)],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for step in STEPS {
        assert!(step_line(&r.stdout, step).trim_start().starts_with("ok "));
    }
}

#[test]
fn completions_and_man_page() {
    let r = run(&["completions", "bash"], None, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("listen") && r.stdout.contains("check"));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let r = run(&["completions", shell], None, &[]);
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(r.stdout.contains("listen"), "{shell}");
    }
    let r = run(&["man"], None, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with(".TH") || r.stdout.starts_with(".ie"),
        "not roff: {}",
        &r.stdout[..r.stdout.len().min(200)]
    );
    assert!(r.stdout.contains("check"));

    let dir = tempfile::tempdir().unwrap();
    let r = run(
        &["man", "--out-dir", dir.path().to_str().unwrap()],
        None,
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    for page in ["iot-sub.1", "iot-sub-listen.1", "iot-sub-check.1"] {
        assert!(dir.path().join(page).exists(), "{page}");
    }
}
