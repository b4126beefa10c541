//! The receive loop of one live subscription: deliveries → decode → topic filter → render →
//! the sink; and the sink's accepts and releases back onto the link.
//!
//! Deliveries that are ready together go to the sink as one batch, never more than half the
//! credit (so that settling one batch lets the next arrive meanwhile). Every delivery is settled on
//! every path, so credit never stalls: filtered-out ones are accepted here, undecodable ones
//! rejected here, the rest accepted or released when the sink says so.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::dedup::Keyer;
use crate::format::Format;
use crate::message::{BodyMode, Mapping};
use crate::sink::exec_each::ExecFields;
use crate::sink::{Acks, Batch, Counters, DeliveryId, Item};
use crate::status::Status;
use crate::stop::Stopper;
use crate::topic::TopicFilters;
use crate::transport::engine::Delivery;
use crate::transport::{LinkError, Subscription};

/// After a stop, how long a connection waits for the sink's accepts before it closes.
pub const ACK_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How messages are turned into output; shared by every connection.
#[derive(Debug)]
pub struct Render {
    /// How deliveries map onto the schema (per profile kind).
    pub mapping: Mapping,
    /// `--format`.
    pub format: Format,
    /// `--body`.
    pub body: BodyMode,
    /// `--topic`, `--exclude-topic`.
    pub filters: TopicFilters,
    /// Dedup keys.
    pub keyer: Keyer,
    /// `--exec-each`: hand over the raw body and the metadata instead of a rendered line.
    pub exec_each: bool,
}

/// What the loop needs besides the subscription.
#[derive(Clone)]
pub struct PumpContext {
    /// The sink's intake.
    pub sink: mpsc::Sender<Batch>,
    /// Stop taking deliveries when it says so.
    pub stopper: Arc<Stopper>,
    /// Shared counters.
    pub counters: Arc<Counters>,
    /// Health and metrics.
    pub status: Arc<Status>,
    /// This connection's link credit gauge (labelled with its client id).
    pub credit_gauge: metrics::Gauge,
    /// Format, filters, keys.
    pub render: Arc<Render>,
    /// Largest batch (credit / 2).
    pub max_batch: usize,
    /// The link credit: at most this many deliveries are with the sink, unsettled, at once.
    pub credit: usize,
}

/// Accepts are collected and sent this often (and at once when this many are waiting, or
/// when nothing more can be received without them), so that a connection receiving one
/// message at a time sends one disposition for several of them, and is not woken for every
/// write of the sink.
pub const ACK_DELAY: Duration = Duration::from_millis(50);
/// ... and sent at once when this many are waiting.
const ACK_BATCH: usize = 64;

