//! Command-line interface (clap derive). Only parsing lives here; `listen` and `emulate` do the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::format::Format;
use crate::message::BodyMode;
use crate::topic::TopicFilter;

/// Receive IoT device messages from a cloud server-side subscription (AMQP 1.0) as JSON lines.
#[derive(Debug, Parser)]
#[command(name = "iot-sub", version, about, long_about = None)]
pub struct Cli {
    /// Log level or filter for stderr (RUST_LOG syntax); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info", value_name = "FILTER")]
    pub log_level: String,

    /// Log format on stderr: text, or json (one object per line, for log shippers).
    #[arg(long, global = true, default_value = "text", value_enum)]
    pub log_format: LogFormat,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Subscribe with a profile and write each message as one JSON line to stdout.
    Listen(ListenArgs),
    /// Run a local emulator of the Alibaba Cloud IoT AMQP endpoint (no cloud account needed).
    #[cfg(feature = "emulator")]
    Emulate(EmulateArgs),
    /// Check a profile: config, credentials (masked), then DNS, TCP, TLS, login, open and
    /// attach, each timed; the exit status names the step that failed.
    Check(CheckArgs),
    /// Print a shell completion script to stdout.
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout, or write one page per command to a directory.
    Man(ManArgs),
}

/// `iot-sub listen`.
#[derive(Debug, Args)]
pub struct ListenArgs {
    /// Profile name: a `[profiles.NAME]` table in the config file (`demo` works without one).
    #[arg(short, long, value_name = "NAME")]
    pub profile: String,

    /// Config file [default: $IOT_SUB_CONFIG, $XDG_CONFIG_HOME/iot-sub/config.toml, /etc/iot-sub/config.toml].
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Exit 0 once N messages are written and accepted.
    #[arg(short = 'n', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Stopping")]
    pub count: Option<u64>,

    /// Exit when no message has arrived for this long (e.g. 30s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Stopping")]
    pub idle_exit: Option<Duration>,

    /// Exit after running this long (e.g. 10m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Stopping")]
    pub duration: Option<Duration>,

    /// Output format: json (one object per line), pretty (readable blocks), or a one-line
    /// template with the JSON field names, e.g. '{topic} {deviceName} {body}'.
    #[arg(
        short,
        long,
        default_value = "json",
        value_name = "FORMAT",
        help_heading = "Output"
    )]
    pub format: Format,

    /// Body encoding: auto (JSON, else text, else base64), json, text, base64.
    #[arg(
        long,
        default_value = "auto",
        value_name = "MODE",
        help_heading = "Output"
    )]
    pub body: BodyMode,

    /// Only messages whose topic matches (MQTT wildcards + and #); repeatable.
    #[arg(short, long = "topic", value_name = "FILTER", value_parser = TopicFilter::new, help_heading = "Output")]
    pub topics: Vec<TopicFilter>,

    /// Drop messages whose topic matches (they are still accepted); repeatable.
    #[arg(long = "exclude-topic", value_name = "FILTER", value_parser = TopicFilter::new, help_heading = "Output")]
    pub exclude_topics: Vec<TopicFilter>,

    /// Write every message, even one whose messageId was just written (no duplicate suppression).
    #[arg(long, help_heading = "Duplicates and order")]
    pub no_dedup: bool,

    /// How many recent messageIds duplicate suppression remembers.
    #[arg(long, default_value_t = crate::dedup::DEFAULT_SIZE, value_name = "N", value_parser = parse_dedup_size, help_heading = "Duplicates and order")]
    pub dedup_size: usize,

    /// How long duplicate suppression remembers a messageId.
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Duplicates and order")]
    pub dedup_age: Duration,

    /// Hold messages up to this long (at most 20s) and write them in generateTime order.
    #[arg(long, value_name = "DURATION", value_parser = parse_reorder_window, help_heading = "Duplicates and order")]
    pub reorder_window: Option<Duration>,

    /// Pipe the output into one long-lived `sh -c CMD` (restarted with backoff if it dies).
    #[arg(
        long,
        value_name = "CMD",
        conflicts_with = "exec_each",
        help_heading = "Commands"
    )]
    pub exec: Option<String>,

    /// Run `sh -c CMD` once per message: body on stdin, IOT_SUB_TOPIC, IOT_SUB_MESSAGE_ID,
    /// IOT_SUB_GENERATE_TIME, IOT_SUB_PRODUCT_KEY, IOT_SUB_DEVICE_NAME in the environment;
    /// accepted when it exits 0, released for redelivery otherwise.
    #[arg(long, value_name = "CMD", conflicts_with_all = ["format", "reorder_window"], help_heading = "Commands")]
    pub exec_each: Option<String>,

    /// How many --exec-each commands may run at once.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = parse_jobs, requires = "exec_each", help_heading = "Commands")]
    pub jobs: usize,

    /// An --exec-each command running longer is killed and its message released.
    #[arg(long, default_value = "20s", value_name = "DURATION", value_parser = humantime::parse_duration, requires = "exec_each", help_heading = "Commands")]
    pub exec_timeout: Duration,

    /// Serve Prometheus metrics at /metrics, and /healthz and /readyz, over HTTP on this
    /// address (e.g. 127.0.0.1:9464; a bare port means 127.0.0.1). Off unless given.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_listen, help_heading = "Service")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `--metrics-listen`: `ADDR:PORT`, or a bare port on loopback (another interface only when
