//! No secret in any output of the real binary: the AccessKey secret, the STS token and the SASL
//! password signed with them never appear in `listen` or `check` (text and `--json`) stdout or
//! stderr, at every log level and format (`RUST_LOG=fe2o3_amqp=trace` included, whose SASL
//! trace would print the PLAIN response as a byte list), on good and on refused logins, with
//! credentials from the environment, a credential command and the Alibaba Cloud CLI's file.
//! Not whole, not any 8-character piece, not as those bytes in decimal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{bin, json_message, run_to_end, Client, World, KEY_ID};
use iot_sub::cloud::alibaba::{self, AuthMode, LoginParams, SignMethod};
use iot_sub::emulator::{AuthFailure, StsToken};
use iot_sub::secret::Secret;

const T: Duration = Duration::from_secs(20);

/// The AccessKey secret the emulator accepts for `KEY_ID`.
const SECRET: &str = "Sx9fQ2mWv7LkT4pZr8NcY3hB";
/// A wrong secret, for refused logins.
const WRONG: &str = "Wq5Hn8Jd2Kf6Lp9Mz3Xc7Vb1";
/// STS credentials of a RAM role.
const STS_ID: &str = "STS.NTsecretsTestRole";
const STS_SECRET: &str = "Ks3Jd8Wq1Zm6Xv0Rb5Tn2Yc7";
const TOKEN: &str = "CAIS.Tk7Pq2Wz9Lm4Xr1Vb6Nd3Hs8Fg5Jc0Qa";

/// Log settings: arguments, and `RUST_LOG` (`None`: unset, so `--log-level` decides).
const LOG_SETTINGS: [(&[&str], Option<&str>); 8] = [
    (&["--log-level", "info"], None),
    (&["--log-level", "debug"], None),
    (&["--log-level", "trace"], None),
    (&["--log-level", "trace", "--log-format", "json"], None),
    (&[], Some("trace")),
    // Names fe2o3 itself, so its own traces (SASL frames among them) are asked for.
    (
        &[],
        Some("trace,fe2o3_amqp=trace,rustls=trace,[negotiate_sasl]=trace"),
    ),
    (&["--log-format", "json"], Some("info,fe2o3_amqp=trace")),
    // A span directive enables fe2o3's SASL trace even past the default `fe2o3_amqp=off`.
    (&[], Some("info,[negotiate_sasl]=trace")),
];

/// Whose credentials a run uses.
#[derive(Clone, Copy)]
struct Identity {
    key_id: &'static str,
    secret: &'static str,
    token: Option<&'static str>,
}

const AK: Identity = Identity {
    key_id: KEY_ID,
    secret: SECRET,
    token: None,
};
const AK_WRONG: Identity = Identity {
    key_id: KEY_ID,
    secret: WRONG,
    token: None,
};
const STS: Identity = Identity {
    key_id: STS_ID,
    secret: STS_SECRET,
    token: Some(TOKEN),
};

impl Identity {
    /// The password this identity signs at `timestamp_ms` (client `test-client`, hmacsha1).
    fn password(self, timestamp_ms: u64) -> String {
        alibaba::sign(
            &LoginParams {
                client_id: "test-client".into(),
                iot_instance_id: None,
                consumer_group_id: "DEFAULT_GROUP".into(),
                auth_mode: if self.token.is_some() {
                    AuthMode::Ststoken
                } else {
                    AuthMode::Aksign
                },
                sign_method: SignMethod::Hmacsha1,
                access_key_id: self.key_id.into(),
                access_key_secret: Secret::new(self.secret),
                security_token: self.token.map(Secret::new),
            },
            timestamp_ms,
        )
        .password
        .expose()
        .to_string()
    }
}

/// The forms of `value` a leak could take: any 8-character window, as text and as the
/// decimal byte list Rust's `Debug` prints for bytes (`83, 120, 57, ...`).
fn leak_forms(value: &str) -> Vec<String> {
    let bytes = value.as_bytes();
    let mut forms = Vec::new();
    for w in bytes.windows(8.min(bytes.len())) {
        forms.push(String::from_utf8_lossy(w).into_owned());
        let decimal: Vec<String> = w.iter().map(u8::to_string).collect();
        forms.push(decimal.join(", "));
    }
    forms
}

