//! Keeps one subscription alive: sign, connect, receive, and on failure log the cause and
//! retry with jittered exponential backoff that resets after a healthy period.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Kind, Profile};
use crate::credentials::{self, Credentials};
use crate::receive::{self, PumpContext};
use crate::transport::{self, Endpoint, LinkError, Subscription};

/// A connection that stayed up this long resets the backoff to its first step.
pub const HEALTHY_PERIOD: Duration = Duration::from_secs(30);

/// Capped exponential backoff with jitter: each delay is uniform in [d/2, d], d doubling from
/// `initial` up to `max`.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A fresh policy.
    pub fn new(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Backoff {
            initial,
            max,
            step: 0,
            rng,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.step.min(20))
            .min(self.max);
        self.step = self.step.saturating_add(1);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_millis() as u64;
        half + Duration::from_millis(self.rng.u64(0..=spread))
    }

    /// Back to the first step.
    pub fn reset(&mut self) {
        self.step = 0;
    }
}

/// Before credentials with an expiry run out, the connection is replaced when this share of
/// their remaining lifetime has passed.
const ROTATE_AT: f64 = 0.8;

/// After a failed replacement, the next try comes this much later.
const ROTATE_RETRY: Duration = Duration::from_secs(5);

/// A subscription and when its credentials expire.
type Opened = (Subscription, Option<SystemTime>);

