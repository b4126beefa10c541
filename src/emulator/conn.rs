//! One client connection from TCP accept to teardown: TLS, SASL and Open, the post-Open checks
//! (login verdict, idle-time-out range 9601, group limit 9600), the attach deadline, the idle
//! watchdog, fault injection, and returning unsettled messages to the backlog at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{ConnectionAcceptor, ListenerConnectionHandle, SessionAcceptor};
use fe2o3_amqp::connection::OpenError;
use fe2o3_amqp::types::definitions::{self, AmqpError, ConnectionError, ErrorCondition};
use fe2o3_amqp::Sender;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::link::{self, SETTLE_QUEUE};
use super::sasl::{EmulatorSasl, Verdict};
use super::tap::{Tap, TapState};
use super::{Drop, Shared};

/// Aliyun's documented idle-time-out range for the client's Open, in ms (inclusive).
pub(crate) const IDLE_RANGE_MS: std::ops::RangeInclusive<u32> = 30_000..=300_000;
/// How long a polite close waits for the client's Close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// An idle client is presumed gone: send Close and do not wait for its answer.
const IDLE_CLOSE_WAIT: Duration = Duration::from_millis(200);
/// Bound on session accept and on task joins at teardown.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the connection is ending.
enum End {
    Close {
        condition: ErrorCondition,
        description: String,
        wait: Duration,
    },
    Reset,
    ClientGone,
}

/// Removes the connection from fault injection when the task ends.
struct ControlGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl std::ops::Drop for ControlGuard {
    fn drop(&mut self) {
        self.shared.registry().controls.remove(&self.id);
    }
}

/// One admitted connection counted against its consumer group.
struct Admission {
    shared: Arc<Shared>,
    group: String,
}

