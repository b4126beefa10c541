//! Profiles: finding the config file, parsing `[profiles.NAME]`, defaults, validation.
//!
//! Nothing downstream sees TOML: [`load`] returns a checked [`Profile`] or a [`ConfigError`]
//! that names the file, the profile, the field and what is allowed (exit status 78).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::cloud::alibaba::{AuthMode, SignMethod};

/// Default AMQPS port of Aliyun's server-side subscription.
pub const DEFAULT_PORT: u16 = 5671;
/// Default idle-time-out sent in the Open frame.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The cloud accepts idle-time-outs from 30 s to 300 s.
pub const IDLE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(300));
/// Default link credit: the samples use 20 to 1000; 200 keeps ack latency low under backlog.
pub const DEFAULT_CREDIT: u32 = 200;
/// Most connections per profile: a consumer group takes at most 64 clients at once.
pub const MAX_CONNECTIONS: u32 = 64;
/// Largest credit accepted (beyond it, deliveries age past the cloud's 30 s ack timeout).
pub const MAX_CREDIT: u32 = 5000;
/// Default receiver source address (the cloud ignores it; the Java sample uses "default").
pub const DEFAULT_SOURCE: &str = "default";
/// Default client id template.
pub const DEFAULT_CLIENT_ID: &str = "iot-sub-{hostname}";
/// First reconnect delay.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest reconnect delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Environment variables the secrets come from unless the profile says otherwise.
pub const ENV_ACCESS_KEY_ID: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
/// See [`ENV_ACCESS_KEY_ID`].
pub const ENV_ACCESS_KEY_SECRET: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
/// See [`ENV_ACCESS_KEY_ID`].
pub const ENV_SECURITY_TOKEN: &str = "ALIBABA_CLOUD_SECURITY_TOKEN";
/// Where a `kind = "amqp"` profile's password comes from unless it says otherwise.
pub const ENV_AMQP_PASSWORD: &str = "IOT_SUB_AMQP_PASSWORD";
/// The idle-time-outs a `kind = "amqp"` profile may send (a plain broker takes any value).
pub const AMQP_IDLE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// The profile name that works with no config file: an embedded emulator.
pub const DEMO_PROFILE: &str = "demo";

/// A config problem, reported as one line and exit status 78 (EX_CONFIG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, when one was read.
    pub file: Option<PathBuf>,
    /// The profile, when one was selected.
    pub profile: Option<String>,
    /// The field at fault, when there is one.
    pub field: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            profile: None,
            field: None,
            message: message.into(),
        }
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        ConfigError {
            field: Some(field.to_string()),
            ..ConfigError::new(message)
        }
    }

    fn at(mut self, file: Option<&Path>, profile: &str) -> Self {
        self.file = self.file.or_else(|| file.map(Path::to_path_buf));
        self.profile.get_or_insert_with(|| profile.to_string());
        self
    }
}

impl fmt::Display for ConfigError {
    /// One line: control characters from the file (a profile name or value with a line break)
    /// are written escaped, as `\n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config error")?;
        if let Some(file) = &self.file {
            write!(f, " in {}", OneLine(&file.display().to_string()))?;
        }
        if let Some(profile) = &self.profile {
            write!(f, ", profile `{}`", OneLine(profile))?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field `{}`", OneLine(field))?;
        }
        write!(f, ": {}", OneLine(&self.message))
    }
}

