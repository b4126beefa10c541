//! `iot-sub check`: validates a profile, shows its credentials masked, then connects and
//! attaches the way `listen` does, one step at a time (DNS, TCP, TLS, SASL, open, attach),
//! timing each, and closes again. The exit status names the step that failed.
//!
//! Nothing secret is printed: the AccessKey secret, the STS token and the password appear only
//! as [`Secret::masked`] shows them, and the username with its token masked. A `kind = "amqp"`
//! profile goes through the same steps; it has no signing, so the credentials step reads the
//! password and shows the username.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cli::CheckArgs;
use crate::config::{self, ConfigError, Kind, Profile};
use crate::credentials::{self, Login};
use crate::exit;
use crate::secret::Secret;
use crate::transport::{self, tls, Endpoint, LinkError, ATTACH_DEADLINE};

/// The steps, in order, as they are named in the output.
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

/// Said under the SASL step when the login was refused by a close right after Open.
const NOTE_CLOSE_AFTER_OPEN: &str = "SASL PLAIN went through, then the server closed the \
    connection right after Open with amqp:unauthorized-access: a refused login can look like \
    that, so it is reported here";

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It worked.
    Ok,
    /// It failed; the run stopped here.
    Failed,
    /// It failed, but the profile works (only the final close).
    Warning,
    /// Not run, because an earlier step failed.
    Skipped,
}

/// One step of the check.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// config, credentials, emulator, dns, tcp, tls, sasl, open, attach, close.
    pub step: &'static str,
    /// How it went.
    pub status: Status,
    /// How long it took, in milliseconds to a tenth (`None` when not run).
    pub ms: Option<f64>,
    /// What it found, when it worked.
    pub detail: Option<String>,
    /// The error, when it failed.
    pub error: Option<String>,
    /// What to look at, when it failed.
    pub hint: Option<String>,
    /// More about the failure.
    pub note: Option<String>,
}

/// Where the check connects to and what it sends.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointInfo {
    /// Host name (DNS, TLS name).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The client id (AMQP container id).
    pub client_id: String,
    /// Consumer group (`None` for `kind = "amqp"`).
    pub consumer_group_id: Option<String>,
    /// Instance id, if any.
    pub iot_instance_id: Option<String>,
    /// Receiver source address.
    pub source: String,
    /// Receiver link credit.
    pub credit: u32,
    /// The idle-time-out sent in the Open frame.
    pub idle_timeout_ms: u64,
    /// The idle-time-out in the server's Open, when the Open was seen and carried one.
    pub server_idle_timeout_ms: Option<u32>,
}

/// The credentials, masked. The Alibaba fields are `None` for a `kind = "amqp"` profile.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialInfo {
    /// Where they were read from.
    pub source: String,
    /// aksign or ststoken (after resolving); `plain` for `kind = "amqp"`.
    pub auth_mode: String,
    /// hmacmd5, hmacsha1 or hmacsha256.
    pub sign_method: Option<String>,
    /// The AccessKey id, in full (it is not a secret).
    pub access_key_id: Option<String>,
    /// The AccessKey secret, masked.
    pub access_key_secret: Option<String>,
    /// The STS token, masked, if any.
    pub security_token: Option<String>,
    /// The SASL username: Aliyun's signed one with the token masked, a plain one in full.
    pub username: String,
    /// The SASL password, masked.
    pub password: String,
}

/// The whole check: what `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The profile's name.
    pub profile: String,
    /// The config file, if one was read.
    pub config_file: Option<String>,
    /// Whether every step passed.
    pub ok: bool,
    /// The exit status.
    pub exit_status: u8,
    /// The step that failed.
    pub failed_step: Option<&'static str>,
    /// Where it connects.
    pub endpoint: Option<EndpointInfo>,
    /// The credentials, masked.
    pub credentials: Option<CredentialInfo>,
    /// Every step in order, including those not run.
    pub steps: Vec<StepReport>,
}

