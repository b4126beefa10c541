//! `iot-sub listen`: turns a profile into a supervised subscription writing to an output.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Profile};
use crate::credentials;
use crate::output::Output;
use crate::receive::{Budget, Counters, PumpContext, Stop};
use crate::supervisor::{self, End};
use crate::transport::{tls, Endpoint};

/// Options from the command line.
#[derive(Debug, Clone, Default)]
pub struct ListenOptions {
    /// `--count`.
    pub count: Option<u64>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Shutdown or `--count` reached.
    Done(Stop),
    /// The reader of the output went away (`| head`): a normal end.
    OutputClosed,
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

/// Runs `profile` until shutdown, `--count`, or the output closes.
pub async fn listen(
    profile: Profile,
    options: ListenOptions,
    output: Arc<Output>,
    shutdown: CancellationToken,
) -> Result<Outcome, ListenError> {
    #[cfg(feature = "emulator")]
    let (profile, extra_ca, _demo) = if profile.emulator {
        let mut profile = profile;
        let demo = demo::start(&mut profile, shutdown.clone()).await?;
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
    credentials::resolve(&profile).map_err(|e| ConfigError {
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

    let endpoint = Endpoint {
        host: profile.host.clone(),
        port: profile.port,
        container_id: profile.client_id.clone(),
        idle_timeout: profile.idle_timeout,
        credit: profile.credit,
        source: profile.source.clone(),
        tls,
    };
    let counters = Arc::new(Counters::default());
    let ctx = PumpContext {
        output,
        shutdown,
        budget: Budget::new(options.count.unwrap_or(u64::MAX)),
        counters: counters.clone(),
        max_batch: (profile.credit / 2).max(1) as usize,
        keepalive: profile.idle_timeout / 2,
    };
    tracing::info!(profile = %profile.name, host = %profile.host, port = profile.port, "starting");
    let end = supervisor::supervise(Arc::new(profile), endpoint, ctx).await;
    tracing::info!(
        written = counters.written.load(Ordering::Relaxed),
        accepted = counters.accepted.load(Ordering::Relaxed),
        rejected = counters.rejected.load(Ordering::Relaxed),
        "stopped"
    );
    match end {
        End::Stopped(stop) => Ok(Outcome::Done(stop)),
        End::OutputFailed(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(Outcome::OutputClosed)
        }
        End::OutputFailed(e) => Err(anyhow::anyhow!("writing the output failed: {e}").into()),
    }
}

/// How long a stop may take before the process exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(feature = "emulator")]
mod demo {
    //! The `demo` profile's embedded emulator with simulated devices.

    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                publisher.publish_wait(fleet.next_message(now)).await;
            }
        });
        Ok(emulator)
    }
}