/// Text with its control characters escaped.
struct OneLine<'a>(&'a str);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where a secret (or the AccessKey id) comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Written in the config file (draws a warning if the file is readable by others).
    Inline(String),
    /// An environment variable.
    Env(String),
    /// A file; surrounding whitespace is trimmed. Relative paths are relative to the config file.
    File(PathBuf),
    /// A systemd credential: the file of that name in `$CREDENTIALS_DIRECTORY` (LoadCredential=).
    Credential(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(***)"),
            SecretSource::Env(v) => write!(f, "Env({v})"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Credential(n) => write!(f, "Credential({n})"),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("the config file"),
            SecretSource::Env(v) => write!(f, "environment variable {v}"),
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Credential(n) => write!(f, "systemd credential {n}"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a string, { env = "VAR" }, { file = "/path" } or { credential = "NAME" }"#,
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let key: String = map.next_key()?.ok_or_else(|| {
                    de::Error::custom(
                        r#"expected { env = "VAR" }, { file = "/path" } or { credential = "NAME" }"#,
                    )
                })?;
                let value: String = map.next_value()?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(
                        "give exactly one of `env`, `file` or `credential`",
                    ));
                }
                match key.as_str() {
                    "env" => Ok(SecretSource::Env(value)),
                    "file" => Ok(SecretSource::File(PathBuf::from(value))),
                    "credential" => Ok(SecretSource::Credential(value)),
                    other => Err(de::Error::custom(format!(
                        "unknown key `{other}`; expected `env`, `file` or `credential`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A profile as written in TOML (every field optional; [`validate`] applies defaults).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    kind: Option<String>,
    cloud: Option<String>,
    username: Option<String>,
    password: Option<SecretSource>,
    emulator: Option<bool>,
    emulator_rate: Option<f64>,
    host: Option<String>,
    iot_instance_id: Option<String>,
    uid: Option<String>,
    region: Option<String>,
    port: Option<i64>,
    client_id: Option<String>,
    consumer_group_id: Option<String>,
    auth_mode: Option<String>,
    sign_method: Option<String>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    credit: Option<i64>,
    connections: Option<i64>,
    source: Option<String>,
    ca_file: Option<PathBuf>,
    access_key_id: Option<SecretSource>,
    access_key_secret: Option<SecretSource>,
    security_token: Option<SecretSource>,
    credential_command: Option<String>,
    aliyun_profile: Option<String>,
    #[serde(default, with = "humantime_serde")]
    backoff_initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    backoff_max: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profiles: toml::Table,
}

/// What a profile talks to (`kind`; `cloud` is its older name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Alibaba Cloud IoT Platform server-side subscription (signed login, Aliyun's properties).
    Alibaba,
    /// Any AMQP 1.0 broker: SASL PLAIN with a username and password, generic message mapping.
    Amqp,
}

/// The login of a `kind = "amqp"` profile.
#[derive(Debug, Clone)]
pub struct PlainLogin {
    /// SASL PLAIN username (not a secret).
    pub username: String,
    /// Where the password comes from.
    pub password: SecretSource,
}

/// Fields only Alibaba profiles use; a `kind = "amqp"` profile naming one is a config error.
const ALIBABA_ONLY: [&str; 13] = [
    "consumer_group_id",
    "access_key_id",
    "access_key_secret",
    "security_token",
    "sign_method",
    "auth_mode",
    "iot_instance_id",
    "uid",
    "region",
    "credential_command",
    "aliyun_profile",
    "emulator",
    "emulator_rate",
];

/// A checked profile: everything a subscriber needs except the secrets' values. Its `Debug`
/// hides inline secrets and the credential command (which may hold one).
#[derive(Clone)]
pub struct Profile {
    /// The profile's name (for logs).
    pub name: String,
    /// The config file it came from (`None` for the built-in demo).
    pub file: Option<PathBuf>,
    /// What it talks to: Alibaba Cloud, or any AMQP 1.0 broker.
    pub kind: Kind,
    /// The username and password of a `kind = "amqp"` profile (`None` for Alibaba).
    pub plain_login: Option<PlainLogin>,
    /// Start an embedded emulator and subscribe to it (the demo).
    pub emulator: bool,
    /// Messages per second the embedded emulator's simulated devices send.
    pub emulator_rate: f64,
    /// Endpoint host name: TLS SNI and certificate name.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Client id after template expansion (1-64 characters).
    pub client_id: String,
    /// Consumer group (empty for `kind = "amqp"`).
    pub consumer_group_id: String,
    /// Instance id, if the instance has one.
    pub iot_instance_id: Option<String>,
    /// aksign or ststoken.
    pub auth_mode: AuthMode,
    /// Whether the profile set `auth_mode` (else a source that yields a token means ststoken).
    pub auth_mode_explicit: bool,
    /// HMAC for the password.
    pub sign_method: SignMethod,
    /// idle-time-out sent in the Open frame.
    pub idle_timeout: Duration,
    /// Link credit.
    pub credit: u32,
    /// Parallel connections (each with client id `<client_id>-<i>` when more than one).
    pub connections: u32,
    /// Receiver source address.
    pub source: String,
    /// Extra trust root (PEM), added to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Where the AccessKey id comes from.
    pub access_key_id: SecretSource,
    /// Where the AccessKey secret comes from.
    pub access_key_secret: SecretSource,
    /// Where the STS token comes from (ststoken only).
    pub security_token: Option<SecretSource>,
    /// A command printing the credentials as JSON (id, secret, token, expiration); replaces
    /// the three fields above.
    pub credential_command: Option<String>,
    /// A profile of the Alibaba Cloud CLI (`~/.aliyun/config.json`, modes AK and StsToken);
    /// replaces the three fields above.
    pub aliyun_profile: Option<String>,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("kind", &self.kind)
            .field("plain_login", &self.plain_login)
            .field("emulator", &self.emulator)
            .field("emulator_rate", &self.emulator_rate)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("consumer_group_id", &self.consumer_group_id)
            .field("iot_instance_id", &self.iot_instance_id)
            .field("auth_mode", &self.auth_mode)
            .field("auth_mode_explicit", &self.auth_mode_explicit)
            .field("sign_method", &self.sign_method)
            .field("idle_timeout", &self.idle_timeout)
            .field("credit", &self.credit)
            .field("connections", &self.connections)
            .field("source", &self.source)
            .field("ca_file", &self.ca_file)
            .field("access_key_id", &self.access_key_id)
            .field("access_key_secret", &self.access_key_secret)
            .field("security_token", &self.security_token)
            .field(
                "credential_command",
                &self.credential_command.as_ref().map(|_| "***"),
            )
            .field("aliyun_profile", &self.aliyun_profile)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

/// The config file to read: `--config`, else `IOT_SUB_CONFIG`, else the XDG path, else
/// `/etc/iot-sub/config.toml`. Returns the candidates looked at when none exists.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, Vec<PathBuf>> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("IOT_SUB_CONFIG").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(dir) = xdg {
        candidates.push(dir.join("iot-sub").join("config.toml"));
    }
    candidates.push(PathBuf::from("/etc/iot-sub/config.toml"));
    match candidates.iter().find(|p| p.exists()) {
        Some(p) => Ok(p.clone()),
        None => Err(candidates),
    }
}

/// Loads profile `name`. With no config file anywhere, the name `demo` gives the built-in demo.
pub fn load(explicit: Option<&Path>, name: &str) -> Result<Profile, ConfigError> {
    let path = match locate(explicit) {
        Ok(p) => p,
        Err(_) if name == DEMO_PROFILE => return Ok(demo_profile()),
        Err(looked) => {
            let list: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
            return Err(ConfigError {
                profile: Some(name.to_string()),
                ..ConfigError::new(format!(
                    "no config file found (looked at --config, IOT_SUB_CONFIG, {}); \
                     see config/example.toml",
                    list.join(", ")
                ))
            });
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
        file: Some(path.clone()),
        ..ConfigError::new(format!("cannot read the file: {e}"))
    })?;
    match parse(&text, name, Some(&path)) {
        Err(e) if name == DEMO_PROFILE && e.message.starts_with("no profile") => Ok(demo_profile()),
        other => other.inspect(|p| warn_if_inline_secrets_are_exposed(p, &path)),
    }
}

/// Parses profile `name` out of a config file's text.
pub fn parse(text: &str, name: &str, file: Option<&Path>) -> Result<Profile, ConfigError> {
    let whole: RawFile = toml::from_str(text).map_err(|e| ConfigError {
        file: file.map(Path::to_path_buf),
        ..ConfigError::new(toml_syntax_error(text, &e))
    })?;
    let Some(table) = whole.profiles.get(name) else {
        let known: Vec<&str> = whole.profiles.keys().map(String::as_str).collect();
        return Err(ConfigError::new(format!(
            "no profile `{name}` (profiles in the file: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
        .at(file, name));
    };
    let raw: RawProfile = serde_path_to_error::deserialize(table.clone()).map_err(
        |e: serde_path_to_error::Error<toml::de::Error>| {
            field_error_from_serde(e.path(), &e.inner().to_string()).at(file, name)
        },
    )?;
    validate(raw, name, file).map_err(|e| e.at(file, name))
}

/// Where the TOML is broken and why, without toml's quote of the line: that line may be
/// `access_key_secret = "...` with the secret on it.
fn toml_syntax_error(text: &str, e: &toml::de::Error) -> String {
    let place = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        format!(" at line {line}, column {column}")
    });
    format!(
        "not valid TOML{}: {} (the line is not quoted: it may hold a secret)",
        place.unwrap_or_default(),
        one_line(e.message())
    )
}

/// Fields whose values are secret (or may hold one, like a command line): their errors never
/// quote the value.
const SECRET_FIELDS: [&str; 3] = ["access_key_secret", "security_token", "credential_command"];

/// serde's message, with the field it is about: the path to the bad value, or for an unknown
/// field ("unknown field `x`, expected one of ...") the name in backticks. A bad value of a
/// secret field is described without serde's quote of it.
fn field_error_from_serde(path: &serde_path_to_error::Path, message: &str) -> ConfigError {
    let message = one_line(message);
    let path = path.to_string();
    let top = path.split(['.', '[']).next().unwrap_or_default();
    // "unknown field `x`" and "unknown key `x`" name a key, not the value: kept as they are.
    if SECRET_FIELDS.contains(&top) && !message.starts_with("unknown") {
        let allowed = if top == "credential_command" {
            "a string (a shell command)"
        } else {
            "a string, { env = \"VAR\" }, { file = \"/path\" } or { credential = \"NAME\" }"
        };
        return ConfigError {
            field: Some(top.to_string()),
            ..ConfigError::new(format!(
                "not a valid value (not quoted: it may be secret); allowed: {allowed}"
            ))
        };
    }
    let field = if message.starts_with("unknown field") {
        message.split('`').nth(1).map(str::to_string)
    } else if path != "." && !path.is_empty() {
        Some(path)
    } else {
        None
    };
    ConfigError {
        field,
        ..ConfigError::new(message)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn validate(raw: RawProfile, name: &str, file: Option<&Path>) -> Result<Profile, ConfigError> {
    let kind = kind_of(&raw)?;
    let amqp = kind == Kind::Amqp;
    match kind {
        Kind::Amqp => {
            if let Some(field) = alibaba_fields_set(&raw).first() {
                return Err(ConfigError::field(
                    field,
                    "is an Alibaba Cloud field; a `kind = \"amqp\"` profile does not use it \
                     (remove it; the login is `username` and `password`)",
                ));
            }
        }
        Kind::Alibaba => {
            for (field, set) in [
                ("username", raw.username.is_some()),
                ("password", raw.password.is_some()),
            ] {
                if set {
                    return Err(ConfigError::field(
                        field,
                        "is only used with `kind = \"amqp\"`; an Alibaba Cloud profile logs in \
                         with `access_key_id` and `access_key_secret`",
                    ));
                }
            }
        }
    }
    let emulator = raw.emulator.unwrap_or(false);
    let emulator_rate = raw.emulator_rate.unwrap_or(5.0);
    if !(emulator_rate > 0.0 && emulator_rate <= 100_000.0) {
        return Err(ConfigError::field(
            "emulator_rate",
            format!("{emulator_rate} is out of range; allowed: more than 0, up to 100000 messages per second"),
        ));
    }

    let non_empty = |field: &str, v: Option<String>| -> Result<Option<String>, ConfigError> {
        match v {
            Some(s) if s.trim().is_empty() => Err(ConfigError::field(field, "must not be empty")),
            other => Ok(other),
        }
    };
    let iot_instance_id = non_empty("iot_instance_id", raw.iot_instance_id)?;
    let host = match (
        non_empty("host", raw.host)?,
        &iot_instance_id,
        raw.uid,
        raw.region,
    ) {
        (Some(h), _, _, _) => h,
        _ if emulator => "localhost".to_string(),
        (None, Some(id), _, _) => format!("{id}.amqp.iothub.aliyuncs.com"),
        (None, None, Some(uid), Some(region)) => format!("{uid}.iot-amqp.{region}.aliyuncs.com"),
        (None, None, Some(_), None) => {
            return Err(ConfigError::field(
                "region",
                "is required with `uid` (for example cn-shanghai)",
            ))
        }
        (None, ..) if amqp => {
            return Err(ConfigError::field(
                "host",
                "is required: the broker's host name (also the name its TLS certificate must have)",
            ))
        }
        (None, None, None, _) => {
            return Err(ConfigError::field(
                "host",
                "no endpoint: set `host`, or `iot_instance_id`, or `uid` and `region`",
            ))
        }
    };
    if host.contains([':', '/', ' ']) {
        return Err(ConfigError::field(
            "host",
            format!("`{host}` is not a host name (no scheme, port or path; the port is `port`)"),
        ));
    }

    let port = match raw.port {
        None => DEFAULT_PORT,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            return Err(ConfigError::field(
                "port",
                format!("{p} is out of range; allowed: 1 to 65535"),
            ))
        }
    };

    let template = raw
        .client_id
        .unwrap_or_else(|| DEFAULT_CLIENT_ID.to_string());
    let client_id = expand_client_id(&template)?;
    let len = client_id.chars().count();
    if !(1..=64).contains(&len) || client_id.contains(['|', ',']) {
        return Err(ConfigError::field(
            "client_id",
            format!(
                "`{client_id}` has {len} characters; allowed: 1 to 64 characters without `|` or `,`"
            ),
        ));
    }

    let consumer_group_id = match non_empty("consumer_group_id", raw.consumer_group_id)? {
        Some(g) => g,
        None if amqp => String::new(),
        None if emulator => "DEFAULT_GROUP".to_string(),
        None => {
            return Err(ConfigError::field(
                "consumer_group_id",
                "is required (for example DEFAULT_GROUP)",
            ))
        }
    };
    if consumer_group_id.contains(['|', ',', '=']) {
        return Err(ConfigError::field(
            "consumer_group_id",
            "must not contain `|`, `,` or `=`",
        ));
    }

    let auth_mode_explicit = raw.auth_mode.is_some();
    let auth_mode = match raw.auth_mode {
        None => AuthMode::Aksign,
        Some(s) => s
            .parse()
            .map_err(|e: String| ConfigError::field("auth_mode", e))?,
    };
    let sign_method = match raw.sign_method {
        None => SignMethod::Hmacsha1,
        Some(s) => s
            .parse()
            .map_err(|e: String| ConfigError::field("sign_method", e))?,
    };

    let idle_timeout = raw.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT);
    let (lo, hi) = if amqp {
        AMQP_IDLE_TIMEOUT_RANGE
    } else {
        IDLE_TIMEOUT_RANGE
    };
    if idle_timeout < lo || idle_timeout > hi || idle_timeout.subsec_nanos() % 1_000_000 != 0 {
        let why = if amqp {
            "1s to 1h in whole milliseconds"
        } else {
            "30s to 300s in whole milliseconds (the cloud refuses other values)"
        };
        return Err(ConfigError::field(
            "idle_timeout",
            format!(
                "{} is out of range; allowed: {why}",
                humantime::format_duration(idle_timeout)
            ),
        ));
    }

    let credit = match raw.credit {
        None => DEFAULT_CREDIT,
        Some(c) if (2..=i64::from(MAX_CREDIT)).contains(&c) => c as u32,
        Some(c) => {
            return Err(ConfigError::field(
                "credit",
                format!("{c} is out of range; allowed: 2 to {MAX_CREDIT}"),
            ))
        }
    };
    let connections = match raw.connections {
        None => 1,
        Some(n) if (1..=i64::from(MAX_CONNECTIONS)).contains(&n) => n as u32,
        Some(n) => {
            return Err(ConfigError::field(
                "connections",
                format!("{n} is out of range; allowed: 1 to {MAX_CONNECTIONS} (the consumer group's client limit)"),
            ))
        }
    };
    if connections > 1 {
        let suffixed = format!("{client_id}-{connections}");
        if suffixed.chars().count() > 64 {
            return Err(ConfigError::field(
                "client_id",
                format!("`{suffixed}` (with the connection number) is longer than 64 characters"),
            ));
        }
    }
    let source = match non_empty("source", raw.source)? {
        Some(s) => s,
        None if amqp => {
            return Err(ConfigError::field(
                "source",
                "is required: the address to receive from (for RabbitMQ `/amq/queue/NAME`)",
            ))
        }
        None => DEFAULT_SOURCE.to_string(),
    };

    let base_dir = file.and_then(Path::parent).map(Path::to_path_buf);
    let relative = |p: PathBuf| match (&base_dir, p.is_relative()) {
        (Some(dir), true) => dir.join(p),
        _ => p,
    };
    let ca_file = raw.ca_file.map(relative);
    let fix = |s: SecretSource| match s {
        SecretSource::File(p) => SecretSource::File(relative(p)),
        other => other,
    };
    let credential_command = non_empty("credential_command", raw.credential_command)?;
    let aliyun_profile = non_empty("aliyun_profile", raw.aliyun_profile)?;
    if credential_command.is_some() || aliyun_profile.is_some() {
        let (this, other) = if credential_command.is_some() {
            (
                "credential_command",
                aliyun_profile.as_ref().map(|_| "aliyun_profile"),
            )
        } else {
            ("aliyun_profile", None)
        };
        let clash = other.or(if raw.access_key_id.is_some() {
            Some("access_key_id")
        } else if raw.access_key_secret.is_some() {
            Some("access_key_secret")
        } else if raw.security_token.is_some() {
            Some("security_token")
        } else {
            None
        });
        if let Some(clash) = clash {
            return Err(ConfigError::field(
                this,
                format!("gives all the credentials; remove `{clash}` (or this field)"),
            ));
        }
    }
    let access_key_id = fix(raw
        .access_key_id
        .unwrap_or(SecretSource::Env(ENV_ACCESS_KEY_ID.into())));
    let access_key_secret = fix(raw
        .access_key_secret
        .unwrap_or(SecretSource::Env(ENV_ACCESS_KEY_SECRET.into())));
    let external = credential_command.is_some() || aliyun_profile.is_some();
    let security_token = match (auth_mode, raw.security_token) {
        (_, None) if external => None,
        (AuthMode::Ststoken, s) => Some(fix(
            s.unwrap_or(SecretSource::Env(ENV_SECURITY_TOKEN.into()))
        )),
        (AuthMode::Aksign, Some(_)) => {
            return Err(ConfigError::field(
                "security_token",
                "is only used with auth_mode = \"ststoken\"",
            ))
        }
        (AuthMode::Aksign, None) => None,
    };

    let plain_login = if amqp {
        let username = non_empty("username", raw.username)?.ok_or_else(|| {
            ConfigError::field("username", "is required: the SASL PLAIN username")
        })?;
        let password = fix(raw
            .password
            .unwrap_or(SecretSource::Env(ENV_AMQP_PASSWORD.into())));
        Some(PlainLogin { username, password })
    } else {
        None
    };

    let backoff_initial = raw.backoff_initial.unwrap_or(DEFAULT_BACKOFF_INITIAL);
    let backoff_max = raw.backoff_max.unwrap_or(DEFAULT_BACKOFF_MAX);
    if backoff_initial < Duration::from_millis(10) || backoff_initial > Duration::from_secs(3600) {
        return Err(ConfigError::field(
            "backoff_initial",
            "is out of range; allowed: 10ms to 1h",
        ));
    }
    if backoff_max < backoff_initial || backoff_max > Duration::from_secs(3600) {
        return Err(ConfigError::field(
            "backoff_max",
            "is out of range; allowed: from backoff_initial to 1h",
        ));
    }

    Ok(Profile {
        name: name.to_string(),
        file: file.map(Path::to_path_buf),
        kind,
        plain_login,
        emulator,
        emulator_rate,
        host,
        port,
        client_id,
        consumer_group_id,
        iot_instance_id,
        auth_mode,
        auth_mode_explicit,
        sign_method,
        idle_timeout,
        credit,
        connections,
        source,
        ca_file,
        access_key_id,
        access_key_secret,
        security_token,
        credential_command,
        aliyun_profile,
        backoff_initial,
        backoff_max,
    })
}

/// `kind`, or its older name `cloud`; both at once is an error.
fn kind_of(raw: &RawProfile) -> Result<Kind, ConfigError> {
    let (field, value) = match (&raw.kind, &raw.cloud) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::field(
                "cloud",
                "`cloud` is the old name of `kind`; give only `kind`",
            ))
        }
        (Some(k), None) => ("kind", k.as_str()),
        (None, Some(c)) => ("cloud", c.as_str()),
        (None, None) => return Ok(Kind::Alibaba),
    };
    match value {
        "alibaba" | "aliyun" => Ok(Kind::Alibaba),
        "amqp" => Ok(Kind::Amqp),
        other => Err(ConfigError::field(
            field,
            format!("unknown kind `{other}`; allowed: alibaba, amqp"),
        )),
    }
}

