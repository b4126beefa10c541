//! systemd service notification (Type=notify): READY=1 once the first receiver link is
//! attached, STATUS= with the connection state and message counts, WATCHDOG=1 only while the
//! run is healthy, STOPPING=1 at the end. Does nothing outside systemd (no NOTIFY_SOCKET).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

/// How often STATUS= is refreshed (and READY=1 looked for) when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Starts the notifier when running under systemd.
pub fn spawn(status: Arc<Status>, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    // systemd expects a ping at least every WATCHDOG_USEC; ping twice as often.
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog
        .map(|w| (w / 2).clamp(Duration::from_millis(50), STATUS_EVERY))
        .unwrap_or(Duration::from_millis(200));
    tokio::spawn(async move {
        let mut ready_sent = false;
        let mut since_status = Duration::MAX;
        let mut interval = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.cancelled() => {
                    send(&[NotifyState::Stopping, NotifyState::Status(&format!("stopping; {}", status.summary()))]);
                    return;
                }
            }
            let mut states: Vec<NotifyState> = Vec::new();
            let summary = status.summary();
            if !ready_sent && status.ready() {
                ready_sent = true;
                states.push(NotifyState::Ready);
                since_status = Duration::MAX;
            }
            since_status = since_status.saturating_add(tick);
            if since_status >= STATUS_EVERY {
                since_status = Duration::ZERO;
                states.push(NotifyState::Status(&summary));
            }
            // No ping while unhealthy: systemd then restarts the service (WatchdogSec=).
            if watchdog.is_some() && status.healthy() {
                states.push(NotifyState::Watchdog);
            }
            if !states.is_empty() {
                send(&states);
            }
        }
    });
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}
