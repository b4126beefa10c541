//! A local stand-in for Alibaba Cloud IoT Platform's AMQP 1.0 server-side subscription endpoint:
//! the public API (`Emulator`, its config and fault injection) and the TCP accept loop.
//!
//! What it does, over real TLS sockets (see `aliyun-huawei.md` §2–§6 and §15):
//! TLS straight away (no AMQP TLS header), SASL PLAIN with Aliyun's signed username, the
//! client's Open idle-time-out checked (9601) and enforced, a receiver link required within
//! the attach deadline, one receiver per connection, a per-group connection limit (9600), and
//! one shared backlog with at-least-once delivery: accepted messages are done, anything else is
//! redelivered (after `redelivery_delay`, or at once when a connection is lost).
//!
//! Files: `cert.rs` (TLS identity), `sasl.rs` (login check), `tap.rs` (Open decode, idle
//! watch, socket abort), `conn.rs` (one connection's life), `link.rs` (sessions, sender pump,
//! settlement), `backlog.rs` (queue and accounting), `devices.rs` (simulated traffic),
//! `standalone.rs` (`iot-sub emulate`).

mod backlog;
mod cert;
mod conn;
pub mod devices;
mod link;
mod sasl;
mod standalone;
mod tap;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::backlog::Backlog;
use self::sasl::Authenticator;
use crate::secret::Secret;

pub use self::standalone::{run_standalone, StandaloneOptions};

/// TCP connections still in TLS/SASL/Open at once; more are dropped at accept.
const MAX_HANDSHAKING: usize = 1024;
/// How long `shutdown` waits for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the emulator behaves. `Default` is Aliyun's documented behaviour on 127.0.0.1:5671.
/// `Debug` is safe to log: secrets print as `***`.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Listen address; tests use `127.0.0.1:0`.
    pub bind: SocketAddr,
    /// The server certificate's DNS name (SAN); `127.0.0.1` and `::1` are always added, so a
    /// client connecting by another name (e.g. `localhost`) meets a certificate not naming it.
    pub tls_hostname: String,
    /// The server certificate's validity window (not before, not after); `None`: rcgen's
    /// default, 1975 to 4096. A window in the past makes an expired certificate.
    pub tls_validity: Option<(SystemTime, SystemTime)>,
    /// Accepted (AccessKey id, AccessKey secret) pairs for `authMode=aksign`.
    pub access_keys: Vec<(String, Secret)>,
    /// Accepted STS credentials for `authMode=ststoken`.
    pub sts_tokens: Vec<StsToken>,
    /// If `Some`, a login naming another consumer group is refused.
    pub consumer_group_id: Option<String>,
    /// The wire form of a refused login.
    pub auth_failure: AuthFailure,
    /// `None`: any timestamp is accepted (Aliyun documents no window).
    pub max_clock_skew: Option<Duration>,
    /// A receiver link must be attached within this after TCP accept (Aliyun: 15 s).
    pub attach_deadline: Duration,
    /// An unsettled delivery counts as timed out after this (Aliyun: 30 s, log 9650).
    pub ack_timeout: Duration,
    /// Rejected, released, modified and timed-out deliveries come back after this (Aliyun: ~1 min).
    pub redelivery_delay: Duration,
    /// The emulator's own Open idle-time-out; `None` = not advertised. When set, fe2o3 also
    /// drops a client that sends nothing for that long, and clients heartbeat at that period.
    pub advertised_idle_timeout: Option<Duration>,
    /// Live connections per consumer group; more are refused like Aliyun code 9600.
    pub max_connections: usize,
    /// Send `messageId` as an AMQP long (and `properties.message-id` as ulong).
    pub message_id_as_long: bool,
    /// The emulator's own max-frame-size.
    pub max_frame_size: u32,
    /// If set, the messageId of every accepted message is appended to this file, one per
    /// line, the moment the accept is applied (it survives the emulator being killed).
    pub accept_journal: Option<PathBuf>,
    /// If set, the TLS identity is kept in this file (created 0600 on first start, reused
    /// after), so a restarted emulator presents a CA its clients already trust.
    pub keep_identity: Option<PathBuf>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 5671)),
            tls_hostname: "localhost".to_string(),
            tls_validity: None,
            access_keys: Vec::new(),
            sts_tokens: Vec::new(),
            consumer_group_id: None,
            auth_failure: AuthFailure::SaslOutcome,
            max_clock_skew: None,
            attach_deadline: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(30),
            redelivery_delay: Duration::from_secs(60),
            advertised_idle_timeout: None,
            max_connections: 64,
            message_id_as_long: false,
            max_frame_size: 65_536,
            accept_journal: None,
            keep_identity: None,
        }
    }
}

