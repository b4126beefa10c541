//! `iot-sub listen`: turns a profile and the command line into N supervised connections
//! feeding one sink.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::config::{ConfigError, Kind, Profile};
use crate::credentials;
use crate::dedup::Keyer;
use crate::format::Format;
use crate::message::{BodyMode, Mapping};
use crate::receive::{PumpContext, Render};
use crate::sink::writer::{ExecChild, Writer};
use crate::sink::{self, Counters, SinkOptions, Target, CHANNEL_BATCHES_PER_CONNECTION};
use crate::status::Status;
use crate::stop::{StopReason, Stopper};
use crate::supervisor;
use crate::topic::TopicFilters;
use crate::transport::{tls, Endpoint};

/// What the command line asks for.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// `--count`.
    pub count: Option<u64>,
    /// `--idle-exit`.
    pub idle_exit: Option<Duration>,
    /// `--duration`.
    pub duration: Option<Duration>,
    /// `--format`.
    pub format: Format,
    /// `--body`.
    pub body: BodyMode,
    /// `--topic`, `--exclude-topic`.
    pub filters: TopicFilters,
    /// `None` with `--no-dedup`, else (size, age).
    pub dedup: Option<(usize, Duration)>,
    /// `--reorder-window`.
    pub reorder: Option<Duration>,
    /// `--exec`.
    pub exec: Option<String>,
    /// `--exec-each`, `--jobs`, `--exec-timeout`.
    pub exec_each: Option<(String, usize, Duration)>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            count: None,
            idle_exit: None,
            duration: None,
            format: Format::Json,
            body: BodyMode::Auto,
            filters: TopicFilters::default(),
            dedup: Some((crate::dedup::DEFAULT_SIZE, crate::dedup::DEFAULT_AGE)),
            reorder: None,
            exec: None,
            exec_each: None,
            metrics_listen: None,
        }
    }
}

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Bad profile or unreadable credentials at start: exit 78.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else: exit 1.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// How long a stop may take before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs `profile` until the run stops; returns why it stopped.
pub async fn listen(
    profile: Profile,
    options: ListenOptions,
    stdout: Writer,
    stopper: Arc<Stopper>,
) -> Result<StopReason, ListenError> {
    #[cfg(feature = "emulator")]
    let (profile, extra_ca, _demo) = if profile.emulator {
        let mut profile = profile;
        let demo = demo::start(&mut profile, stopper.token()).await?;
        let ca = Some(demo.ca_pem().to_string());
        (profile, ca, Some(demo))
    } else {
        (profile, None, None)
    };
    #[cfg(not(feature = "emulator"))]
    let extra_ca: Option<String> = if profile.emulator {
        return Err(
            anyhow::anyhow!("this build has no emulator (feature `emulator` is off)").into(),
        );
    } else {
        None
    };

    // Unreadable credentials at start are a configuration problem; later they are retried.
    let first = credentials::resolve_fresh(&profile)
        .await
        .map_err(|e| ConfigError {
            file: profile.file.clone(),
            profile: Some(profile.name.clone()),
            field: Some(e.what.to_string()),
            message: e.why.clone(),
        })?;
    let tls = tls::client_config(profile.ca_file.as_deref(), extra_ca.as_deref()).map_err(|m| {
        ConfigError {
            file: profile.file.clone(),
            profile: Some(profile.name.clone()),
            field: Some("ca_file".into()),
            message: m,
        }
    })?;

    let counters = Arc::new(Counters::default());
    let status = Status::new(counters.clone(), profile.connections as usize);
    if let Some(addr) = options.metrics_listen {
        let handle = crate::metrics_http::install_recorder()?;
        let bound =
            crate::metrics_http::start(addr, handle, status.clone(), stopper.token()).await?;
        tracing::info!(addr = %bound, "metrics: serving /metrics, /healthz, /readyz");
    }
    crate::notify::spawn(status.clone(), stopper.token());
    let target = match (&options.exec_each, &options.exec) {
        (Some((command, jobs, timeout)), _) => Target::ExecEach {
            command: command.as_str().into(),
            jobs: *jobs,
            timeout: *timeout,
        },
        (None, Some(command)) => Target::Write(Writer::Exec(Box::new(ExecChild::new(
            command.clone(),
            stopper.token(),
        )))),
        (None, None) => Target::Write(stdout),
    };
    let (to_sink, sink_rx) =
        mpsc::channel(CHANNEL_BATCHES_PER_CONNECTION * profile.connections as usize);
    let sink = tokio::spawn(sink::run(
        sink_rx,
        SinkOptions {
            target,
            dedup: options.dedup,
            reorder: options.reorder,
            count: options.count,
            idle_exit: options.idle_exit,
        },
        stopper.clone(),
        status.clone(),
    ));

    let render = Arc::new(Render {
        mapping: match profile.kind {
            Kind::Alibaba => Mapping::Alibaba,
            Kind::Amqp => Mapping::Generic {
                source: profile.source.clone(),
            },
        },
        format: options.format.clone(),
        body: options.body,
        filters: options.filters.clone(),
        keyer: Keyer::default(),
        exec_each: options.exec_each.is_some(),
    });
    tracing::info!(
        profile = %profile.name,
        host = %profile.host,
        port = profile.port,
        connections = profile.connections,
        "starting"
    );
    let profile = Arc::new(profile);
    let mut connections = JoinSet::new();
    for i in 1..=profile.connections {
        let container_id = if profile.connections == 1 {
            profile.client_id.clone()
        } else {
            format!("{}-{i}", profile.client_id)
        };
        let endpoint = Endpoint {
            host: profile.host.clone(),
            port: profile.port,
            container_id,
            idle_timeout: profile.idle_timeout,
            credit: profile.credit,
            source: profile.source.clone(),
            tls: tls.clone(),
        };
        let ctx = PumpContext {
            sink: to_sink.clone(),
            stopper: stopper.clone(),
            counters: counters.clone(),
            status: status.clone(),
            credit_gauge: Status::credit_gauge(&endpoint.container_id),
            render: render.clone(),
            max_batch: (profile.credit / 2).max(1) as usize,
            credit: profile.credit as usize,
        };
        connections.spawn(supervisor::supervise(
            profile.clone(),
            endpoint,
            ctx,
            Some(first.clone()),
        ));
    }
    drop(to_sink);

    if let Some(d) = options.duration {
        let stopper = stopper.clone();
        let stopped = stopper.token();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(d) => {
                    tracing::info!(duration = ?d, "--duration elapsed; stopping");
                    stopper.stop(StopReason::Duration);
                }
                _ = stopped.cancelled() => {}
            }
        });
    }

    while connections.join_next().await.is_some() {}
    // The sink ends when the last connection has hung up.
    let _ = sink.await;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    tracing::info!(
        written = get(&counters.written),
        accepted = get(&counters.accepted),
        duplicates = get(&counters.duplicates),
        filtered = get(&counters.filtered),
        rejected = get(&counters.rejected),
        released = get(&counters.released),
        "stopped"
    );
    Ok(stopper.reason().unwrap_or(StopReason::Signal))
}