impl Report {
    fn new(profile: &str) -> Report {
        Report {
            profile: profile.to_string(),
            config_file: None,
            ok: false,
            exit_status: exit::FAILURE,
            failed_step: None,
            endpoint: None,
            credentials: None,
            steps: Vec::new(),
        }
    }

    fn push(&mut self, step: &'static str, status: Status, since: Instant) -> &mut StepReport {
        self.steps.push(StepReport {
            step,
            status,
            ms: Some(ms_since(since)),
            detail: None,
            error: None,
            hint: None,
            note: None,
        });
        self.steps.last_mut().expect("just pushed")
    }

    fn ok(&mut self, step: &'static str, since: Instant, detail: impl Into<String>) {
        self.push(step, Status::Ok, since).detail = Some(detail.into());
    }

    /// Records a failed step and finishes the report with `status`.
    fn fail(
        mut self,
        step: &'static str,
        since: Instant,
        error: impl ToString,
        hint: Option<String>,
        status: u8,
    ) -> Report {
        let s = self.push(step, Status::Failed, since);
        s.error = Some(error.to_string());
        s.hint = hint;
        self.failed_step = Some(step);
        self.finish(status)
    }

    /// Lists the steps not run and sets the exit status.
    fn finish(mut self, status: u8) -> Report {
        for step in STEPS {
            if !self.steps.iter().any(|s| s.step == step) {
                self.steps.push(StepReport {
                    step,
                    status: Status::Skipped,
                    ms: None,
                    detail: None,
                    error: None,
                    hint: None,
                    note: None,
                });
            }
        }
        self.steps
            .sort_by_key(|s| STEPS.iter().position(|&name| name == s.step));
        self.exit_status = status;
        self.ok = status == exit::OK;
        self
    }

    /// The readable form: the profile, then one line per step, then the result.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let file = self
            .config_file
            .as_deref()
            .map(|f| format!(" in {f}"))
            .unwrap_or_default();
        let _ = writeln!(out, "Checking profile `{}`{file}", self.profile);
        let row = |out: &mut String, name: &str, value: &str| {
            let _ = writeln!(out, "  {name:<18}{value}");
        };
        if let Some(e) = &self.endpoint {
            row(&mut out, "endpoint", &format!("{}:{}", e.host, e.port));
            row(&mut out, "client id", &e.client_id);
            if let Some(group) = &e.consumer_group_id {
                row(&mut out, "consumer group", group);
                row(
                    &mut out,
                    "instance id",
                    e.iot_instance_id.as_deref().unwrap_or("(none)"),
                );
            } else {
                row(&mut out, "source", &e.source);
            }
            let server = match (self.reached("open"), e.server_idle_timeout_ms) {
                (false, _) => String::new(),
                (true, None) => "; the server's Open advertises none".to_string(),
                (true, Some(ms)) => format!("; the server's Open advertises {ms} ms"),
            };
            row(
                &mut out,
                "idle-time-out",
                &format!("{} ms sent in Open{server}", e.idle_timeout_ms),
            );
        }
        if let Some(c) = &self.credentials {
            row(&mut out, "credentials", &c.source);
            match &c.sign_method {
                Some(method) => row(&mut out, "auth", &format!("{}, {method}", c.auth_mode)),
                None => row(&mut out, "auth", "SASL PLAIN with username and password"),
            }
            if let Some(id) = &c.access_key_id {
                row(&mut out, "AccessKey id", id);
            }
            if let Some(secret) = &c.access_key_secret {
                row(&mut out, "AccessKey secret", secret);
            }
            if let Some(t) = &c.security_token {
                row(&mut out, "security token", t);
            }
            row(&mut out, "username", &c.username);
            row(&mut out, "password", &c.password);
        }
        out.push('\n');
        for s in &self.steps {
            let status = match s.status {
                Status::Ok => "ok",
                Status::Failed => "FAILED",
                Status::Warning => "warning",
                Status::Skipped => "-",
            };
            let ms = s.ms.map(|m| format!("{m:.1} ms")).unwrap_or_default();
            let what = match (&s.error, &s.detail) {
                (Some(e), _) => e.as_str(),
                (None, Some(d)) => d.as_str(),
                (None, None) if s.status == Status::Skipped => "not run",
                (None, None) => "",
            };
            let _ = writeln!(out, "  {status:<8}{:<12}{ms:>8}  {what}", s.step);
            if let Some(note) = &s.note {
                let _ = writeln!(out, "{:30}note: {note}", "");
            }
            if let Some(hint) = &s.hint {
                let _ = writeln!(out, "{:30}hint: {hint}", "");
            }
        }
        out.push('\n');
        match self.failed_step {
            None if self.ok => {
                let _ = writeln!(out, "OK: every step passed (exit {})", self.exit_status);
            }
            None => {
                let _ = writeln!(out, "FAILED (exit {})", self.exit_status);
            }
            Some(step) => {
                let _ = writeln!(out, "FAILED at step `{step}` (exit {})", self.exit_status);
            }
        }
        out
    }

    fn reached(&self, step: &str) -> bool {
        self.steps
            .iter()
            .any(|s| s.step == step && s.status == Status::Ok)
    }
}