/// STS temporary credentials accepted for `authMode=ststoken`.
#[derive(Clone, Debug)]
pub struct StsToken {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    pub token: Secret,
    /// After this, logins with the token are refused. Live connections are not cut.
    pub expires_at: Option<SystemTime>,
}

/// How a bad login is refused (Aliyun's behaviour is undocumented, so both are offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// SASL outcome `code=auth(1)`.
    SaslOutcome,
    /// SASL ok, then the connection is closed right after Open with `amqp:unauthorized-access`.
    CloseUnauthorized,
}

/// One device message as the cloud pushes it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceMessage {
    /// Application property `topic`.
    pub topic: String,
    /// Application property `messageId` and `properties.message-id`. Decimal digits when
    /// `message_id_as_long` (anything else is still sent as a string).
    pub message_id: String,
    /// Application property `generateTime`, ms since the epoch.
    pub generate_time: i64,
    /// The body, sent as one Data section.
    pub body: Vec<u8>,
    /// More application properties (e.g. `qos`).
    pub extra_properties: Vec<(String, ExtraValue)>,
}

/// The value of an extra application property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtraValue {
    String(String),
    Long(i64),
    Int(i32),
    Bool(bool),
    Binary(Vec<u8>),
}

/// Fault injection on live connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Close with `amqp:connection:forced`, description
    /// `9602: cloud actively closed the connection (emulated)` (Aliyun log 9602).
    ServerClose,
    /// Drop the socket with a TCP RST and no Close frame.
    TcpReset,
    /// Close with this AMQP error condition (e.g. `amqp:internal-error`, or any symbol) and
    /// description, sent as given: Aliyun documents its log codes but not its wire strings.
    Close {
        condition: String,
        description: String,
    },
}

/// A snapshot of the emulator's counters.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// TCP connections accepted (before TLS).
    pub connections_accepted: u64,
    /// TLS handshakes completed (SASL can only start after one).
    pub tls_established: u64,
    /// Logins refused (in either `AuthFailure` form).
    pub logins_failed: u64,
    /// Connections past login, Open checks and admission, now open.
    pub live_connections: usize,
    /// Transfers sent (duplicates and redeliveries included).
    pub transfers_sent: u64,
    /// Messages accepted (each message once).
    pub accepted: u64,
    /// Rejected outcomes (and messages too big for the link).
    pub rejected: u64,
    /// Released and modified outcomes.
    pub released: u64,
    /// Deliveries without an outcome within `ack_timeout`.
    pub timed_out: u64,
    /// Messages waiting: ready plus scheduled redeliveries.
    pub backlog: usize,
    /// Deliveries sent (or being sent) and not yet settled.
    pub in_flight: usize,
    /// Connections closed because the client sent nothing for its idle-time-out.
    pub closed_idle: u64,
    /// Connections closed because no receiver was attached in time.
    pub closed_attach_deadline: u64,
    /// Connections closed because the STS token they logged in with expired.
    pub closed_token_expired: u64,
    /// Links refused (a second receiver, or any sender).
    pub refused_links: u64,
    /// Disposition frames received from clients (one may settle many deliveries).
    pub dispositions_received: u64,
}

