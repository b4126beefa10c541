//! `iot-sub emulate`: runs the emulator as a standalone server with simulated device traffic
//! and/or messages loaded from a JSON-lines file, until cancelled.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::devices::Fleet;
use super::{DeviceMessage, Emulator, EmulatorConfig, ExtraValue};

/// How often a one-line stats summary is logged.
const STATS_EVERY: Duration = Duration::from_secs(30);
/// The generator's tick; at high rates each tick publishes a batch.
const MIN_TICK: Duration = Duration::from_millis(10);
/// Upper bound on messages published in one tick (keeps a tick short).
const MAX_PER_TICK: u64 = 10_000;

/// Options of the standalone server (`iot-sub emulate`).
#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    pub config: EmulatorConfig,
    /// The CA certificate (PEM, no key) is written here.
    pub ca_out: PathBuf,
    /// Simulated device messages per second (0 = none).
    pub rate: f64,
    pub devices: usize,
    pub seed: u64,
    /// JSON lines published once at start: `{"topic":..,"messageId":..?,"generateTime":..?,
    /// "body": <json or string>?, "bodyBase64": ".."?, "properties": {..}?}`.
    pub from_file: Option<PathBuf>,
    /// Stop generating after this many simulated messages (the server keeps running).
    pub count: Option<u64>,
}

/// Fault injection from the shell: SIGUSR1 closes every live connection the way Aliyun does
/// for maintenance (9602), SIGUSR2 resets them without a Close frame.
async fn drop_on_signals(emulator: &Emulator, shutdown: &CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::warn!("cannot listen for SIGUSR1/SIGUSR2; dropping connections on signal is off");
        return;
    };
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: closing every connection (9602)");
                emulator.drop_connections(super::Drop::ServerClose);
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: resetting every connection");
                emulator.drop_connections(super::Drop::TcpReset);
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Runs until `shutdown` fires, then closes every connection.
pub async fn run_standalone(
    opts: StandaloneOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !(opts.rate.is_finite() && opts.rate >= 0.0) {
        bail!("rate must be a finite number >= 0, got {}", opts.rate);
    }
    let mut file_messages = match &opts.from_file {
        Some(path) => load_messages(path)?,
        None => Vec::new(),
    };
    if let Some(journal) = &opts.config.accept_journal {
        // Accepted by an earlier run of this emulator: the cloud would not send them again.
        let done = read_journal(journal)?;
        let before = file_messages.len();
        file_messages.retain(|m| !done.contains(&m.message_id));
        tracing::info!(
            journal = %journal.display(),
            accepted_before = done.len(),
            skipped = before - file_messages.len(),
            "accept journal read"
        );
    }
    let emulator = Emulator::start(opts.config.clone()).await?;
    emulator
        .write_ca(&opts.ca_out)
        .with_context(|| format!("writing the CA certificate to {}", opts.ca_out.display()))?;
    tracing::info!(
        addr = %emulator.local_addr(),
        ca = %opts.ca_out.display(),
        hostname = %opts.config.tls_hostname,
        rate = opts.rate,
        devices = opts.devices,
        "emulator ready"
    );

    let loaded = file_messages.len();
    for m in file_messages {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = emulator.publish_wait(m) => {}
        }
    }
    if loaded > 0 {
        tracing::info!(messages = loaded, "published the messages from the file");
    }

    let run = async {
        generate(&emulator, &opts, &shutdown).await;
        shutdown.cancelled().await;
    };
    tokio::join!(run, drop_on_signals(&emulator, &shutdown));
    let s = emulator.stats();
    tracing::info!(
        accepted = s.accepted,
        transfers = s.transfers_sent,
        backlog = s.backlog,
        in_flight = s.in_flight,
        "emulator stopping"
    );
    emulator.shutdown().await;
    Ok(())
}

/// Publishes simulated traffic at `rate` until `count` or shutdown; logs stats periodically.
async fn generate(emulator: &Emulator, opts: &StandaloneOptions, shutdown: &CancellationToken) {
    let mut fleet = Fleet::new(opts.seed, opts.devices);
    let generating = opts.rate > 0.0 && opts.count != Some(0);
    let tick = if generating {
        Duration::from_secs_f64(1.0 / opts.rate).max(MIN_TICK)
    } else {
        STATS_EVERY
    };
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut last_stats = Instant::now();
    let mut sent: u64 = 0;
    let mut finished = !generating;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if last_stats.elapsed() >= STATS_EVERY {
            last_stats = Instant::now();
            let s = emulator.stats();
            tracing::info!(
                live = s.live_connections,
                accepted = s.accepted,
                transfers = s.transfers_sent,
                backlog = s.backlog,
                in_flight = s.in_flight,
                timed_out = s.timed_out,
                "emulator stats"
            );
        }
        if finished {
            continue;
        }
        // Publish what is due by now: keeps the rate right when a tick is longer than 1/rate.
        let due = (started.elapsed().as_secs_f64() * opts.rate) as u64;
        let due = opts.count.map_or(due, |c| due.min(c));
        let batch = due.saturating_sub(sent).min(MAX_PER_TICK);
        for _ in 0..batch {
            let m = fleet.next_message(now_ms());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = emulator.publish_wait(m) => {}
            }
            sent += 1;
        }
        if opts.count.is_some_and(|c| sent >= c) {
            tracing::info!(messages = sent, "simulated traffic finished; still serving");
            finished = true;
            // From now on wake only for the stats line.
            ticker = tokio::time::interval(STATS_EVERY);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads a JSON-lines file of messages (blank lines and lines starting with `#` are skipped).
pub(crate) fn load_messages(path: &Path) -> anyhow::Result<Vec<DeviceMessage>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading messages from {}", path.display()))?;
    let mut ids = IdSource::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let m =
            parse_line(line, &mut ids).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        out.push(m);
    }
    Ok(out)
}