/// Runs `iot-sub check` and prints the report on stdout; returns the exit status. The first
/// SIGINT/SIGTERM (`stop`) ends it at once with [`exit::INTERRUPTED`].
pub async fn run(args: CheckArgs, stop: CancellationToken) -> u8 {
    let report = tokio::select! {
        report = check(args.config.as_deref(), &args.profile, stop.clone()) => report,
        _ = stop.cancelled() => {
            eprintln!("iot-sub: check interrupted");
            return exit::INTERRUPTED;
        }
    };
    let text = if args.json {
        let mut line = serde_json::to_string(&report).expect("the report serializes");
        line.push('\n');
        line
    } else {
        report.render()
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => report.exit_status,
        // The reader went away (`| head`): the status still says how the check went.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => report.exit_status,
        Err(e) => {
            eprintln!("iot-sub: error: cannot write to stdout: {e}");
            exit::FAILURE
        }
    }
}

/// Checks profile `name` step by step. `stop` ends the demo's embedded emulator, if any.
pub async fn check(config_file: Option<&Path>, name: &str, stop: CancellationToken) -> Report {
    let mut report = Report::new(name);

    let t = Instant::now();
    let profile = match config::load(config_file, name) {
        Ok(p) => p,
        Err(e) => {
            report.config_file = e.file.as_ref().map(|f| f.display().to_string());
            let hint = Some("fix the named field; the message says what is allowed".into());
            return report.fail("config", t, e, hint, exit::CONFIG);
        }
    };
    report.config_file = profile.file.as_ref().map(|f| f.display().to_string());

    // The demo profile: start the embedded emulator exactly as `listen` does.
    #[cfg(feature = "emulator")]
    let (profile, extra_ca, _demo) = if profile.emulator {
        let mut profile = profile;
        match crate::listen::demo::start(&mut profile, stop).await {
            Ok(demo) => {
                let ca = Some(demo.ca_pem().to_string());
                (profile, ca, Some(demo))
            }
            Err(e) => {
                let hint = Some(
                    "the embedded emulator of the demo profile could not start on loopback".into(),
                );
                return report.fail("config", t, format!("{e:#}"), hint, exit::FAILURE);
            }
        }
    } else {
        (profile, None, None)
    };
    #[cfg(not(feature = "emulator"))]
    let extra_ca: Option<String> = {
        let _ = stop;
        if profile.emulator {
            let hint = Some("build with the default features for the demo profile".into());
            return report.fail(
                "config",
                t,
                "this build has no emulator (feature `emulator` is off)",
                hint,
                exit::CONFIG,
            );
        }
        None
    };

    let tls_config = match tls::client_config(profile.ca_file.as_deref(), extra_ca.as_deref()) {
        Ok(c) => c,
        Err(m) => {
            let e = config_error(&profile, "ca_file", m);
            let hint = Some("`ca_file` must be a readable PEM file of certificates".into());
            return report.fail("config", t, e, hint, exit::CONFIG);
        }
    };
    let endpoint = Endpoint {
        host: profile.host.clone(),
        port: profile.port,
        // As `listen` names its first connection.
        container_id: if profile.connections == 1 {
            profile.client_id.clone()
        } else {
            format!("{}-1", profile.client_id)
        },
        idle_timeout: profile.idle_timeout,
        credit: profile.credit,
        source: profile.source.clone(),
        tls: tls_config,
    };
    report.endpoint = Some(EndpointInfo {
        host: endpoint.host.clone(),
        port: endpoint.port,
        client_id: endpoint.container_id.clone(),
        consumer_group_id: (profile.kind == Kind::Alibaba)
            .then(|| profile.consumer_group_id.clone()),
        iot_instance_id: profile.iot_instance_id.clone(),
        source: endpoint.source.clone(),
        credit: endpoint.credit,
        idle_timeout_ms: endpoint.idle_timeout.as_millis() as u64,
        server_idle_timeout_ms: None,
    });
    let demo_note = if profile.emulator {
        " (the demo's embedded emulator)"
    } else {
        ""
    };
    report.ok("config", t, format!("profile `{name}` is valid{demo_note}"));

    // Credentials: read as `listen` reads them (a credential command may take a while).
    let t = Instant::now();
    let resolved = {
        let profile = profile.clone();
        tokio::task::spawn_blocking(move || credentials::resolve(&profile)).await
    };
    let login = match resolved {
        Ok(Ok(login)) => login,
        Ok(Err(e)) => {
            let err = config_error(&profile, e.what, e.why);
            let hint = Some("set the variable, file or command the message names".into());
            return report.fail("credentials", t, err, hint, exit::CONFIG);
        }
        Err(e) => {
            return report.fail(
                "credentials",
                t,
                format!("reading credentials failed: {e}"),
                None,
                exit::FAILURE,
            )
        }
    };
    let creds = login.sasl(&endpoint.container_id, crate::time::now_ms());
    let username = login.shown_username(&creds);
    let (info, detail) = match &login {
        Login::Alibaba(params) => (
            CredentialInfo {
                source: credential_source(&profile),
                auth_mode: params.auth_mode.to_string(),
                sign_method: Some(params.sign_method.to_string()),
                access_key_id: Some(params.access_key_id.clone()),
                access_key_secret: Some(params.access_key_secret.masked()),
                security_token: params.security_token.as_ref().map(Secret::masked),
                username,
                password: creds.password.masked(),
            },
            format!(
                "read and signed ({}, {})",
                params.auth_mode, params.sign_method
            ),
        ),
        Login::Plain(_) => (
            CredentialInfo {
                source: credential_source(&profile),
                auth_mode: "plain".into(),
                sign_method: None,
                access_key_id: None,
                access_key_secret: None,
                security_token: None,
                username: username.clone(),
                password: creds.password.masked(),
            },
            format!("password read; SASL PLAIN as `{username}`"),
        ),
    };
    report.credentials = Some(info);
    report.ok("credentials", t, detail);
    drop(login);

    connect_steps(report, &endpoint, profile.kind, creds).await
}

