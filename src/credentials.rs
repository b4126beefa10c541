//! Reads a profile's AccessKey id, secret and STS token (or, for `kind = "amqp"`, its password)
//! from where the profile says they are: environment variables, files, systemd credentials, a
//! credential command, or a profile of the Alibaba Cloud CLI. Read again before every
//! connection attempt, so a rotated file or token is picked up; a command's `expiration` tells
//! the supervisor when to rotate.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cloud::alibaba::{self, AuthMode, LoginParams};
use crate::cloud::SaslCredentials;
use crate::config::{PlainLogin, Profile, SecretSource};
use crate::secret::Secret;

/// A credential command that runs longer is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this much of a command's output is read.
const COMMAND_OUTPUT_LIMIT: u64 = 64 * 1024;

/// A credential could not be read; the message names the source but never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct CredentialError {
    /// Which credential or source, for example "access_key_secret" or "credential_command".
    pub what: &'static str,
    /// Why, naming the variable, file or command.
    pub why: String,
}

fn fail(what: &'static str, why: impl Into<String>) -> CredentialError {
    CredentialError {
        what,
        why: why.into(),
    }
}

/// What a connection attempt logs in with, read now.
#[derive(Debug, Clone)]
pub enum Login {
    /// Alibaba Cloud: signed afresh for every attempt.
    Alibaba(LoginParams),
    /// `kind = "amqp"`: the username and password as they are.
    Plain(SaslCredentials),
}

impl Login {
    /// The SASL PLAIN credentials for one attempt by `client_id`, signed at `now_ms` if signing
    /// is needed.
    pub fn sasl(&self, client_id: &str, now_ms: u64) -> SaslCredentials {
        match self {
            Login::Alibaba(params) => {
                let mut params = params.clone();
                params.client_id = client_id.to_string();
                alibaba::sign(&params, now_ms)
            }
            Login::Plain(creds) => creds.clone(),
        }
    }

    /// The username as it may be logged: Aliyun's with its token masked, a plain one in full.
    pub fn shown_username(&self, creds: &SaslCredentials) -> String {
        match self {
            Login::Alibaba(_) => alibaba::masked_username(&creds.username),
            Login::Plain(_) => creds.username.clone(),
        }
    }
}

/// Credentials read now, and when they stop working (STS).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// What the login needs.
    pub login: Login,
    /// When the credentials expire, if they say.
    pub expires_at: Option<SystemTime>,
}

fn read(what: &'static str, source: &SecretSource) -> Result<Secret, CredentialError> {
    let value = match source {
        SecretSource::Inline(v) => v.clone(),
        SecretSource::Env(var) => std::env::var(var).map_err(|e| {
            fail(
                what,
                match e {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {var} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {var} is not UTF-8")
                    }
                },
            )
        })?,
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| fail(what, format!("cannot read {}: {e}", path.display())))?,
        SecretSource::Credential(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                fail(
                    what,
                    format!("systemd credential {name}: CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"),
                )
            })?;
            let path = PathBuf::from(dir).join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| fail(what, format!("cannot read {}: {e}", path.display())))?
        }
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(fail(what, format!("{source} is empty")));
    }
    Ok(Secret::new(value))
}

/// The three values and an expiry, from whichever source.
struct Raw {
    id: String,
    secret: Secret,
    token: Option<Secret>,
    expires_at: Option<SystemTime>,
}

/// Everything needed to log in with `profile`, read now. Runs a credential command, so from
/// async code use [`resolve_fresh`].
pub fn resolve(profile: &Profile) -> Result<Login, CredentialError> {
    resolve_with_expiry(profile).map(|c| c.login)
}

/// Like [`resolve`], on the blocking pool (a credential command may take a while).
pub async fn resolve_fresh(profile: &Profile) -> Result<Credentials, CredentialError> {
    let profile = profile.clone();
    tokio::task::spawn_blocking(move || resolve_with_expiry(&profile))
        .await
        .map_err(|e| fail("credentials", format!("reading credentials failed: {e}")))?
}