impl std::ops::Drop for Admission {
    fn drop(&mut self) {
        let mut reg = self.shared.registry();
        reg.live = reg.live.saturating_sub(1);
        if let Some(n) = reg.per_group.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                reg.per_group.remove(&self.group);
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, group: &str) -> Result<Admission, usize> {
    let mut reg = shared.registry();
    let n = reg.per_group.get(group).copied().unwrap_or(0);
    if n >= shared.config.max_connections {
        return Err(n);
    }
    *reg.per_group.entry(group.to_string()).or_insert(0) += 1;
    reg.live += 1;
    Ok(Admission {
        shared: shared.clone(),
        group: group.to_string(),
    })
}

/// "15 s" for whole seconds, else "300 ms".
pub(crate) fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn ms_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Serves one TCP connection until it ends. Never panics on network results.
pub(super) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    handshake_permit: OwnedSemaphorePermit,
) {
    let cfg = &shared.config;
    let deadline = Instant::now() + cfg.attach_deadline;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Drop>(1);
    shared.registry().controls.insert(id, ctl_tx);
    let _control = ControlGuard {
        shared: shared.clone(),
        id,
    };
    tracing::info!(conn = id, %peer, "TCP connection accepted");

    // TLS straight away, as Aliyun does: no AMQP TLS protocol header first. A plain AMQP
    // client fails here (its header is not a ClientHello) and never reaches AMQP.
    let tls = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        _ = ctl_rx.recv() => {
            tracing::info!(conn = id, %peer, "dropped during TLS handshake (fault injection)");
            return;
        }
        r = tokio::time::timeout_at(deadline, shared.tls.accept(tcp)) => match r {
            Ok(Ok(s)) => {
                shared.counters.tls_established.fetch_add(1, Ordering::Relaxed);
                s
            }
            Ok(Err(e)) => {
                tracing::warn!(conn = id, %peer, error = %e, "TLS handshake failed (plain TCP is not served)");
                return;
            }
            Err(_) => {
                tracing::warn!(conn = id, %peer, "TLS handshake not finished within the attach deadline");
                return;
            }
        },
    };

    let (tap, tap_state) = Tap::new(
        tls,
        shared.last_open_idle.clone(),
        shared.counters.dispositions.clone(),
    );
    let (sasl, verdict_slot) = EmulatorSasl::new(
        shared.auth.clone(),
        cfg.auth_failure,
        shared.counters.logins_failed.clone(),
        peer,
    );
    let mut builder = ConnectionAcceptor::builder()
        .container_id("iot-sub-emulator")
        .max_frame_size(cfg.max_frame_size)
        .sasl_acceptor(sasl);
    if let Some(t) = cfg.advertised_idle_timeout {
        builder = builder.idle_time_out(ms_u32(t));
    }
    let acceptor = builder.build();

    let mut conn = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        _ = ctl_rx.recv() => {
            tracing::info!(conn = id, %peer, "dropped during SASL/Open (fault injection)");
            return;
        }
        r = tokio::time::timeout_at(deadline, acceptor.accept(tap)) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(OpenError::SaslError { code, .. })) => {
                tracing::info!(conn = id, %peer, ?code, "connection refused at SASL");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(conn = id, %peer, error = %e, "AMQP handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(conn = id, %peer, "SASL/Open not finished within the attach deadline");
                return;
            }
        },
    };
    drop(handshake_permit);

    // The client's Open, read back from the tap (fe2o3 does not expose it).
    let open = tap_state.take_open();
    let client_idle_ms = match &open {
        Ok(o) => o.idle_time_out,
        Err(e) => {
            tracing::warn!(conn = id, %peer, error = %e, "could not decode the client's Open");
            None
        }
    };
    let container_id = open
        .as_ref()
        .map(|o| o.container_id.clone())
        .unwrap_or_default();

    let verdict = verdict_slot
        .lock()
        .map(|mut v| v.take())
        .unwrap_or_else(|p| p.into_inner().take());
    let login = match verdict {
        Some(Verdict::Ok(login)) => login,
        refused => {
            let reason = match refused {
                Some(Verdict::Refused(r)) => r.reason,
                _ => "no SASL login".to_string(),
            };
            // Only reached with AuthFailure::CloseUnauthorized; the reason was logged by SASL.
            let description = format!("authentication failed: {reason}");
            close_with(
                &mut conn,
                &tap_state,
                AmqpError::UnauthorizedAccess.into(),
                description,
                CLOSE_WAIT,
            )
            .await;
            tracing::info!(conn = id, %peer, "connection closed after Open: unauthorized");
            return;
        }
    };

    let idle = match (client_idle_ms, &open) {
        (Some(v), _) if IDLE_RANGE_MS.contains(&v) => Duration::from_millis(u64::from(v)),
        (v, open) => {
            let description = match (v, open) {
                (Some(v), _) => format!("9601: idle-time-out {v} outside 30000..300000 ms"),
                (None, Ok(_)) => {
                    "9601: idle-time-out missing (must be 30000..300000 ms)".to_string()
                }
                (None, Err(e)) => format!("9601: idle-time-out unreadable ({e})"),
            };
            tracing::warn!(conn = id, %peer, client_id = %login.client_id, reason = %description, "connection refused");
            close_with(
                &mut conn,
                &tap_state,
                ConnectionError::ConnectionForced.into(),
                description,
                CLOSE_WAIT,
            )
            .await;
            return;
        }
    };

    let _admission = match admit(&shared, &login.consumer_group_id) {
        Ok(a) => a,
        Err(n) => {
            let description = format!(
                "9600: too many connections in consumer group {} ({n}, max {})",
                login.consumer_group_id, cfg.max_connections
            );
            tracing::warn!(conn = id, %peer, client_id = %login.client_id, reason = %description, "connection refused");
            close_with(
                &mut conn,
                &tap_state,
                AmqpError::ResourceLimitExceeded.into(),
                description,
                CLOSE_WAIT,
            )
            .await;
            return;
        }
    };
    tracing::info!(
        conn = id,
        %peer,
        client_id = %login.client_id,
        container_id = %container_id,
        group = %login.consumer_group_id,
        auth_mode = %login.auth_mode,
        sign_method = %login.sign_method,
        idle_time_out_ms = idle.as_millis() as u64,
        "login ok, connection open"
    );

    #[cfg(test)]
    let idle = shared
        .idle_override
        .lock()
        .map(|o| o.unwrap_or(idle))
        .unwrap_or(idle);

    let (end, link_cancel, tasks) = run_open_connection(
        &shared,
        &mut conn,
        &tap_state,
        &mut ctl_rx,
        id,
        peer,
        deadline,
        idle,
        login.expires_at,
    )
    .await;

    // Close first (so the client sees the connection error, not a link detach), then stop
    // the link tasks, then return whatever is still unsettled to the backlog.
    match end {
        End::Close {
            condition,
            description,
            wait,
        } => {
            tracing::info!(conn = id, %peer, %description, "closing the connection");
            close_with(&mut conn, &tap_state, condition, description, wait).await;
        }
        End::Reset => {
            tracing::info!(conn = id, %peer, "resetting TCP (fault injection)");
            tap_state.kill(true);
        }
        End::ClientGone => {
            let why = tokio::time::timeout(JOIN_TIMEOUT, conn.on_close()).await;
            match why {
                Ok(Ok(())) => tracing::info!(conn = id, %peer, "connection closed by the client"),
                Ok(Err(fe2o3_amqp::connection::Error::TransportError(
                    fe2o3_amqp::transport::Error::IdleTimeoutElapsed,
                ))) => {
                    // fe2o3 enforces the emulator's own advertised idle-time-out (no Close sent).
                    shared.counters.closed_idle.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(conn = id, %peer, "client silent past the advertised idle-time-out; dropped");
                }
                Ok(Err(e)) => tracing::info!(conn = id, %peer, reason = %e, "connection ended"),
                Err(_) => tracing::info!(conn = id, %peer, "connection ended"),
            }
            tap_state.kill(false);
        }
    }
    link_cancel.cancel();
    tasks.join().await;
    shared.backlog.requeue_connection(id);
    drop(conn);
    tracing::debug!(conn = id, %peer, "connection torn down");
}