/// DNS, TCP, TLS, SASL, open, attach and close, each timed; stops at the first failure.
async fn connect_steps(
    mut report: Report,
    endpoint: &Endpoint,
    kind: Kind,
    creds: crate::cloud::SaslCredentials,
) -> Report {
    let target = format!("{}:{}", endpoint.host, endpoint.port);

    let t = Instant::now();
    let addrs = match transport::resolve(&endpoint.host, endpoint.port).await {
        Ok(a) if a.is_empty() => {
            let e = LinkError::Dns {
                host: endpoint.host.clone(),
                reason: "no addresses".into(),
            };
            return report.fail("dns", t, &e, Some(hint_dns(&e, kind)), exit::CHECK_DNS);
        }
        Ok(a) => a,
        Err(e) => return report.fail("dns", t, &e, Some(hint_dns(&e, kind)), exit::CHECK_DNS),
    };
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    report.ok("dns", t, format!("{} → {}", endpoint.host, list.join(", ")));

    let t = Instant::now();
    let tcp = match transport::connect_addrs(&endpoint.host, &addrs).await {
        Ok(s) => s,
        Err(e) => {
            let hint = hint_tcp(&e, &target, kind);
            return report.fail("tcp", t, &e, Some(hint), exit::CHECK_TCP);
        }
    };
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| target.clone(), |a| a.to_string());
    report.ok("tcp", t, format!("connected to {peer}"));

    // TLS through attach share one deadline, as in `listen`.
    let deadline = tokio::time::Instant::now() + ATTACH_DEADLINE;

    let t = Instant::now();
    let tls = match within(deadline, transport::tls_connect(endpoint, tcp)).await {
        Ok(s) => s,
        Err(e) => return report.fail("tls", t, &e, Some(hint_tls(&e, kind)), exit::CHECK_TLS),
    };
    let (_, conn) = tls.get_ref();
    let version = conn
        .protocol_version()
        .map_or_else(|| "TLS".to_string(), |v| format!("{v:?}"));
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!(", {:?}", s.suite()))
        .unwrap_or_default();
    report.ok(
        "tls",
        t,
        format!("certificate valid for {}; {version}{suite}", endpoint.host),
    );

    let mut receiver = transport::engine::Receiver::new(tls, endpoint.credit);
    let t_sasl = Instant::now();
    let login = within(deadline, transport::login(&mut receiver, endpoint, creds)).await;
    if let Err(e) = login {
        return login_failed(report, t_sasl, false, e, kind);
    }
    let sasl_done = Instant::now();

    // Open and Begin. A server that refuses the login may accept SASL and close right after
    // Open with amqp:unauthorized-access: that is reported under the login.
    let opened = within(deadline, transport::open_session(&mut receiver, endpoint)).await;
    let server = match opened {
        Ok(server) => server,
        Err(e) if e.is_login_rejected() => return login_failed(report, t_sasl, true, e, kind),
        Err(e) => {
            push_ok_between(
                &mut report,
                "sasl",
                t_sasl,
                sasl_done,
                "PLAIN login accepted",
            );
            return report.fail(
                "open",
                sasl_done,
                &e,
                Some(hint_open(&e, kind)),
                exit::CHECK_OPEN,
            );
        }
    };
    if let Some(info) = report.endpoint.as_mut() {
        info.server_idle_timeout_ms = server.idle_time_out;
    }
    push_ok_between(
        &mut report,
        "sasl",
        t_sasl,
        sasl_done,
        "PLAIN login accepted",
    );
    let advertised = match server.idle_time_out {
        Some(ms) => format!("the server advertises an idle-time-out of {ms} ms"),
        None => "the server advertises no idle-time-out".to_string(),
    };
    report.ok(
        "open",
        sasl_done,
        format!("connection open, session begun; {advertised}"),
    );

    let t = Instant::now();
    let attached = within(deadline, transport::attach(&mut receiver, endpoint)).await;
    match attached {
        Ok(()) => {}
        Err(e) if e.is_login_rejected() => {
            // Reported under the login, which is what it is about.
            report
                .steps
                .retain(|s| s.step != "sasl" && s.step != "open");
            return login_failed(report, t_sasl, true, e, kind);
        }
        Err(e) => {
            let hint = Some(hint_attach(&e, kind));
            return report.fail("attach", t, &e, hint, exit::CHECK_ATTACH);
        }
    }
    report.ok(
        "attach",
        t,
        format!(
            "receiver link on source `{}`, credit {}",
            endpoint.source, endpoint.credit
        ),
    );

    let t = Instant::now();
    let problems = receiver.close().await;
    if problems.is_empty() {
        report.ok("close", t, "detached, session ended, connection closed");
    } else {
        let s = report.push("close", Status::Warning, t);
        s.error = Some(problems.join("; "));
        s.note = Some("the subscription works; only the polite close did not".into());
    }
    report.finish(exit::OK)
}

