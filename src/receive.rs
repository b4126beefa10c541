//! The receive loop of one live subscription: deliveries → JSON lines → output → accept.
//!
//! Deliveries that are ready together are written as one batch with one flush, then accepted
//! with one disposition. A batch never exceeds half the credit, because fe2o3 refills credit
//! only after credit/2 settlements. Every delivery is settled on every path, so credit never
//! stalls: written ones are accepted, undecodable ones rejected, ones past `--count` released.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{LinkStateError, RecvError};
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use futures_util::FutureExt;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::message;
use crate::output::Output;
use crate::transport::{self, LinkError, Subscription, SEND_TIMEOUT};

/// Why a subscription stopped without a connection error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Asked to stop (signal).
    Shutdown,
    /// `--count` messages are out and accepted.
    CountReached,
}

/// Why the receive loop ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The connection or link failed: reconnect.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The output failed (closed pipe, full disk): stop the whole run.
    #[error("writing the output failed: {0}")]
    Output(std::io::Error),
}

/// How many messages may still be written (`--count`), shared by all connections.
#[derive(Debug)]
pub struct Budget(AtomicU64);

impl Budget {
    /// At most `n` messages (`u64::MAX`: no limit).
    pub fn new(n: u64) -> Arc<Self> {
        Arc::new(Budget(AtomicU64::new(n)))
    }

    /// Takes up to `want`; returns how many were granted.
    fn take(&self, want: u64) -> u64 {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            let grant = current.min(want);
            match self.0.compare_exchange(
                current,
                current - grant,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return grant,
                Err(now) => current = now,
            }
        }
    }

    /// Nothing left.
    pub fn exhausted(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }
}

/// Counters shared with the supervisor (and later, metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Lines written and flushed.
    pub written: AtomicU64,
    /// Deliveries accepted.
    pub accepted: AtomicU64,
    /// Deliveries rejected as undecodable.
    pub rejected: AtomicU64,
}

/// What the loop needs besides the subscription.
pub struct PumpContext {
    /// Where lines go.
    pub output: Arc<Output>,
    /// Stop taking deliveries when cancelled.
    pub shutdown: CancellationToken,
    /// `--count`.
    pub budget: Arc<Budget>,
    /// Shared counters.
    pub counters: Arc<Counters>,
    /// Largest batch (credit / 2).
    pub max_batch: usize,
    /// How often to send a Flow when nothing else is sent, so the server always hears from us
    /// within its idle-time-out even if it advertises none (then fe2o3 sends no heartbeats).
    pub keepalive: Duration,
}

/// Runs until shutdown, `--count`, or an error.
pub async fn pump(sub: &mut Subscription, ctx: &PumpContext) -> Result<Stop, PumpError> {
    let mut lines: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut to_accept: Vec<DeliveryInfo> = Vec::with_capacity(ctx.max_batch);
    let mut to_release: Vec<DeliveryInfo> = Vec::new();
    let mut keepalive = tokio::time::interval(ctx.keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.reset();

    loop {
        if ctx.budget.exhausted() {
            return Ok(Stop::CountReached);
        }
        let first = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return Ok(Stop::Shutdown),
            r = sub.receiver.recv::<Body<Value>>() => r,
            _ = keepalive.tick() => {
                send(sub.receiver.send_properties(), "keep-alive flow").await?;
                continue;
            }
        };
        let mut taken = 0usize;
        let mut next = Some(first);
        while let Some(received) = next.take() {
            let handled = handle(
                sub,
                received,
                &mut lines,
                &mut to_accept,
                &mut to_release,
                ctx,
                &mut taken,
            )
            .await;
            if let Err(e) = handled {
                // The batch will not be written; give its share of `--count` back.
                ctx.budget
                    .0
                    .fetch_add(to_accept.len() as u64, Ordering::AcqRel);
                return Err(e);
            }
            // Take what is already here without waiting: recv() is cancel-safe.
            if taken < ctx.max_batch {
                next = sub.receiver.recv::<Body<Value>>().now_or_never();
            }
        }

        if !lines.is_empty() {
            // Not raced against shutdown: a batch that started is finished and accepted.
            ctx.output
                .write_batch(&lines)
                .await
                .map_err(PumpError::Output)?;
            ctx.counters
                .written
                .fetch_add(to_accept.len() as u64, Ordering::Relaxed);
            lines.clear();
        }
        if !to_accept.is_empty() {
            let n = to_accept.len() as u64;
            send(sub.receiver.accept_all(to_accept.drain(..)), "accept").await?;
            ctx.counters.accepted.fetch_add(n, Ordering::Relaxed);
            keepalive.reset();
        }
        if !to_release.is_empty() {
            send(sub.receiver.release_all(to_release.drain(..)), "release").await?;
        }
    }
}