/// Counters updated from connection tasks.
#[derive(Default)]
struct Counters {
    connections_accepted: AtomicU64,
    tls_established: AtomicU64,
    logins_failed: Arc<AtomicU64>,
    dispositions: Arc<AtomicU64>,
    closed_idle: AtomicU64,
    closed_attach_deadline: AtomicU64,
    closed_token_expired: AtomicU64,
    refused_links: Arc<AtomicU64>,
}

/// Connections that can receive fault injection, and admitted connections per group.
#[derive(Default)]
struct Registry {
    controls: HashMap<u64, mpsc::Sender<Drop>>,
    per_group: HashMap<String, usize>,
    live: usize,
}

/// Everything the accept loop and the connection tasks share.
struct Shared {
    config: EmulatorConfig,
    auth: Arc<Authenticator>,
    backlog: Arc<Backlog>,
    counters: Counters,
    registry: Mutex<Registry>,
    last_open_idle: Arc<Mutex<Option<u32>>>,
    next_conn_id: AtomicU64,
    shutdown: CancellationToken,
    tls: tokio_rustls::TlsAcceptor,
    #[cfg(test)]
    idle_override: Mutex<Option<Duration>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running emulator. Dropping it or calling [`Emulator::shutdown`] stops it.
pub struct Emulator {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    ca_pem: String,
    tracker: TaskTracker,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Binds, generates a CA and server certificate, and spawns the accept loop.
    pub async fn start(config: EmulatorConfig) -> anyhow::Result<Emulator> {
        let identity = match &config.keep_identity {
            Some(path) => cert::load_or_generate(&config.tls_hostname, config.tls_validity, path)?,
            None => cert::generate(&config.tls_hostname, config.tls_validity)?,
        };
        let journal = match &config.accept_journal {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the accept journal {}", path.display()))?,
            ),
            None => None,
        };
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding the emulator to {}", config.bind))?;
        let local_addr = listener.local_addr()?;
        let auth = Arc::new(Authenticator {
            access_keys: config.access_keys.clone(),
            sts_tokens: config.sts_tokens.clone(),
            consumer_group_id: config.consumer_group_id.clone(),
            max_clock_skew: config.max_clock_skew,
        });
        let shared = Arc::new(Shared {
            backlog: Arc::new(Backlog::new(config.redelivery_delay, journal)),
            config,
            auth,
            counters: Counters::default(),
            registry: Mutex::new(Registry::default()),
            last_open_idle: Arc::new(Mutex::new(None)),
            next_conn_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tls: tokio_rustls::TlsAcceptor::from(identity.server_config),
            #[cfg(test)]
            idle_override: Mutex::new(None),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, shared.clone(), tracker.clone()));
        tracing::info!(addr = %local_addr, "emulator listening (AMQP 1.0 over TLS)");
        Ok(Emulator {
            shared,
            local_addr,
            ca_pem: identity.ca_pem,
            tracker,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// PEM of the generated CA; clients add it as a trust root.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate (no key) as PEM.
    pub fn write_ca(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.ca_pem.as_bytes())
    }

    /// Enqueues a message into the consumer group's backlog. Never blocks and never drops, so
    /// the backlog is unbounded through this call: it is a test/demo API. Continuous producers
    /// use [`Emulator::publish_wait`].
    pub fn publish(&self, msg: DeviceMessage) {
        self.shared.backlog.publish(msg);
    }

    /// Enqueues a message, first waiting while the backlog holds 100 000 messages or more.
    pub async fn publish_wait(&self, msg: DeviceMessage) {
        self.shared.backlog.publish_wait(msg).await;
    }

    /// Fault injection: enqueues a delivery whose message is given byte for byte, for
    /// malformed input no typed message can express (invalid UTF-8 in a string, a list where
    /// only simple values are allowed, an encoding cut short). `sections` are encoded AMQP
    /// message sections (e.g. application-properties, then data); they go on the wire as they
    /// are, after one empty amqp-value section (`00 53 77 40`) that fe2o3's sender always
    /// writes first. fe2o3's receiver reads sections in any order and a later body section
    /// replaces the earlier one, so it sees the given sections as if they came alone.
    /// `message_id` only labels the delivery in [`Emulator::stats`] and
    /// [`Emulator::accepted_ids`]; nothing of it is sent.
    pub fn publish_encoded(&self, message_id: impl Into<String>, sections: Vec<u8>) {
        self.shared
            .backlog
            .publish_encoded(message_id.into(), sections.into());
    }

    /// Fault injection on every current connection.
    pub fn drop_connections(&self, how: Drop) {
        let reg = self.shared.registry();
        for ctl in reg.controls.values() {
            // A full channel means a drop is already pending for that connection.
            let _ = ctl.try_send(how.clone());
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let b = self.shared.backlog.counters();
        let live = self.shared.registry().live;
        Stats {
            connections_accepted: c.connections_accepted.load(Ordering::Relaxed),
            tls_established: c.tls_established.load(Ordering::Relaxed),
            logins_failed: c.logins_failed.load(Ordering::Relaxed),
            live_connections: live,
            transfers_sent: b.transfers_sent,
            accepted: b.accepted,
            rejected: b.rejected,
            released: b.released,
            timed_out: b.timed_out,
            backlog: b.backlog,
            in_flight: b.in_flight,
            closed_idle: c.closed_idle.load(Ordering::Relaxed),
            closed_attach_deadline: c.closed_attach_deadline.load(Ordering::Relaxed),
            closed_token_expired: c.closed_token_expired.load(Ordering::Relaxed),
            refused_links: c.refused_links.load(Ordering::Relaxed),
            dispositions_received: c.dispositions.load(Ordering::Relaxed),
        }
    }

    /// Message ids accepted, in acceptance order. An accepted message is never redelivered,
    /// so each published message appears once. Keeps the last 1 048 576.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.shared.backlog.accepted_ids()
    }

    /// messageId -> transfers sent for it (for the last 1 048 576 distinct ids).
    pub fn delivery_counts(&self) -> HashMap<String, u32> {
        self.shared.backlog.delivery_counts()
    }

    /// Waits until `n` messages in total have been accepted; false on timeout.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        self.shared.backlog.wait_accepted(n, timeout).await
    }