/// The login failed: the SASL step, with a note when it was a close right after Open.
fn login_failed(
    report: Report,
    since: Instant,
    sasl_passed: bool,
    e: LinkError,
    kind: Kind,
) -> Report {
    let note = (e.is_login_rejected() && sasl_passed).then(|| NOTE_CLOSE_AFTER_OPEN.to_string());
    let hint = Some(hint_login(&e, kind));
    let mut report = report.fail("sasl", since, &e, hint, exit::CHECK_LOGIN);
    if let Some(step) = report.steps.iter_mut().find(|s| s.step == "sasl") {
        step.note = note;
    }
    report
}

fn push_ok_between(report: &mut Report, step: &'static str, from: Instant, to: Instant, d: &str) {
    let s = report.push(step, Status::Ok, from);
    s.ms = Some(millis(to.saturating_duration_since(from)));
    s.detail = Some(d.to_string());
}

/// Runs a step under the shared TLS-to-attach deadline.
async fn within<T>(
    deadline: tokio::time::Instant,
    step: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout_at(deadline, step).await {
        Ok(result) => result,
        Err(_) => Err(LinkError::Timeout {
            step: "TLS, login, open and attach",
            after: ATTACH_DEADLINE,
        }),
    }
}

fn ms_since(t: Instant) -> f64 {
    millis(t.elapsed())
}