/// How one connection's pumping ended.
enum Step {
    /// The run stopped (`Ok`) or the connection failed.
    Ended(Result<(), LinkError>),
    /// A replacement is attached; the old pump drained with this result.
    Replaced(Box<Opened>, Result<(), LinkError>),
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When to replace a connection whose credentials expire at `expires_at`.
fn rotation_due(expires_at: Option<SystemTime>) -> Option<tokio::time::Instant> {
    let left = expires_at?
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Some(tokio::time::Instant::now() + left.mul_f64(ROTATE_AT))
}

/// Signs fresh credentials and opens a subscription with them.
async fn open(
    profile: &Profile,
    endpoint: &Endpoint,
    attempt: u64,
    already_read: Option<Credentials>,
) -> Result<Opened, Failure> {
    let fresh = match already_read {
        Some(c) => c,
        None => credentials::resolve_fresh(profile)
            .await
            .map_err(Failure::Credentials)?,
    };
    // A fresh timestamp and signature for every attempt (Alibaba).
    let creds = fresh
        .login
        .sasl(&endpoint.container_id, crate::time::now_ms());
    info!(
        attempt,
        host = %endpoint.host,
        port = endpoint.port,
        username = %fresh.login.shown_username(&creds),
        "connecting"
    );
    let started = Instant::now();
    let sub = transport::connect(endpoint, creds)
        .await
        .map_err(Failure::Link)?;
    info!(
        attempt,
        client_id = %endpoint.container_id,
        setup_ms = started.elapsed().as_millis() as u64,
        "receiver link attached; receiving"
    );
    Ok((sub, fresh.expires_at))
}

/// Runs one subscription until the run stops. Never gives up on network, protocol or login
/// errors: it logs them and retries. When the credentials say when they expire, the
/// connection is replaced before then, make-before-break: the new link is attached before
/// the old one stops and closes, so nothing is lost and there is no gap.
///
/// `first` are credentials already read at start (so a credential command does not run
/// twice); every later attempt reads them again.
pub async fn supervise(
    profile: Arc<Profile>,
    endpoint: Endpoint,
    ctx: PumpContext,
    first: Option<Credentials>,
) {
    let mut first = first;
    let mut backoff = Backoff::new(
        profile.backoff_initial,
        profile.backoff_max,
        fastrand::Rng::new(),
    );
    let stop = ctx.stopper.token();
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let opened = tokio::select! {
            r = open(&profile, &endpoint, attempt, first.take()) => r,
            _ = stop.cancelled() => return,
        };
        let failure = match opened {
            Err(failure) => failure,
            Ok((mut sub, mut expires_at)) => {
                ctx.status.link_attached();
                let mut up = Instant::now();
                let ended = loop {
                    let retire = stop.child_token();
                    let step = {
                        let pump = receive::pump(&mut sub, &ctx, &retire);
                        tokio::pin!(pump);
                        let mut due = rotation_due(expires_at);
                        let mut replacement: Option<JoinHandle<Result<Opened, Failure>>> = None;
                        loop {
                            tokio::select! {
                                r = &mut pump => {
                                    if let Some(r) = replacement.take() {
                                        r.abort();
                                    }
                                    break Step::Ended(r);
                                }
                                _ = sleep_until(due), if due.is_some() && replacement.is_none() => {
                                    due = None;
                                    let (profile, endpoint) = (profile.clone(), endpoint.clone());
                                    replacement = Some(tokio::spawn(async move {
                                        open(&profile, &endpoint, attempt, None).await
                                    }));
                                }
                                done = async { replacement.as_mut().expect("guarded").await }, if replacement.is_some() => {
                                    replacement = None;
                                    match done {
                                        Ok(Ok(opened)) => {
                                            ctx.status.link_attached();
                                            // The new link is attached: the old pump stops
                                            // taking deliveries and waits for its accepts.
                                            retire.cancel();
                                            break Step::Replaced(Box::new(opened), (&mut pump).await);
                                        }
                                        Ok(Err(failure)) => {
                                            // Keep the old connection and try again soon.
                                            warn!(error = %failure, retry_in = ?ROTATE_RETRY, "could not replace the connection before its credentials expire; keeping it for now");
                                            due = Some(tokio::time::Instant::now() + ROTATE_RETRY);
                                        }
                                        Err(e) => {
                                            warn!(error = %e, "replacing the connection failed");
                                            due = Some(tokio::time::Instant::now() + ROTATE_RETRY);
                                        }
                                    }
                                }
                            }
                        }
                    };
                    match step {
                        Step::Ended(r) => break r,
                        Step::Replaced(opened, drained) => {
                            let (new_sub, new_expiry) = *opened;
                            info!(client_id = %endpoint.container_id, "replaced the connection before its credentials expire; closing the old one");
                            let old = std::mem::replace(&mut sub, new_sub);
                            if drained.is_ok() {
                                old.close().await;
                            }
                            ctx.status.link_lost();
                            expires_at = new_expiry;
                            up = Instant::now();
                        }
                    }
                };
                ctx.status.link_lost();
                match ended {
                    Ok(()) => {
                        sub.close().await;
                        return;
                    }
                    Err(e) => {
                        if up.elapsed() >= HEALTHY_PERIOD {
                            backoff.reset();
                        }
                        drop(sub);
                        Failure::Link(e)
                    }
                }
            }
        };
        let delay = backoff.next_delay();
        ctx.status.failure(match &failure {
            Failure::Credentials(_) => "credentials",
            Failure::Link(e) => e.label(),
        });
        log_failure(attempt, &failure, delay, profile.kind);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// What went wrong with one attempt.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Credentials(credentials::CredentialError),
    #[error(transparent)]
    Link(LinkError),
}

/// What to check after a rejected login, per kind of profile.
pub fn login_hint(kind: Kind) -> &'static str {
    match kind {
        Kind::Alibaba => "check the AccessKey id and secret, auth_mode, sign_method, consumer_group_id and iot_instance_id",
        Kind::Amqp => "check `username` and the password",
    }
}

/// One line per failed attempt, with the server's words verbatim and the next delay.
fn log_failure(attempt: u64, failure: &Failure, retry_in: Duration, kind: Kind) {
    let retry_in = humantime::format_duration(Duration::from_millis(retry_in.as_millis() as u64));
    match failure {
        Failure::Credentials(e) => {
            error!(attempt, error = %e, %retry_in, "cannot read credentials; retrying")
        }
        Failure::Link(e) if e.is_login_rejected() => {
            error!(attempt, error = %e, hint = login_hint(kind), %retry_in, "LOGIN REJECTED; retrying")
        }
        Failure::Link(e) => {
            warn!(attempt, error = %e, %retry_in, "connection failed; reconnecting")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_jitters_and_resets() {
        let mut b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(8),
            fastrand::Rng::with_seed(7),
        );
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let ceilings = [1, 2, 4, 8, 8, 8];
        for (d, c) in delays.iter().zip(ceilings) {
            let c = Duration::from_secs(c);
            assert!(*d >= c / 2 && *d <= c, "{d:?} not in [{:?}, {c:?}]", c / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
