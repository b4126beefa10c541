//! Keeps one subscription alive: sign, connect, receive, and on failure log the cause and
//! retry with jittered exponential backoff that resets after a healthy period.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::cloud::alibaba;
use crate::config::Profile;
use crate::credentials;
use crate::receive::{self, PumpContext};
use crate::transport::{self, Endpoint, LinkError};

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

/// Runs one subscription until the run stops. Never gives up on network, protocol or login
/// errors: it logs them and retries.
pub async fn supervise(profile: Arc<Profile>, endpoint: Endpoint, ctx: PumpContext) {
    let mut backoff = Backoff::new(
        profile.backoff_initial,
        profile.backoff_max,
        fastrand::Rng::new(),
    );
    let stop = ctx.stopper.token();
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let failure: Failure = match credentials::resolve(&profile) {
            Err(e) => Failure::Credentials(e),
            Ok(login) => {
                let mut login = login;
                login.client_id = endpoint.container_id.clone();
                // A fresh timestamp and signature for every attempt.
                let creds = alibaba::sign(&login, crate::time::now_ms());
                info!(
                    attempt,
                    host = %endpoint.host,
                    port = endpoint.port,
                    username = %alibaba::masked_username(&creds.username),
                    "connecting"
                );
                let started = Instant::now();
                let connected = tokio::select! {
                    r = transport::connect(&endpoint, creds) => r,
                    _ = stop.cancelled() => return,
                };
                match connected {
                    Err(e) => Failure::Link(e),
                    Ok(mut sub) => {
                        info!(
                            attempt,
                            client_id = %endpoint.container_id,
                            setup_ms = started.elapsed().as_millis() as u64,
                            "receiver link attached; receiving"
                        );
                        let up = Instant::now();
                        ctx.status.link_attached();
                        let pumped = receive::pump(&mut sub, &ctx).await;
                        ctx.status.link_lost();
                        match pumped {
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
                }
            }
        };
        let delay = backoff.next_delay();
        ctx.status.failure(match &failure {
            Failure::Credentials(_) => "credentials",
            Failure::Link(e) => e.label(),
        });
        log_failure(attempt, &failure, delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// What went wrong with one attempt.
enum Failure {
    Credentials(credentials::CredentialError),
    Link(LinkError),
}

/// One line per failed attempt, with the server's words verbatim and the next delay.
fn log_failure(attempt: u64, failure: &Failure, retry_in: Duration) {
    let retry_in = humantime::format_duration(Duration::from_millis(retry_in.as_millis() as u64));
    match failure {
        Failure::Credentials(e) => {
            error!(attempt, error = %e, %retry_in, "cannot read credentials; retrying")
        }
        Failure::Link(e) if e.is_login_rejected() => {
            error!(attempt, error = %e, %retry_in, "LOGIN REJECTED; retrying")
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