/// Milliseconds, rounded to a tenth.
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

fn config_error(profile: &Profile, field: &str, message: String) -> ConfigError {
    ConfigError {
        file: profile.file.clone(),
        profile: Some(profile.name.clone()),
        field: Some(field.to_string()),
        message,
    }
}

/// Where the credentials come from, in words (never their values).
fn credential_source(profile: &Profile) -> String {
    if let Some(login) = &profile.plain_login {
        return format!("password from {}", login.password);
    }
    if profile.emulator {
        return "throwaway key of the embedded emulator".into();
    }
    if profile.credential_command.is_some() {
        return "credential_command".into();
    }
    if let Some(name) = &profile.aliyun_profile {
        return format!("Alibaba Cloud CLI profile `{name}`");
    }
    let mut s = format!(
        "id from {}, secret from {}",
        profile.access_key_id, profile.access_key_secret
    );
    if let Some(token) = &profile.security_token {
        let _ = write!(s, ", token from {token}");
    }
    s
}

fn hint_dns(e: &LinkError, kind: Kind) -> String {
    match (e, kind) {
        (LinkError::Timeout { .. }, _) => {
            "the resolver did not answer in time: check this machine's DNS settings (/etc/resolv.conf) and network".into()
        }
        (_, Kind::Alibaba) => "check `host` (or `iot_instance_id`, or `uid` and `region`, which build it) and this machine's DNS".into(),
        (_, Kind::Amqp) => "check `host` and this machine's DNS".into(),
    }
}

fn hint_tcp(e: &LinkError, target: &str, kind: Kind) -> String {
    let port_note = match kind {
        Kind::Alibaba => " (Aliyun uses 5671)",
        Kind::Amqp => " (the broker's AMQPS port; 5671 is the usual one)",
    };
    match e {
        LinkError::Tcp { reason, .. } if reason.contains("refused") => format!(
            "nothing accepts connections at {target}: check `port`{port_note} and `host`"
        ),
        _ => format!(
            "no answer from {target}: a firewall may block outbound TCP to that port, or `host`/`port` is wrong{port_note}"
        ),
    }
}