    /// Fault injection: send each message twice (both unsettled) with probability `p`.
    pub fn set_duplicate_probability(&self, p: f64) {
        self.shared.backlog.set_duplicate_probability(p);
    }

    /// Fault injection: take the next message at random among the first 8 of the backlog.
    pub fn set_reorder(&self, on: bool) {
        self.shared.backlog.set_reorder(on);
    }

    /// The idle-time-out the most recent client put in its Open, decoded off the wire
    /// (`None` before any Open, or if that Open carried none). It is recorded the moment the
    /// Open's bytes are read. Both peers send Open without waiting, so a client's `open()` can
    /// return a moment before that; once any later reply has arrived (e.g. `Session::begin`
    /// returned, or the connection was closed by the emulator) the value is current.
    pub fn last_open_idle_timeout_ms(&self) -> Option<u32> {
        *self
            .shared
            .last_open_idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting, closes every connection (`amqp:connection:forced`), and waits up to
    /// 5 s for them to finish.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("emulator connections still closing after the shutdown grace period");
        }
    }

    /// Test hook: enforce this idle limit instead of the client's (which is ≥ 30 s).
    #[cfg(test)]
    pub(crate) fn set_idle_override(&self, limit: Option<Duration>) {
        *self
            .shared
            .idle_override
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = limit;
    }

    #[cfg(test)]
    pub(crate) fn pending_ids(&self) -> Vec<String> {
        self.shared.backlog.pending_ids()
    }
}

impl std::ops::Drop for Emulator {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKING));
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared
            .counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections in handshake; dropped");
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        tracker.spawn(conn::serve(shared.clone(), tcp, peer, id, permit));
    }
    tracing::debug!("emulator accept loop stopped");
}