/// Decodes one received delivery into `lines`, or rejects it, or sets it aside for release.
async fn handle(
    sub: &mut Subscription,
    received: Result<fe2o3_amqp::link::delivery::Delivery<Body<Value>>, RecvError>,
    lines: &mut Vec<u8>,
    to_accept: &mut Vec<DeliveryInfo>,
    to_release: &mut Vec<DeliveryInfo>,
    ctx: &PumpContext,
    taken: &mut usize,
) -> Result<(), PumpError> {
    *taken += 1;
    let delivery = match received {
        Ok(d) => d,
        Err(RecvError::MessageDecode(e)) => {
            let reason = format!("cannot decode the message: {}", e.source);
            tracing::warn!(%reason, "rejecting a delivery");
            reject(sub, e.info, reason, ctx).await?;
            return Ok(());
        }
        Err(e) => return Err(PumpError::Link(recv_error(sub, e).await)),
    };
    if ctx.budget.take(1) == 0 {
        to_release.push(DeliveryInfo::from(&delivery));
        return Ok(());
    }
    match message::write_line(delivery.message(), lines) {
        Ok(()) => to_accept.push(DeliveryInfo::from(delivery)),
        Err(reason) => {
            // Give the budget back: this message was not written.
            ctx.budget.0.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(%reason, delivery_id = delivery.delivery_id(), "rejecting a delivery");
            reject(sub, DeliveryInfo::from(delivery), reason.to_string(), ctx).await?;
        }
    }
    Ok(())
}

async fn reject(
    sub: &mut Subscription,
    info: DeliveryInfo,
    reason: String,
    ctx: &PumpContext,
) -> Result<(), PumpError> {
    let error = definitions::Error::new(definitions::AmqpError::DecodeError, Some(reason), None);
    send(sub.receiver.reject(info, Some(error)), "reject").await?;
    ctx.counters.rejected.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Bounds a send into fe2o3's engine and classifies its failure.
async fn send<E: std::fmt::Display>(
    fut: impl std::future::Future<Output = Result<(), E>>,
    what: &'static str,
) -> Result<(), PumpError> {
    match timeout(SEND_TIMEOUT, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PumpError::Link(LinkError::Lost(format!(
            "{what} failed: {e}"
        )))),
        Err(_) => Err(PumpError::Link(LinkError::Timeout {
            step: what,
            after: SEND_TIMEOUT,
        })),
    }
}

/// The real cause behind a receive error: the connection's own close reason when there is one.
async fn recv_error(sub: &mut Subscription, e: RecvError) -> LinkError {
    if let Some(cause) = sub.cause().await {
        return cause;
    }
    match e {
        RecvError::LinkStateError(LinkStateError::RemoteClosedWithError(err))
        | RecvError::LinkStateError(LinkStateError::RemoteDetachedWithError(err)) => {
            transport::remote_error("link", &err)
        }
        RecvError::LinkStateError(LinkStateError::RemoteClosed)
        | RecvError::LinkStateError(LinkStateError::RemoteDetached) => {
            LinkError::RemoteClosedCleanly("link")
        }
        RecvError::LinkStateError(LinkStateError::SessionStopped(reason)) => {
            use fe2o3_amqp::link::SessionStopReason as S;
            match reason {
                S::ConnectionStopped(r) => transport::connection_stop(&r),
                S::RemoteEndedWithError(err) => transport::remote_error("session", &err),
                other => LinkError::Lost(format!("session stopped: {other:?}")),
            }
        }
        other => LinkError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grants_at_most_what_is_left() {
        let b = Budget::new(3);
        assert_eq!(b.take(2), 2);
        assert_eq!(b.take(2), 1);
        assert_eq!(b.take(1), 0);
        assert!(b.exhausted());
    }
}