fn hint_tls(e: &LinkError, kind: Kind) -> String {
    use crate::transport::tls::TlsProblem as P;
    match e {
        LinkError::Tls { problem, .. } => match problem {
            P::UnknownIssuer => "set `ca_file` to the CA that signed the server's certificate (for Aliyun, install the system CA bundle, e.g. `ca-certificates`)".into(),
            P::BadSignature => "the certificate is not signed by the CA of that name in `ca_file` or the system roots: set `ca_file` to the CA that signed the server's certificate (an old copy of a regenerated CA looks like this)".into(),
            P::WrongName => "`host` is not a name in the server's certificate: use the documented host name, not an IP address".into(),
            P::Expired | P::NotYetValid => "the certificate is outside its validity period, or this machine's clock is wrong".into(),
            P::NotTls => match kind {
                Kind::Alibaba => "the port does not speak TLS: check `port` (Aliyun uses TLS on 5671)".into(),
                Kind::Amqp => "the port does not speak TLS: use the broker's TLS (AMQPS) port; iot-sub starts TLS at once, it does not upgrade a plain connection".into(),
            },
            P::ClosedDuringHandshake => "the server closed the connection during the TLS handshake: check `host` and `port` (Aliyun uses TLS on 5671)".into(),
            P::Other => "check `host`, `port` and `ca_file`".into(),
        },
        LinkError::Timeout { .. } => "the server accepted TCP but did not finish TLS in time: wrong port, or a firewall or proxy in the way".into(),
        _ => "check `host`, `port` and `ca_file`".into(),
    }
}

fn hint_login(e: &LinkError, kind: Kind) -> String {
    match e {
        LinkError::LoginRejected { .. } if kind == Kind::Amqp => "check `username` and the password (and that the user may connect to the broker's virtual host)".into(),
        LinkError::LoginRejected { .. } => "check the AccessKey id and secret, auth_mode (STS keys start with `STS.` and need ststoken and a token), sign_method, consumer_group_id and iot_instance_id, and that the key may subscribe".into(),
        LinkError::Timeout { .. } => "the server did not finish the login in time: a firewall or proxy in the way, or not an AMQP endpoint".into(),
        _ => "the server dropped the connection during the login: check the credentials, and that this is the AMQP endpoint".into(),
    }
}

fn hint_open(e: &LinkError, kind: Kind) -> String {
    match e {
        LinkError::Timeout { .. } => "the server did not answer the Open or Begin in time: a firewall or proxy in the way".into(),
        _ if kind == Kind::Amqp => "the broker closed the connection right after Open: see its log for why (idle_timeout, permissions)".into(),
        _ => "the server closed the connection right after Open: check `idle_timeout` (30s to 300s) and the credentials (AccessKey, consumer_group_id, iot_instance_id)".into(),
    }
}

fn hint_attach(e: &LinkError, kind: Kind) -> String {
    match e {
        LinkError::Timeout { .. } => "the server did not answer the Attach in time: a firewall or proxy in the way, or an overloaded server".into(),
        _ if kind == Kind::Amqp => "the broker refused the receiver link: check `source` (for RabbitMQ `/amq/queue/NAME`, and the queue must exist) and the user's read permission".into(),
        _ => "the server refused the receiver link: check consumer_group_id, that the group has a server-side subscription, and that it has room for another client".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_steps_are_listed_and_the_status_is_the_failed_steps() {
        let report = Report::new("p").fail("tcp", Instant::now(), "refused", None, 11);
        let names: Vec<_> = report.steps.iter().map(|s| s.step).collect();
        assert_eq!(names, STEPS);
        assert_eq!(report.exit_status, 11);
        assert!(!report.ok);
        assert_eq!(report.failed_step, Some("tcp"));
        assert!(report.render().contains("FAILED at step `tcp` (exit 11)"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["steps"][3]["status"], "failed");
        assert_eq!(json["steps"][4]["status"], "skipped");
    }
}