/// The messageIds in an accept journal (none if it does not exist yet).
fn read_journal(path: &Path) -> anyhow::Result<std::collections::HashSet<String>> {
    match std::fs::read_to_string(path) {
        // A line cut short by a kill has no newline yet: it was not fully recorded.
        Ok(text) => Ok(text
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e).with_context(|| format!("reading the accept journal {}", path.display())),
    }
}

/// Ids for lines without `messageId`: 19 digits, increasing from the current time.
struct IdSource(u64);

impl IdSource {
    fn new() -> Self {
        IdSource(
            1_000_000_000_000_000_000 + (now_ms().max(0) as u64 % 1_000_000_000_000) * 1_000_000,
        )
    }
    fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}

fn parse_line(line: &str, ids: &mut IdSource) -> anyhow::Result<DeviceMessage> {
    let v: Value = serde_json::from_str(line).context("not a JSON object")?;
    let obj = v.as_object().context("not a JSON object")?;
    let topic = obj
        .get("topic")
        .and_then(Value::as_str)
        .context("`topic` (string) is required")?
        .to_string();
    let message_id = match obj.get("messageId") {
        None | Some(Value::Null) => ids.next(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
        Some(_) => bail!("`messageId` must be a non-empty string or an integer"),
    };
    let generate_time = match obj.get("generateTime") {
        None | Some(Value::Null) => now_ms(),
        Some(v) => v
            .as_i64()
            .context("`generateTime` must be an integer (ms since epoch)")?,
    };
    let body = match (obj.get("bodyBase64"), obj.get("body")) {
        (Some(Value::String(b64)), _) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .context("`bodyBase64` is not valid base64")?,
        (Some(_), _) => bail!("`bodyBase64` must be a string"),
        (None, Some(Value::String(s))) => s.clone().into_bytes(),
        (None, Some(Value::Null)) | (None, None) => Vec::new(),
        (None, Some(other)) => serde_json::to_vec(other)?,
    };
    let mut extra_properties = Vec::new();
    if let Some(props) = obj.get("properties") {
        let props = props
            .as_object()
            .context("`properties` must be an object")?;
        for (k, v) in props {
            let value = match v {
                Value::String(s) => ExtraValue::String(s.clone()),
                Value::Bool(b) => ExtraValue::Bool(*b),
                Value::Number(n) => {
                    match (n.as_i64(), i32::try_from(n.as_i64().unwrap_or(i64::MAX))) {
                        (Some(_), Ok(small)) => ExtraValue::Int(small),
                        (Some(big), Err(_)) => ExtraValue::Long(big),
                        (None, _) => bail!("property `{k}`: only integers are supported"),
                    }
                }
                _ => bail!("property `{k}`: use a string, integer or boolean"),
            };
            extra_properties.push((k.clone(), value));
        }
    }
    Ok(DeviceMessage {
        topic,
        message_id,
        generate_time,
        body,
        extra_properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_lines() {
        let mut ids = IdSource::new();
        let m = parse_line(
            r#"{"topic":"/a1/d1/user/x","messageId":"42","generateTime":7,"body":{"a":1},"properties":{"qos":1,"tag":"t"}}"#,
            &mut ids,
        )
        .unwrap();
        assert_eq!(m.topic, "/a1/d1/user/x");
        assert_eq!(m.message_id, "42");
        assert_eq!(m.generate_time, 7);
        assert_eq!(m.body, br#"{"a":1}"#);
        assert_eq!(
            m.extra_properties,
            vec![
                ("qos".to_string(), ExtraValue::Int(1)),
                ("tag".to_string(), ExtraValue::String("t".into()))
            ]
        );

        let m = parse_line(r#"{"topic":"t","body":"plain text"}"#, &mut ids).unwrap();
        assert_eq!(m.body, b"plain text");
        assert_eq!(m.message_id.len(), 19);
        let m2 = parse_line(
            r#"{"topic":"t","messageId":123,"bodyBase64":"AP8A"}"#,
            &mut ids,
        )
        .unwrap();
        assert_eq!(m2.body, vec![0, 255, 0]);
        assert_eq!(m2.message_id, "123");

        assert!(parse_line(r#"{"body":"x"}"#, &mut ids).is_err());
        assert!(parse_line(r#"{"topic":"t","bodyBase64":"!!"}"#, &mut ids).is_err());
        assert!(parse_line("not json", &mut ids).is_err());
    }

    #[test]
    fn journal_lines_cut_short_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        assert!(read_journal(&path).unwrap().is_empty(), "no journal yet");
        std::fs::write(&path, "11\n12\n1").unwrap();
        let ids = read_journal(&path).unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains("11") && ids.contains("12") && !ids.contains("1"));
    }

    #[test]
    fn loads_a_file_with_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, "# header\n{\"topic\":\"a\"}\n\n{\"topic\":\"b\"}\n").unwrap();
        let ms = load_messages(&path).unwrap();
        assert_eq!(ms.len(), 2);
        assert_ne!(ms[0].message_id, ms[1].message_id);
        std::fs::write(&path, "{\"topic\":\"a\"}\n{oops}\n").unwrap();
        let err = format!("{:#}", load_messages(&path).unwrap_err());
        assert!(err.contains("m.jsonl:2"), "{err}");
    }
}