/// Fails if `output` holds any part of the identity's secret, token or of a password it
/// signed at a timestamp the output names (the signed username shows it). Returns how many
/// passwords were looked for, so a caller can insist there was one.
fn assert_no_leak(what: &str, output: &str, id: Identity) -> usize {
    let mut values = vec![id.secret.to_string()];
    values.extend(id.token.map(str::to_string));
    let timestamps: Vec<u64> = output
        .split("timestamp=")
        .skip(1)
        .filter_map(|rest| rest.get(..13).and_then(|t| t.parse().ok()))
        .collect();
    values.extend(timestamps.iter().map(|&ts| id.password(ts)));
    for value in &values {
        for form in leak_forms(value) {
            assert!(
                !output.contains(&form),
                "{what}: `{form}` (part of a secret value) is in the output:\n{output}"
            );
        }
    }
    timestamps.len()
}

/// A profile `t` for the emulator with `credentials` lines (no `access_key_id` unless given).
fn profile(world: &World, credentials: &str) -> PathBuf {
    let path = world
        .dir
        .path()
        .join(format!("secrets-{}.toml", fastrand::u32(..)));
    std::fs::write(
        &path,
        format!(
            "[profiles.t]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\n\
             consumer_group_id = \"DEFAULT_GROUP\"\nclient_id = \"test-client\"\n\
             backoff_initial = \"100ms\"\n{credentials}\n",
            world.emulator.local_addr().port(),
            world.ca.display(),
        ),
    )
    .unwrap();
    path
}