#[cfg(feature = "emulator")]
pub(crate) mod demo {
    //! The `demo` profile's embedded emulator with simulated devices.

    use std::sync::Arc;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use crate::config::{Profile, SecretSource};
    use crate::emulator::{devices::Fleet, Emulator, EmulatorConfig};
    use crate::secret::Secret;

    /// Starts the emulator on a free loopback port and points `profile` at it.
    pub async fn start(
        profile: &mut Profile,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Emulator>> {
        let key_id = "demo-access-key".to_string();
        let secret = format!("demo-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let emulator = Emulator::start(EmulatorConfig {
            bind: "127.0.0.1:0".parse().expect("valid address"),
            tls_hostname: profile.host.clone(),
            access_keys: vec![(key_id.clone(), Secret::new(secret.clone()))],
            ..EmulatorConfig::default()
        })
        .await?;
        profile.port = emulator.local_addr().port();
        profile.access_key_id = SecretSource::Inline(key_id);
        profile.access_key_secret = SecretSource::Inline(secret);
        profile.security_token = None;
        profile.auth_mode = crate::cloud::alibaba::AuthMode::Aksign;
        tracing::info!(
            addr = %emulator.local_addr(),
            rate = profile.emulator_rate,
            "demo: embedded emulator started with simulated devices (Ctrl-C to stop)"
        );
        let emulator = Arc::new(emulator);
        let publisher = emulator.clone();
        let period = Duration::from_secs_f64(1.0 / profile.emulator_rate);
        tokio::spawn(async move {
            let mut fleet = Fleet::new(fastrand::u64(..), 6);
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let now = crate::time::now_ms() as i64;
                publisher.publish_wait(fleet.next_message(now)).await;
            }
        });
        Ok(emulator)
    }
}