/// The link-level tasks of one connection, joined at teardown with a bound.
#[derive(Default)]
struct Tasks {
    sessions: Vec<JoinHandle<()>>,
    pumps: Vec<JoinHandle<link::PumpEnd>>,
    settles: Vec<JoinHandle<()>>,
}

impl Tasks {
    fn prune(&mut self) {
        self.sessions.retain(|h| !h.is_finished());
        self.pumps.retain(|h| !h.is_finished());
        self.settles.retain(|h| !h.is_finished());
    }

    async fn join(self) {
        // Pumps first: dropping their `Sender`s lets the outcome futures resolve.
        for h in self.pumps {
            join_bounded(h).await;
        }
        for h in self.sessions {
            join_bounded(h).await;
        }
        for h in self.settles {
            join_bounded(h).await;
        }
    }
}

async fn join_bounded<T>(mut h: JoinHandle<T>) {
    if tokio::time::timeout(JOIN_TIMEOUT, &mut h).await.is_err() {
        h.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_open_connection(
    shared: &Arc<Shared>,
    conn: &mut ListenerConnectionHandle,
    tap: &TapState,
    ctl_rx: &mut mpsc::Receiver<Drop>,
    id: u64,
    peer: SocketAddr,
    deadline: Instant,
    idle: Duration,
    token_expires: Option<std::time::SystemTime>,
) -> (End, CancellationToken, Tasks) {
    let cfg = &shared.config;
    let link_cancel = CancellationToken::new();
    let mut tasks = Tasks::default();
    let receiver_slot = Arc::new(AtomicBool::new(false));
    let (sender_tx, mut sender_rx) = mpsc::channel::<Sender>(1);
    let mut attached = false;
    let attach_timer = tokio::time::sleep_until(deadline);
    tokio::pin!(attach_timer);
    // A connection lives no longer than the STS token it logged in with.
    let expiry = token_expires.map(|at| {
        Instant::now()
            + at.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
    });
    let expiry_timer = tokio::time::sleep_until(expiry.unwrap_or(deadline));
    tokio::pin!(expiry_timer);
    let period = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(period);
    watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let end = loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break End::Close {
                condition: ConnectionError::ConnectionForced.into(),
                description: "emulator shutting down".into(),
                wait: CLOSE_WAIT,
            },
            Some(how) = ctl_rx.recv() => match how {
                Drop::ServerClose => break End::Close {
                    condition: ConnectionError::ConnectionForced.into(),
                    description: "9602: cloud actively closed the connection (emulated)".into(),
                    wait: CLOSE_WAIT,
                },
                Drop::TcpReset => break End::Reset,
                Drop::Close { condition, description } => break End::Close {
                    condition: ErrorCondition::Custom(condition.into()),
                    description,
                    wait: CLOSE_WAIT,
                },
            },
            _ = &mut attach_timer, if !attached => {
                shared.counters.closed_attach_deadline.fetch_add(1, Ordering::Relaxed);
                break End::Close {
                    condition: ConnectionError::ConnectionForced.into(),
                    description: format!("receiver link not attached within {}", human(cfg.attach_deadline)),
                    wait: CLOSE_WAIT,
                };
            }
            _ = &mut expiry_timer, if expiry.is_some() => {
                shared.counters.closed_token_expired.fetch_add(1, Ordering::Relaxed);
                break End::Close {
                    condition: definitions::AmqpError::UnauthorizedAccess.into(),
                    description: "security token expired".into(),
                    wait: CLOSE_WAIT,
                };
            }
            _ = watchdog.tick() => {
                let silent = tap.idle_for();
                if silent >= idle {
                    shared.counters.closed_idle.fetch_add(1, Ordering::Relaxed);
                    break End::Close {
                        condition: ConnectionError::ConnectionForced.into(),
                        description: format!(
                            "idle-time-out: no frame from the client for {} (limit {})",
                            human(Duration::from_millis(silent.as_millis() as u64)),
                            human(idle)
                        ),
                        wait: IDLE_CLOSE_WAIT,
                    };
                }
            }
            Some(sender) = sender_rx.recv() => {
                attached = true;
                tasks.prune();
                let (settle_tx, settle_rx) = mpsc::channel(SETTLE_QUEUE);
                tasks.settles.push(tokio::spawn(link::settle_loop(
                    settle_rx,
                    shared.backlog.clone(),
                    cfg.ack_timeout,
                )));
                let backlog = shared.backlog.clone();
                let cancel = link_cancel.clone();
                let slot = receiver_slot.clone();
                let as_long = cfg.message_id_as_long;
                tasks.pumps.push(tokio::spawn(async move {
                    let end = link::pump(sender, backlog, id, as_long, settle_tx, cancel).await;
                    if let link::PumpEnd::LinkGone(why) = &end {
                        // The client detached its receiver (or the connection went): a new
                        // receiver may attach.
                        tracing::debug!(conn = id, %peer, reason = %why, "receiver link gone");
                        slot.store(false, Ordering::SeqCst);
                    }
                    end
                }));
            }
            incoming = conn.next_incoming_session() => match incoming {
                Some(incoming) => {
                    let accepted = tokio::time::timeout(
                        STEP_TIMEOUT,
                        SessionAcceptor::new().accept_incoming_session(incoming, conn),
                    ).await;
                    match accepted {
                        Ok(Ok(session)) => {
                            tasks.prune();
                            tasks.sessions.push(tokio::spawn(link::serve_session(
                                session,
                                receiver_slot.clone(),
                                sender_tx.clone(),
                                shared.counters.refused_links.clone(),
                                link_cancel.clone(),
                                peer,
                            )));
                        }
                        Ok(Err(e)) => tracing::warn!(conn = id, %peer, error = %e, "session begin failed"),
                        Err(_) => tracing::warn!(conn = id, %peer, "session begin timed out"),
                    }
                }
                None => break End::ClientGone,
            },
        }
    };
    (end, link_cancel, tasks)
}

async fn close_with(
    conn: &mut ListenerConnectionHandle,
    tap: &TapState,
    condition: ErrorCondition,
    description: String,
    wait: Duration,
) {
    let error = definitions::Error::new(condition, Some(description), None);
    // Waits for the client's Close at most `wait`; then the socket goes regardless.
    let _ = tokio::time::timeout(wait, conn.close_with_error(error)).await;
    tap.kill(false);
}