/// `iot-sub <args> --config <config> --profile t <log args>` with a clean credential
/// environment plus `env`, and `RUST_LOG` as given.
fn command(
    args: &[&str],
    config: &Path,
    log: (&[&str], Option<&str>),
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .args(["--profile", "t"])
        .args(log.0)
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
        .env_remove("IOT_SUB_CONFIG")
        .env_remove("RUST_LOG");
    if let Some(filter) = log.1 {
        cmd.env("RUST_LOG", filter);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// `check` masks each secret down to its length: no character of it.
fn assert_masked(what: &str, check_text: &str, id: Identity) {
    let row = |label: &str| -> String {
        check_text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("{what}: no `{label}` row:\n{check_text}"))
            .trim_start()[label.len()..]
            .trim()
            .to_string()
    };
    assert_eq!(
        row("AccessKey secret"),
        format!("*** ({} chars)", id.secret.len()),
        "{what}"
    );
    assert_eq!(row("password"), "*** (28 chars)", "{what}");
    if let Some(token) = id.token {
        assert_eq!(
            row("security token"),
            format!("*** ({} chars)", token.len()),
            "{what}"
        );
    }
}

/// Runs `listen --count 1`, `check` and `check --json` under every log setting; each must
/// succeed and show nothing secret.
async fn good_runs_show_nothing_secret(
    world: &World,
    config: &Path,
    id: Identity,
    env: &[(&str, &str)],
) {
    for (i, log) in LOG_SETTINGS.into_iter().enumerate() {
        let what = format!("{:?} RUST_LOG={:?}", log.0, log.1);
        world.emulator.publish(json_message(i));
        let r = run_to_end(command(&["listen", "--count", "1"], config, log, env));
        assert_eq!(r.code, 0, "{what}:\n{}", r.stderr);
        assert_eq!(r.stdout.lines().count(), 1, "{what}: {}", r.stdout);
        let all = format!("{}\n{}", r.stdout, r.stderr);
        assert!(
            assert_no_leak(&format!("listen {what}"), &all, id) >= 1,
            "listen {what}: no signed username logged, so no password was looked for:\n{all}"
        );

        for json in [false, true] {
            let args: &[&str] = if json {
                &["check", "--json"]
            } else {
                &["check"]
            };
            let r = run_to_end(command(args, config, log, env));
            let what = format!("{args:?} {what}");
            assert_eq!(r.code, 0, "{what}:\n{}\n{}", r.stdout, r.stderr);
            let all = format!("{}\n{}", r.stdout, r.stderr);
            assert!(assert_no_leak(&what, &all, id) >= 1, "{what}:\n{all}");
            if json {
                let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
                let c = &v["credentials"];
                assert_eq!(
                    c["access_key_secret"],
                    format!("*** ({} chars)", id.secret.len())
                );
                assert_eq!(c["password"], "*** (28 chars)");
            } else {
                assert_masked(&what, &r.stdout, id);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_key_from_the_environment_never_shows_at_any_log_level() {
    let mut config = common::test_config();
    config.access_keys = vec![(KEY_ID.to_string(), Secret::new(SECRET))];
    let world = World::start_with(config).await;
    let path = profile(&world, &format!("access_key_id = \"{KEY_ID}\""));
    let env = [("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET)];
    good_runs_show_nothing_secret(&world, &path, AK, &env).await;
}

fn sts_config() -> iot_sub::emulator::EmulatorConfig {
    let mut config = common::test_config();
    config.sts_tokens = vec![StsToken {
        access_key_id: STS_ID.into(),
        access_key_secret: Secret::new(STS_SECRET),
        token: Secret::new(TOKEN),
        expires_at: Some(SystemTime::now() + Duration::from_secs(3600)),
    }];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_credentials_from_a_credential_command_never_show() {
    let world = World::start_with(sts_config()).await;
    let expiration =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    // The secrets are in the command line itself, as `aliyun sts AssumeRole` output would be
    // if piped through `echo`: the command must not be quoted anywhere either.
    let json = format!(
        r#"{{"RequestId":"r1","Credentials":{{"AccessKeyId":"{STS_ID}","AccessKeySecret":"{STS_SECRET}","SecurityToken":"{TOKEN}","Expiration":"{expiration}"}}}}"#
    );
    let path = profile(
        &world,
        &format!("credential_command = '''printf '%s\\n' '{json}''''"),
    );
    good_runs_show_nothing_secret(&world, &path, STS, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_credentials_from_the_aliyun_cli_file_never_show() {
    let world = World::start_with(sts_config()).await;
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".aliyun")).unwrap();
    std::fs::write(
        home.path().join(".aliyun").join("config.json"),
        format!(
            r#"{{"current":"sts","profiles":[{{"name":"sts","mode":"StsToken","access_key_id":"{STS_ID}","access_key_secret":"{STS_SECRET}","sts_token":"{TOKEN}","region_id":"cn-shanghai"}}]}}"#
        ),
    )
    .unwrap();
    let path = profile(&world, "aliyun_profile = \"sts\"");
    let home_dir = home.path().to_str().unwrap();
    good_runs_show_nothing_secret(&world, &path, STS, &[("HOME", home_dir)]).await;
}

/// A wrong secret, refused in `failure`'s form: `listen` retries (each refusal logged) and
/// `check` exits 13, and neither shows the wrong secret or the password signed with it.
async fn refused_logins_show_nothing_secret(failure: AuthFailure) {
    let mut config = common::test_config();
    config.access_keys = vec![(KEY_ID.to_string(), Secret::new(SECRET))];
    config.auth_failure = failure;
    let world = World::start_with(config).await;
    let path = profile(&world, &format!("access_key_id = \"{KEY_ID}\""));
    let env = [("ALIBABA_CLOUD_ACCESS_KEY_SECRET", WRONG)];
    for log in [LOG_SETTINGS[3], LOG_SETTINGS[5], LOG_SETTINGS[7]] {
        let what = format!("{failure:?} {:?} RUST_LOG={:?}", log.0, log.1);
        let mut client = Client::spawn(command(&["listen"], &path, log, &env));
        client.wait_stderr("LOGIN REJECTED", 2, T);
        client.signal("TERM");
        assert!(client.wait(T).success(), "{what}");
        let stderr = client.stderr();
        assert!(
            assert_no_leak(&what, &stderr, AK_WRONG) >= 2,
            "{what}:\n{stderr}"
        );

        for args in [&["check"][..], &["check", "--json"]] {
            let r = run_to_end(command(args, &path, log, &env));
            assert_eq!(r.code, 13, "{what}:\n{}\n{}", r.stdout, r.stderr);
            let all = format!("{}\n{}", r.stdout, r.stderr);
            assert!(assert_no_leak(&what, &all, AK_WRONG) >= 1, "{what}:\n{all}");
        }
    }
    assert!(world.emulator.stats().logins_failed >= 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_by_sasl_shows_nothing_secret() {
    refused_logins_show_nothing_secret(AuthFailure::SaslOutcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_by_a_close_after_open_shows_nothing_secret() {
    refused_logins_show_nothing_secret(AuthFailure::CloseUnauthorized).await;
}

#[test]
fn config_errors_never_quote_a_secret() {
    // Syntax and type errors on the secret's own line: the line and the value stay unquoted.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for line in [
        format!("access_key_secret = \"{SECRET}"),
        format!("access_key_secret = {SECRET}"),
        format!("security_token = [\"{TOKEN}\"]"),
        format!("credential_command = {{ run = \"echo {SECRET}\" }}"),
    ] {
        std::fs::write(
            &path,
            format!("[profiles.t]\nhost = \"localhost\"\nconsumer_group_id = \"G\"\n{line}\n"),
        )
        .unwrap();
        for sub in ["listen", "check"] {
            let r = run_to_end(command(&[sub], &path, LOG_SETTINGS[2], &[]));
            assert_eq!(r.code, 78, "{line}:\n{}\n{}", r.stdout, r.stderr);
            let all = format!("{}\n{}", r.stdout, r.stderr);
            assert!(all.contains("config error"), "{all}");
            assert_no_leak(&line, &all, STS);
            assert_no_leak(&line, &all, AK);
        }
    }
}
