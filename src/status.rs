//! What the run is doing, for the people and programs watching it: systemd's STATUS= and
//! watchdog, and the metrics (through the `metrics` facade: nothing is recorded until an
//! exporter is installed, so the hot path pays almost nothing without one).
//!
//! Hot-path counts live in [`Counters`] atomics; [`Status::sync_metrics`] copies them into the
//! metrics registry when it is read, so each message costs one atomic add, not a registry call.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sink::Counters;

/// Without a receiver link for this long, the run counts as unhealthy (watchdog, /healthz).
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(300);

/// Shared by every task of a run.
#[derive(Debug)]
pub struct Status {
    /// Message counts.
    pub counters: Arc<Counters>,
    /// Configured connections.
    pub connections: usize,
    attached: AtomicUsize,
    ever_attached: AtomicBool,
    started: Instant,
    // When the last receiver link was lost while none other was up.
    all_lost_at: Mutex<Option<Instant>>,
    in_flight: AtomicI64,
    reconnects: AtomicU64,
}

impl Status {
    /// A run about to open `connections` connections.
    pub fn new(counters: Arc<Counters>, connections: usize) -> Arc<Self> {
        Arc::new(Status {
            counters,
            connections,
            attached: AtomicUsize::new(0),
            ever_attached: AtomicBool::new(false),
            started: Instant::now(),
            all_lost_at: Mutex::new(None),
            in_flight: AtomicI64::new(0),
            reconnects: AtomicU64::new(0),
        })
    }

    /// A receiver link is attached.
    pub fn link_attached(&self) {
        self.attached.fetch_add(1, Ordering::AcqRel);
        self.ever_attached.store(true, Ordering::Release);
        *self.all_lost_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
        metrics::gauge!("iot_sub_connected_links").set(self.attached() as f64);
    }

    /// An attached link ended (a reconnect follows unless the run is stopping).
    pub fn link_lost(&self) {
        let before = self.attached.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            *self.all_lost_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        metrics::gauge!("iot_sub_connected_links").set(self.attached() as f64);
    }

    /// A connection attempt or a live connection failed; `cause` is a short label.
    pub fn failure(&self, cause: &'static str) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("iot_sub_reconnects_total", "cause" => cause).increment(1);
    }

    /// Deliveries handed to the sink and not yet settled changed by `delta`.
    pub fn in_flight_add(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    /// The gauge of the link credit `connection` has left. Taken once per connection, after
    /// an exporter is installed, so the hot path only sets it (no key built per batch).
    pub fn credit_gauge(connection: &str) -> metrics::Gauge {
        metrics::gauge!("iot_sub_link_credit", "connection" => connection.to_string())
    }

    /// The histogram of delays from generateTime to output; taken once, like the gauge above.
    pub fn delay_histogram() -> metrics::Histogram {
        metrics::histogram!("iot_sub_delivery_delay_seconds")
    }

    /// A message went out; `generate_time` is its generateTime (ms since the epoch).
    pub fn record_delay(histogram: &metrics::Histogram, generate_time: Option<i64>, now_ms: u64) {
        if let Some(t) = generate_time {
            let delay_ms = (now_ms as i64 - t).max(0) as f64;
            histogram.record(delay_ms / 1000.0);
        }
    }

    /// Receiver links attached now.
    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::Acquire)
    }

    /// At least one receiver link has been attached (systemd READY=1, /readyz).
    pub fn ready(&self) -> bool {
        self.ever_attached.load(Ordering::Acquire)
    }

    /// A link is up, or the last one went down less than [`UNHEALTHY_AFTER`] ago (a reconnect
    /// is under way), or the run started less than that ago.
    pub fn healthy(&self) -> bool {
        if self.attached() > 0 {
            return true;
        }
        let since = self
            .all_lost_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(self.started);
        since.elapsed() < UNHEALTHY_AFTER
    }

    /// One line for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let c = &self.counters;
        format!(
            "{}/{} links attached; {} written, {} accepted, {} duplicates, {} reconnects",
            self.attached(),
            self.connections,
            c.written.load(Ordering::Relaxed),
            c.accepted.load(Ordering::Relaxed),
            c.duplicates.load(Ordering::Relaxed),
            self.reconnects.load(Ordering::Relaxed),
        )
    }

    /// Copies the atomics into the metrics registry (call before rendering metrics).
    pub fn sync_metrics(&self) {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metrics::counter!("iot_sub_messages_received_total").absolute(get(&c.received));
        metrics::counter!("iot_sub_messages_written_total").absolute(get(&c.written));
        metrics::counter!("iot_sub_messages_accepted_total").absolute(get(&c.accepted));
        metrics::counter!("iot_sub_messages_rejected_total").absolute(get(&c.rejected));
        metrics::counter!("iot_sub_messages_released_total").absolute(get(&c.released));
        metrics::counter!("iot_sub_messages_duplicate_total").absolute(get(&c.duplicates));
        metrics::counter!("iot_sub_messages_filtered_total").absolute(get(&c.filtered));
        metrics::gauge!("iot_sub_connected_links").set(self.attached() as f64);
        metrics::gauge!("iot_sub_in_flight").set(self.in_flight.load(Ordering::Relaxed) as f64);
        metrics::gauge!("iot_sub_up").set(if self.healthy() { 1.0 } else { 0.0 });
        // Read on scrape only: a number that keeps growing over a long run means leaked tasks.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            metrics::gauge!("iot_sub_tokio_alive_tasks")
                .set(runtime.metrics().num_alive_tasks() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_links() {
        let s = Status::new(Arc::new(Counters::default()), 2);
        assert!(!s.ready());
        assert!(s.healthy(), "starting up counts as healthy");
        s.link_attached();
        s.link_attached();
        assert!(s.ready() && s.healthy());
        s.link_lost();
        assert_eq!(s.attached(), 1);
        s.link_lost();
        assert!(s.healthy(), "reconnecting, recently lost");
        *s.all_lost_at.lock().unwrap() =
            Some(Instant::now() - UNHEALTHY_AFTER - Duration::from_secs(1));
        assert!(!s.healthy());
        s.failure("tls");
        assert!(s.summary().contains("0/2 links attached") && s.summary().contains("1 reconnects"));
    }
}