/// Runs until `stop` (the run's stop, or this connection's retirement) says so (`Ok`), or
/// the connection fails (`Err`: reconnect).
pub async fn pump(
    sub: &mut Subscription,
    ctx: &PumpContext,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), LinkError> {
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Acks>();
    let mut acks = AckState {
        rx: ack_rx,
        outstanding: 0,
        pending: Pending::default(),
        timer: Box::pin(tokio::time::sleep(ACK_DELAY)),
        armed: false,
    };
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    // The last batch's size, to allocate the next one once.
    let mut last_batch = (1024usize, 4usize);

    'receiving: loop {
        let blocked = acks.blocked(sub, ctx);
        let first = tokio::select! {
            biased;
            _ = &mut cancelled => break 'receiving,
            // Nothing more can arrive until something is settled: take the sink's accepts as
            // they come back, not on the timer.
            Some(more) = acks.rx.recv(), if blocked => {
                acks.on_returned(more, sub, ctx).await?;
                continue;
            }
            _ = &mut acks.timer, if acks.armed => {
                acks.on_timer(sub, ctx).await?;
                continue;
            }
            // Polled even when blocked: it also sends the heartbeat when due and notices a
            // closing or silent server. (The credit keeps what can arrive within bounds.)
            r = sub.recv() => r?,
        };

        let mut batch = Batch {
            bytes: Vec::with_capacity(last_batch.0.next_power_of_two()),
            items: Vec::with_capacity(last_batch.1),
            acks: ack_tx.clone(),
        };
        let mut taken = 0usize;
        let mut next = Some(first);
        while let Some(delivery) = next.take() {
            taken += 1;
            if let Some((id, reason)) = take(delivery, &mut batch, &mut acks.pending, ctx) {
                sub.reject(id, reason);
                ctx.counters.rejected.fetch_add(1, Ordering::Relaxed);
            }
            // Take what is already read, without waiting.
            if taken < ctx.max_batch && taken < acks.room(ctx.credit) {
                next = sub.try_recv()?;
            }
        }
        // Awake anyway: take the accepts that are already back, without waiting for them.
        acks.collect();
        if acks.pending.must_send(acks.outstanding, ctx.credit) || sub.credit() == 0 {
            acks.send(sub, ctx);
        }
        // Rejections, settlements and the credit they free go out now.
        sub.flush().await?;
        ctx.counters
            .received
            .fetch_add(taken as u64, Ordering::Relaxed);
        ctx.credit_gauge.set(f64::from(sub.credit()));
        if batch.items.is_empty() {
            // Filtered-out deliveries are accepted here, on the same delay.
            acks.arm_if_waiting();
            continue;
        }
        last_batch = (batch.bytes.len().max(512), batch.items.len());

        // Hand the batch over; while the sink is busy (a slow output), keep settling.
        let n = batch.items.len();
        let mut batch = Some(batch);
        while let Some(b) = batch.take() {
            let blocked = acks.blocked(sub, ctx);
            tokio::select! {
                biased;
                permit = ctx.sink.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(b);
                        acks.outstanding += n;
                        ctx.status.in_flight_add(n as i64);
                    }
                    // The sink is gone: the run is ending; the cloud redelivers.
                    Err(_) => break 'receiving,
                },
                Some(more) = acks.rx.recv(), if blocked => {
                    acks.on_returned(more, sub, ctx).await?;
                    batch = Some(b);
                }
                _ = &mut acks.timer, if acks.armed => {
                    acks.on_timer(sub, ctx).await?;
                    batch = Some(b);
                }
                // Stopping: this batch was not handed over and is not accepted.
                _ = &mut cancelled => break 'receiving,
                // However long the output is stalled, the connection keeps sending its
                // heartbeat and hears a close (what it reads waits in its buffer).
                e = sub.keep_alive() => return Err(e),
            }
        }
        acks.arm_if_waiting();
    }

    // Stopped: wait (bounded) for the accepts of what the sink already has.
    let deadline = tokio::time::Instant::now() + ACK_DRAIN_TIMEOUT;
    while acks.outstanding > 0 {
        tokio::select! {
            Some(more) = acks.rx.recv() => acks.on_returned(more, sub, ctx).await?,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(outstanding = acks.outstanding, "stopping without the accepts of some messages; they will be redelivered");
                ctx.status.in_flight_add(-(acks.outstanding as i64));
                break;
            }
        }
    }
    acks.collect();
    acks.send(sub, ctx);
    sub.flush().await
}

/// One connection's side of the accepts: what the sink has, what came back, and when to send.
struct AckState {
    /// The sink's decisions. Read on the timer (or when starved), not as they come: a
    /// connection woken for every write of the sink costs more than the wait.
    rx: mpsc::UnboundedReceiver<Acks>,
    /// Handed to the sink and not yet back.
    outstanding: usize,
    /// Settled by the sink (or here), not yet sent to the server.
    pending: Pending,
    /// Collects and sends at most [`ACK_DELAY`] after something was waiting.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl AckState {
    /// How many more deliveries the credit allows before accepts must come back and be sent
    /// (none: starved).
    fn room(&self, credit: usize) -> usize {
        credit.saturating_sub(self.outstanding + self.pending.len())
    }

    /// Nothing more can arrive until something is settled: the credit is used up here, or
    /// the sender has none left (the link tops it up in steps, as deliveries are settled).
    fn blocked(&self, sub: &Subscription, ctx: &PumpContext) -> bool {
        self.room(ctx.credit) == 0 || sub.credit() == 0
    }

    fn add(&mut self, acks: Acks) {
        self.outstanding -= self.pending.add(acks);
    }

    /// Takes whatever the sink has sent back, without waiting.
    fn collect(&mut self) {
        while let Ok(acks) = self.rx.try_recv() {
            self.add(acks);
        }
    }