/// named).
fn parse_metrics_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.parse::<u16>() {
        Ok(port) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        Err(_) => Err("expected IP:PORT (e.g. 127.0.0.1:9464, [::1]:9464, 0.0.0.0:9464) or a port (on 127.0.0.1)".into()),
    }
}

fn parse_dedup_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
        _ => {
            Err("allowed: 1 to 10000000 (use --no-dedup to turn duplicate suppression off)".into())
        }
    }
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err("allowed: 1 to 256".into()),
    }
}

/// The reorder window must stay well inside the cloud's 30 s ack timeout: held messages are
/// not accepted yet.
fn parse_reorder_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > Duration::from_secs(20) {
        return Err("allowed: more than 0 and at most 20s (held messages are not accepted yet, and the cloud redelivers after 30s)".into());
    }
    Ok(d)
}

/// How the emulator refuses a bad login (the real service's form is undocumented).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AuthFailureArg {
    /// SASL outcome `auth`.
    Sasl,
    /// SASL succeeds, then the connection is closed with `amqp:unauthorized-access`.
    Close,
}

/// `iot-sub emulate`.
#[derive(Debug, Args)]
pub struct EmulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5671", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Host name in the generated server certificate (clients must connect with it).
    #[arg(long, default_value = "localhost", value_name = "HOST")]
    pub tls_hostname: String,

    /// Where to write the generated CA certificate (point a profile's `ca_file` at it).
    #[arg(long, default_value = "iot-sub-emulator-ca.pem", value_name = "FILE")]
    pub ca_out: PathBuf,

    /// AccessKey id the emulator accepts.
    #[arg(long, env = "ALIBABA_CLOUD_ACCESS_KEY_ID", value_name = "ID")]
    pub access_key_id: String,

    /// AccessKey secret the emulator accepts.
    #[arg(
        long,
        env = "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub access_key_secret: String,

    /// Also accept this STS token (authMode=ststoken) with the same AccessKey pair.
    #[arg(
        long,
        env = "ALIBABA_CLOUD_SECURITY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub security_token: Option<String>,

    /// Only accept logins for this consumer group.
    #[arg(long, value_name = "ID")]
    pub consumer_group_id: Option<String>,

    /// Simulated device messages per second (0: none).
    #[arg(long, default_value_t = 5.0, value_name = "N")]
    pub rate: f64,

    /// Number of simulated devices.
    #[arg(long, default_value_t = 6, value_name = "N")]
    pub devices: usize,

    /// Seed for the simulated devices.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,

    /// Stop generating after N messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Publish the messages in this JSON-lines file at start
    /// ({"topic":..,"messageId":..,"generateTime":..,"body":..} or "bodyBase64").
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,

    /// Append the messageId of every accepted message to FILE, one per line, as it is
    /// accepted; at start, messages of --from-file already listed there are not sent again,
    /// so an emulator killed and restarted with the same files resumes like the cloud would.
    #[arg(long, value_name = "FILE")]
    pub journal: Option<PathBuf>,

    /// Keep the TLS identity (CA certificate, server certificate and key) in FILE: created
    /// with mode 0600 on first start, reused by later starts with the same --tls-hostname, so
    /// clients that trust --ca-out keep trusting a restarted emulator.
    #[arg(long, value_name = "FILE")]
    pub keep_identity: Option<PathBuf>,

    /// How a bad login is refused.
    #[arg(long, value_enum, default_value = "sasl")]
    pub auth_failure: AuthFailureArg,

    /// Delay before an unaccepted delivery is sent again.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub redelivery_delay: Duration,

    /// An unsettled delivery times out after this long (then it is redelivered).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub ack_timeout: Duration,

    /// A receiver link must be attached this soon after connecting.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub attach_deadline: Duration,

    /// Advertise this idle-time-out in the emulator's Open (default: none, so clients must
    /// keep the connection alive on their own).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub advertise_idle_timeout: Option<Duration>,

    /// Refuse logins whose timestamp is further than this from the emulator's clock.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_clock_skew: Option<Duration>,

    /// Send messageId as an AMQP long instead of a string.
    #[arg(long)]
    pub message_id_as_long: bool,
}

/// `iot-sub check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Profile name: a `[profiles.NAME]` table in the config file (`demo` works without one).
    #[arg(short, long, value_name = "NAME")]
    pub profile: String,

    /// Config file [default: $IOT_SUB_CONFIG, $XDG_CONFIG_HOME/iot-sub/config.toml, /etc/iot-sub/config.toml].
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print one JSON object instead of the readable step list.
    #[arg(long)]
    pub json: bool,
}

/// `iot-sub completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `iot-sub man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write iot-sub.1 and one iot-sub-COMMAND.1 per command into this directory instead.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}