fn resolve_with_expiry(profile: &Profile) -> Result<Credentials, CredentialError> {
    if let Some(PlainLogin { username, password }) = &profile.plain_login {
        return Ok(Credentials {
            login: Login::Plain(SaslCredentials {
                username: username.clone(),
                password: read("password", password)?,
            }),
            expires_at: None,
        });
    }
    let raw = if let Some(command) = &profile.credential_command {
        run_command(command)?
    } else if let Some(name) = &profile.aliyun_profile {
        aliyun_cli_profile(name)?
    } else {
        Raw {
            id: read("access_key_id", &profile.access_key_id)?
                .expose()
                .to_string(),
            secret: read("access_key_secret", &profile.access_key_secret)?,
            token: match &profile.security_token {
                Some(source) => Some(read("security_token", source)?),
                None => None,
            },
            expires_at: None,
        }
    };
    // A source that hands out a token means STS, unless the profile said otherwise.
    let auth_mode = match (profile.auth_mode_explicit, &raw.token) {
        (false, Some(_)) => AuthMode::Ststoken,
        _ => profile.auth_mode,
    };
    if auth_mode == AuthMode::Ststoken && raw.token.is_none() {
        return Err(fail(
            "security_token",
            "auth_mode is ststoken but the credentials have no security token",
        ));
    }
    Ok(Credentials {
        login: Login::Alibaba(LoginParams {
            client_id: profile.client_id.clone(),
            iot_instance_id: profile.iot_instance_id.clone(),
            consumer_group_id: profile.consumer_group_id.clone(),
            auth_mode,
            sign_method: profile.sign_method,
            access_key_id: raw.id,
            access_key_secret: raw.secret,
            security_token: raw.token,
        }),
        expires_at: raw.expires_at,
    })
}

/// Runs `sh -c command` and reads the credentials from the JSON it prints: keys `id`,
/// `secret`, `token`, `expiration` (or `access_key_id`, ..., or Aliyun's `AccessKeyId`,
/// `AccessKeySecret`, `SecurityToken`, `Expiration`, also inside a `Credentials` object as
/// `aliyun sts AssumeRole` prints them).
fn run_command(command: &str) -> Result<Raw, CredentialError> {
    const WHAT: &str = "credential_command";
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(WHAT, format!("cannot run the command: {e}")))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout)
            .take(COMMAND_OUTPUT_LIMIT)
            .read_to_end(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < COMMAND_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    WHAT,
                    format!("the command did not finish within {COMMAND_TIMEOUT:?}"),
                ));
            }
            Err(e) => return Err(fail(WHAT, format!("waiting for the command: {e}"))),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(fail(WHAT, format!("the command exited with {status}")));
    }
    let json: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| fail(WHAT, format!("the command did not print JSON ({e})")))?;
    let obj = json.get("Credentials").unwrap_or(&json);
    let field = |names: &[&str]| -> Option<String> {
        names.iter().find_map(|n| match obj.get(*n) {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                Some(s.trim().to_string())
            }
            _ => None,
        })
    };
    let id = field(&["id", "access_key_id", "AccessKeyId"])
        .ok_or_else(|| fail(WHAT, "the command printed no `id` (or AccessKeyId)"))?;
    let secret = field(&["secret", "access_key_secret", "AccessKeySecret"])
        .ok_or_else(|| fail(WHAT, "the command printed no `secret` (or AccessKeySecret)"))?;
    let token = field(&["token", "security_token", "SecurityToken"]).map(Secret::new);
    let expires_at = match ["expiration", "Expiration"]
        .iter()
        .find_map(|n| obj.get(*n))
    {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(parse_expiration(v).ok_or_else(|| {
            fail(
                WHAT,
                format!(
                    "the command printed an expiration that is not RFC 3339 or epoch seconds: {v}"
                ),
            )
        })?),
    };
    Ok(Raw {
        id,
        secret: Secret::new(secret),
        token,
        expires_at,
    })
}

/// `2026-11-22T06:00:00Z` (RFC 3339, as Aliyun STS writes it) or seconds since the epoch.
fn parse_expiration(v: &serde_json::Value) -> Option<SystemTime> {
    match v {
        serde_json::Value::String(s) => humantime::parse_rfc3339_weak(s.trim()).ok(),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
        _ => None,
    }
}