    /// Accepts came back while nothing more could be received: take the rest, send now.
    async fn on_returned(
        &mut self,
        first: Acks,
        sub: &mut Subscription,
        ctx: &PumpContext,
    ) -> Result<(), LinkError> {
        self.add(first);
        self.collect();
        self.send(sub, ctx);
        sub.flush().await
    }

    /// The delay is up: send what came back, and wait again if more is with the sink.
    async fn on_timer(
        &mut self,
        sub: &mut Subscription,
        ctx: &PumpContext,
    ) -> Result<(), LinkError> {
        self.armed = false;
        self.collect();
        self.send(sub, ctx);
        self.arm_if_waiting();
        sub.flush().await
    }

    /// Starts the delay if something is with the sink or waiting to be sent.
    fn arm_if_waiting(&mut self) {
        if !self.armed && (self.outstanding > 0 || !self.pending.is_empty()) {
            self.armed = true;
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + ACK_DELAY);
        }
    }

    /// Queues the settlements decided so far (the caller flushes).
    fn send(&mut self, sub: &mut Subscription, ctx: &PumpContext) {
        if self.pending.is_empty() {
            return;
        }
        let Acks {
            mut accept,
            mut release,
        } = std::mem::take(&mut self.pending.acks);
        if !accept.is_empty() {
            sub.accept(&mut accept);
            ctx.counters
                .accepted
                .fetch_add(accept.len() as u64, Ordering::Relaxed);
        }
        if !release.is_empty() {
            sub.release(&mut release);
        }
        ctx.status
            .in_flight_add(-(std::mem::take(&mut self.pending.from_sink) as i64));
    }
}

/// Dispositions decided but not yet sent; they still count against the credit.
#[derive(Default)]
struct Pending {
    acks: Acks,
    /// How many of them came from the sink (they leave `in_flight` when sent).
    from_sink: usize,
}

impl Pending {
    fn len(&self) -> usize {
        self.acks.accept.len() + self.acks.release.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Send now rather than after the delay: enough are waiting, or nothing more can be
    /// received until they are sent.
    fn must_send(&self, outstanding: usize, credit: usize) -> bool {
        self.len() >= ACK_BATCH || outstanding + self.len() >= credit
    }

    /// Takes the sink's decisions; returns how many deliveries they settle.
    fn add(&mut self, acks: Acks) -> usize {
        let n = acks.accept.len() + acks.release.len();
        self.acks.accept.extend(acks.accept);
        self.acks.release.extend(acks.release);
        self.from_sink += n;
        n
    }
}

/// Decodes, filters and renders one delivery into `batch`, or sets it aside to accept here
/// (filtered out), or returns it with the reason to reject it (it does not fit the schema).
fn take(
    delivery: Delivery,
    batch: &mut Batch,
    pending: &mut Pending,
    ctx: &PumpContext,
) -> Option<(DeliveryId, String)> {
    let render = &ctx.render;
    let id = delivery.id;
    let message = match &delivery.message {
        Ok(message) => message,
        Err(e) => {
            let reason = format!("cannot decode the message: {e}");
            tracing::warn!(%reason, delivery_id = id, "rejecting a delivery");
            return Some((id, reason));
        }
    };
    let view = match render.mapping.decode(message) {
        Ok(view) => view,
        Err(reason) => {
            tracing::warn!(%reason, delivery_id = id, "rejecting a delivery");
            return Some((id, reason.to_string()));
        }
    };
    if !render.filters.is_empty() && !render.filters.passes(view.topic) {
        ctx.counters.filtered.fetch_add(1, Ordering::Relaxed);
        pending.acks.accept.push(id);
        return None;
    }
    let start = batch.bytes.len();
    let exec = if render.exec_each {
        batch.bytes.extend_from_slice(&view.body);
        Some(Box::new(ExecFields {
            topic: view.topic.to_string(),
            message_id: view.message_id.as_deref().map(str::to_string),
            generate_time: view.generate_time,
            product_key: view.product_key.map(str::to_string),
            device_name: view.device_name.map(str::to_string),
        }))
    } else {
        render.format.render(&view, render.body, &mut batch.bytes);
        None
    };
    let item = Item {
        key: view.message_id.as_deref().map(|id| render.keyer.key(id)),
        generate_time: view.generate_time,
        range: start..batch.bytes.len(),
        exec,
        delivery: id,
    };
    batch.items.push(item);
    None
}