/// The Alibaba-only fields a profile sets, in [`ALIBABA_ONLY`] order.
fn alibaba_fields_set(raw: &RawProfile) -> Vec<&'static str> {
    let set = [
        raw.consumer_group_id.is_some(),
        raw.access_key_id.is_some(),
        raw.access_key_secret.is_some(),
        raw.security_token.is_some(),
        raw.sign_method.is_some(),
        raw.auth_mode.is_some(),
        raw.iot_instance_id.is_some(),
        raw.uid.is_some(),
        raw.region.is_some(),
        raw.credential_command.is_some(),
        raw.aliyun_profile.is_some(),
        raw.emulator.is_some(),
        raw.emulator_rate.is_some(),
    ];
    ALIBABA_ONLY
        .iter()
        .zip(set)
        .filter_map(|(name, set)| set.then_some(*name))
        .collect()
}

/// Expands `{hostname}` and `{pid}` in a client id template.
fn expand_client_id(template: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or_else(|| {
            ConfigError::field(
                "client_id",
                "unclosed `{`; templates are {hostname} and {pid}",
            )
        })?;
        match &rest[start + 1..start + end] {
            "hostname" => out.push_str(&gethostname::gethostname().to_string_lossy()),
            "pid" => out.push_str(&std::process::id().to_string()),
            other => {
                return Err(ConfigError::field(
                    "client_id",
                    format!("unknown template `{{{other}}}`; allowed: {{hostname}}, {{pid}}"),
                ))
            }
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The built-in `demo` profile: an embedded emulator with simulated devices on loopback.
pub fn demo_profile() -> Profile {
    let text = include_str!("../config/demo.toml");
    parse(text, DEMO_PROFILE, None).expect("the built-in demo profile is valid")
}

/// Warns when a secret is written in a config file that others can read.
fn warn_if_inline_secrets_are_exposed(profile: &Profile, path: &Path) {
    let inline = match &profile.plain_login {
        Some(login) => matches!(login.password, SecretSource::Inline(_)),
        None => {
            matches!(profile.access_key_secret, SecretSource::Inline(_))
                || matches!(profile.security_token, Some(SecretSource::Inline(_)))
        }
    };
    if !inline || profile.emulator {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the config file holds a secret and is readable by group or others; \
                     run `chmod 600` on it, or move the secret to an environment variable or file"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Profile {
        parse(&format!("[profiles.p]\n{body}"), "p", None).unwrap()
    }

    fn err(body: &str) -> ConfigError {
        parse(
            &format!("[profiles.p]\n{body}"),
            "p",
            Some(Path::new("/x/c.toml")),
        )
        .unwrap_err()
    }

    const MIN: &str = "host = \"h.example\"\nconsumer_group_id = \"G\"\n";

    #[test]
    fn errors_stay_on_one_line_whatever_the_file_holds() {
        let e = parse("[profiles.\"a\\nb\"]\n", "p", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config error, profile `p`: no profile `p` (profiles in the file: a\\nb)"
        );
        let e = err("host = \"h:\\r\\n5671\"\nconsumer_group_id = \"G\"");
        assert!(
            e.to_string().ends_with(
                "`h:\\r\\n5671` is not a host name (no scheme, port or path; the port is `port`)"
            ),
            "{e}"
        );
    }

    #[test]
    fn defaults() {
        let p = ok(MIN);
        assert_eq!(p.port, 5671);
        assert_eq!(p.idle_timeout, Duration::from_secs(60));
        assert_eq!(p.credit, 200);
        assert_eq!(p.connections, 1);
        assert_eq!(p.auth_mode, AuthMode::Aksign);
        assert_eq!(p.sign_method, SignMethod::Hmacsha1);
        assert!(p.client_id.starts_with("iot-sub-"));
        assert_eq!(
            p.access_key_secret,
            SecretSource::Env(ENV_ACCESS_KEY_SECRET.into())
        );
        assert!(p.security_token.is_none());
    }

    #[test]
    fn host_from_instance_id_or_uid_and_region() {
        let p = ok("iot_instance_id = \"iot-06z00ab\"\nconsumer_group_id = \"G\"");
        assert_eq!(p.host, "iot-06z00ab.amqp.iothub.aliyuncs.com");
        assert_eq!(p.iot_instance_id.as_deref(), Some("iot-06z00ab"));
        let p = ok("uid = \"123\"\nregion = \"cn-shanghai\"\nconsumer_group_id = \"G\"");
        assert_eq!(p.host, "123.iot-amqp.cn-shanghai.aliyuncs.com");
        assert_eq!(
            err("uid = \"123\"\nconsumer_group_id = \"G\"")
                .field
                .as_deref(),
            Some("region")
        );
        assert_eq!(
            err("consumer_group_id = \"G\"").field.as_deref(),
            Some("host")
        );
    }

    #[test]
    fn errors_name_file_profile_field_and_range() {
        let e = err(&format!("{MIN}idle_timeout = \"10s\""));
        assert_eq!(e.field.as_deref(), Some("idle_timeout"));
        let text = e.to_string();
        assert!(
            text.contains("/x/c.toml") && text.contains("profile `p`"),
            "{text}"
        );
        assert!(text.contains("30s to 300s"), "{text}");

        let e = err(&format!("{MIN}idle_timout = \"60s\""));
        assert_eq!(e.field.as_deref(), Some("idle_timout"), "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");

        assert!(err(&format!("{MIN}port = 70000"))
            .to_string()
            .contains("1 to 65535"));
        assert!(err(&format!("{MIN}credit = 0"))
            .to_string()
            .contains("2 to 5000"));
        assert_eq!(
            err(&format!("{MIN}sign_method = \"sha1\""))
                .field
                .as_deref(),
            Some("sign_method")
        );
        assert_eq!(
            err(&format!("{MIN}auth_mode = \"x\"")).field.as_deref(),
            Some("auth_mode")
        );
        let long = "x".repeat(65);
        assert_eq!(
            err(&format!("{MIN}client_id = \"{long}\""))
                .field
                .as_deref(),
            Some("client_id")
        );
        assert_eq!(
            err(&format!("{MIN}client_id = \"{{nope}}\""))
                .field
                .as_deref(),
            Some("client_id")
        );
        assert_eq!(
            err(&format!("{MIN}idle_timeout = \"soon\""))
                .field
                .as_deref(),
            Some("idle_timeout")
        );
        assert_eq!(
            err(&format!("{MIN}security_token = \"t\""))
                .field
                .as_deref(),
            Some("security_token")
        );
        assert_eq!(
            err(&format!("{MIN}access_key_secret = {{ vault = \"x\" }}"))
                .field
                .as_deref(),
            Some("access_key_secret")
        );
        let e = err(&format!(
            "{MIN}credential_command = \"x\"\naccess_key_id = \"y\""
        ));
        assert_eq!(e.field.as_deref(), Some("credential_command"), "{e}");
        assert!(e.message.contains("remove `access_key_id`"), "{e}");
        let e = err(&format!(
            "{MIN}credential_command = \"x\"\naliyun_profile = \"d\""
        ));
        assert!(e.message.contains("remove `aliyun_profile`"), "{e}");
        let p = ok(&format!("{MIN}aliyun_profile = \"default\""));
        assert_eq!(p.aliyun_profile.as_deref(), Some("default"));
        assert!(!p.auth_mode_explicit);
        let p = ok(&format!(
            "{MIN}access_key_secret = {{ credential = \"ak\" }}"
        ));
        assert_eq!(p.access_key_secret, SecretSource::Credential("ak".into()));
    }

    #[test]
    fn missing_profile_lists_the_known_ones() {
        let e = parse("[profiles.a]\n[profiles.b]\n", "c", None).unwrap_err();
        assert!(e.message.contains("a, b"), "{e}");
        let e = parse("profiles = 3", "c", None).unwrap_err();
        assert!(e.message.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn secret_sources_and_templates() {
        let p = ok(&format!(
            "{MIN}auth_mode = \"ststoken\"\naccess_key_id = \"LTAI\"\naccess_key_secret = {{ env = \"MY_S\" }}\n\
             security_token = {{ file = \"tok\" }}\nclient_id = \"a-{{pid}}\""
        ));
        assert_eq!(p.access_key_id, SecretSource::Inline("LTAI".into()));
        assert_eq!(p.access_key_secret, SecretSource::Env("MY_S".into()));
        assert_eq!(p.security_token, Some(SecretSource::File("tok".into())));
        assert_eq!(p.client_id, format!("a-{}", std::process::id()));
        assert!(!format!("{:?}", SecretSource::Inline("s3cr3t".into())).contains("s3cr3t"));
    }

    const AMQP: &str =
        "kind = \"amqp\"\nhost = \"mq.example\"\nusername = \"u\"\nsource = \"/amq/queue/q\"\n";

    #[test]
    fn amqp_profile_defaults_and_requirements() {
        let p = ok(AMQP);
        assert_eq!(p.kind, Kind::Amqp);
        assert_eq!(p.port, 5671);
        assert_eq!(p.source, "/amq/queue/q");
        let login = p.plain_login.expect("an amqp profile has a plain login");
        assert_eq!(login.username, "u");
        assert_eq!(login.password, SecretSource::Env(ENV_AMQP_PASSWORD.into()));
        let p = ok(&format!(
            "{AMQP}password = {{ file = \"pw\" }}\nidle_timeout = \"5s\""
        ));
        assert_eq!(
            p.plain_login.unwrap().password,
            SecretSource::File("pw".into())
        );
        assert_eq!(p.idle_timeout, Duration::from_secs(5));
        for missing in ["host", "username", "source"] {
            let body: String = AMQP
                .lines()
                .filter(|l| !l.starts_with(missing))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = err(&body);
            assert_eq!(e.field.as_deref(), Some(missing), "{e}");
            assert!(e.message.contains("required"), "{e}");
        }
        assert!(ok(MIN).plain_login.is_none());
        assert_eq!(ok(MIN).kind, Kind::Alibaba);
    }

    #[test]
    fn kind_and_its_old_name_cloud() {
        assert_eq!(ok(&format!("{MIN}kind = \"alibaba\"")).kind, Kind::Alibaba);
        assert_eq!(ok(&format!("{MIN}cloud = \"alibaba\"")).kind, Kind::Alibaba);
        let p = ok(&AMQP.replace("kind =", "cloud ="));
        assert_eq!(p.kind, Kind::Amqp);
        let e = err(&format!("{AMQP}cloud = \"amqp\""));
        assert_eq!(e.field.as_deref(), Some("cloud"), "{e}");
        assert!(e.message.contains("only `kind`"), "{e}");
        let e = err(&format!("{MIN}kind = \"azure\""));
        assert_eq!(e.field.as_deref(), Some("kind"));
        assert!(e.message.contains("allowed: alibaba, amqp"), "{e}");
    }

    #[test]
    fn fields_of_the_other_kind_are_errors() {
        for (field, value) in [
            ("consumer_group_id", "\"G\""),
            ("access_key_id", "\"LTAI\""),
            ("access_key_secret", "{ env = \"X\" }"),
            ("security_token", "\"t\""),
            ("sign_method", "\"hmacsha1\""),
            ("auth_mode", "\"aksign\""),
            ("iot_instance_id", "\"iot-1\""),
            ("uid", "\"1\""),
            ("region", "\"cn-shanghai\""),
            ("credential_command", "\"x\""),
            ("aliyun_profile", "\"default\""),
            ("emulator", "true"),
        ] {
            let e = err(&format!("{AMQP}{field} = {value}"));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.to_string().contains("Alibaba Cloud field"), "{e}");
        }
        for field in ["username", "password"] {
            let e = err(&format!("{MIN}{field} = \"x\""));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains("kind = \"amqp\""), "{e}");
        }
    }

    #[test]
    fn errors_and_debug_never_show_a_secret() {
        let secret = "s3cr3t-Zq8vKp2Lw9";
        // A syntax error on the secret's line: where, not the line itself.
        let e = parse(
            &format!("[profiles.p]\n{MIN}access_key_secret = \"{secret}\nport = 1\n"),
            "p",
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("not valid TOML at line"), "{e}");
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
        // A value of the wrong type in a secret field: not quoted.
        for field in ["access_key_secret", "security_token", "credential_command"] {
            for value in ["918273645501", "918273645501.5", "[\"s3cr3t-Zq8v\"]"] {
                let e = err(&format!("{MIN}{field} = {value}\n"));
                assert_eq!(e.field.as_deref(), Some(field), "{e}");
                assert!(
                    !e.to_string().contains("9182736") && !e.to_string().contains("s3cr3t"),
                    "{e}"
                );
            }
        }
        // The non-secret fields keep serde's words.
        let e = err(&format!("{MIN}port = \"x\"\n"));
        assert!(e.message.contains("invalid type"), "{e}");
        // Debug: inline secret and token, and a command line holding a secret.
        let p = ok(&format!(
            "{MIN}auth_mode = \"ststoken\"\naccess_key_id = \"LTAI\"\n\
             access_key_secret = \"{secret}\"\nsecurity_token = \"tok-{secret}\"\n"
        ));
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("s3cr3t") && shown.contains("access_key_secret: Inline(***)"),
            "{shown}"
        );
        let p = ok(&format!(
            "{MIN}credential_command = \"printf '{{\\\"secret\\\":\\\"{secret}\\\"}}'\"\n"
        ));
        assert!(p.credential_command.as_deref().unwrap().contains(secret));
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("s3cr3t") && shown.contains("credential_command: Some(\"***\")"),
            "{shown}"
        );
    }

    #[test]
    fn demo_profile_is_valid() {
        let p = demo_profile();
        assert!(p.emulator);
        assert_eq!(p.host, "localhost");
    }
}