/// A profile of the Alibaba Cloud CLI in `~/.aliyun/config.json`; modes AK and StsToken.
fn aliyun_cli_profile(name: &str) -> Result<Raw, CredentialError> {
    const WHAT: &str = "aliyun_profile";
    let home = std::env::var_os("HOME").ok_or_else(|| fail(WHAT, "HOME is not set"))?;
    let path = PathBuf::from(home).join(".aliyun").join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        fail(
            WHAT,
            format!(
                "cannot read {}: {e} (run `aliyun configure`)",
                path.display()
            ),
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| fail(WHAT, format!("{} is not JSON: {e}", path.display())))?;
    let profiles = json["profiles"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let profile = profiles.iter().find(|p| p["name"] == name).ok_or_else(|| {
        let names: Vec<&str> = profiles.iter().filter_map(|p| p["name"].as_str()).collect();
        fail(
            WHAT,
            format!(
                "no profile `{name}` in {} (it has: {})",
                path.display(),
                names.join(", ")
            ),
        )
    })?;
    let get = |key: &str| {
        profile[key]
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let mode = get("mode").unwrap_or("AK");
    let missing = |key: &str| {
        fail(
            WHAT,
            format!("profile `{name}` in {} has no `{key}`", path.display()),
        )
    };
    let id = get("access_key_id")
        .ok_or_else(|| missing("access_key_id"))?
        .to_string();
    let secret = Secret::new(get("access_key_secret").ok_or_else(|| missing("access_key_secret"))?);
    let token = match mode {
        "AK" => None,
        "StsToken" => Some(Secret::new(get("sts_token").ok_or_else(|| missing("sts_token"))?)),
        other => {
            return Err(fail(
                WHAT,
                format!("profile `{name}` uses mode {other}; iot-sub reads modes AK and StsToken (for others use credential_command)"),
            ))
        }
    };
    Ok(Raw {
        id,
        secret,
        token,
        expires_at: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sources_are_read_and_trimmed_and_errors_name_the_source_only() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "  file-secret  ").unwrap();
        assert_eq!(
            read("x", &SecretSource::File(f.path().into()))
                .unwrap()
                .expose(),
            "file-secret"
        );
        assert_eq!(
            read("x", &SecretSource::Inline("v".into()))
                .unwrap()
                .expose(),
            "v"
        );
        let e = read(
            "access_key_secret",
            &SecretSource::Env("IOT_SUB_TEST_SURELY_UNSET".into()),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "access_key_secret: environment variable IOT_SUB_TEST_SURELY_UNSET is not set"
        );
        let e = read("t", &SecretSource::Inline("   ".into())).unwrap_err();
        assert_eq!(e.to_string(), "t: the config file is empty");
    }

    #[test]
    fn commands_print_json_in_several_spellings() {
        let raw = run_command(
            r#"echo '{"id":"STS.a","secret":"s","token":"t","expiration":"2030-01-02T03:04:05Z"}'"#,
        )
        .unwrap();
        assert_eq!(raw.id, "STS.a");
        assert_eq!(raw.token.unwrap().expose(), "t");
        assert_eq!(
            raw.expires_at,
            Some(humantime::parse_rfc3339("2030-01-02T03:04:05Z").unwrap())
        );
        let raw = run_command(
            r#"echo '{"RequestId":"x","Credentials":{"AccessKeyId":"STS.b","AccessKeySecret":"s2","SecurityToken":"t2","Expiration":"2030-01-02T03:04:05Z"}}'"#,
        )
        .unwrap();
        assert_eq!(raw.id, "STS.b");
        let raw = run_command(
            r#"echo '{"access_key_id":"LTAI","access_key_secret":"s3","expiration":1900000000}'"#,
        )
        .unwrap();
        assert!(raw.token.is_none());
        assert_eq!(
            raw.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
    }

    #[test]
    fn credentials_from_a_command_never_show_in_debug() {
        let secret = "cmd-secret-Vx7Qm2Rt9Lp4";
        let token = "CAIS-token-Hd8Nw3Ky6Bz1";
        let command = format!(
            r#"echo '{{"id":"STS.dbg","secret":"{secret}","token":"{token}","expiration":"2030-01-02T03:04:05Z"}}'"#
        );
        let mut profile = crate::config::parse(
            "[profiles.p]\nhost = \"h\"\nconsumer_group_id = \"G\"\ncredential_command = \"true\"\n",
            "p",
            None,
        )
        .unwrap();
        profile.credential_command = Some(command);
        let creds = resolve_with_expiry(&profile).unwrap();
        let Login::Alibaba(params) = &creds.login else {
            panic!("an Alibaba profile has a signed login");
        };
        assert_eq!(params.access_key_secret.expose(), secret);
        let shown = format!("{creds:?} {:?}", creds.login);
        assert!(
            !shown.contains("cmd-secret") && !shown.contains("CAIS-token"),
            "{shown}"
        );
        assert!(shown.contains("STS.dbg"), "{shown}");
    }

    #[test]
    fn command_failures_are_clear_and_never_show_output() {
        let e = run_command("echo '{\"secret\":\"hush\"}'").err().unwrap();
        assert!(e.why.contains("no `id`") && !e.why.contains("hush"), "{e}");
        let e = run_command("exit 4").err().unwrap();
        assert!(e.why.contains("exit status: 4"), "{e}");
        let e = run_command("echo not-json-hush").err().unwrap();
        assert!(
            e.why.contains("did not print JSON") && !e.why.contains("hush"),
            "{e}"
        );
    }
}
