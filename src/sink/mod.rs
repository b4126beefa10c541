//! The sink: the one task every connection hands its messages to. It owns what must be shared
//! across connections: the dedup window, the reorder window, `--count`, `--idle-exit`, and the
//! output (stdout, an `--exec` child, or `--exec-each` processes). After a message is out it
//! sends the accept back to the connection that received it.

pub mod exec_each;
pub mod stdout;
pub mod writer;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::dedup;
use crate::reorder::Reorder;
use crate::status::Status;
use crate::stop::{StopReason, Stopper};
use exec_each::ExecFields;
use writer::Writer;

/// Batches in flight from each connection to the sink. The channel holds this many per
/// connection, so that connections woken together do not wait on each other to hand over one
/// delivery each; memory stays bounded by the link credit (a connection has at most `credit`
/// messages unsettled, in batches of at most credit/2), and a full channel stops the
/// connections, and so the credit.
pub const CHANNEL_BATCHES_PER_CONNECTION: usize = 8;

/// A delivery's id on its connection's link: what settles it.
pub type DeliveryId = u32;

/// One message on its way out.
#[derive(Debug)]
pub struct Item {
    /// For the accept.
    pub delivery: DeliveryId,
    /// Dedup key of the message id; `None` (a generic broker's message without an id) is
    /// never suppressed.
    pub key: Option<u64>,
    /// For `--reorder-window`.
    pub generate_time: Option<i64>,
    /// The rendered output (or, for `--exec-each`, the body) in [`Batch::bytes`].
    pub range: Range<usize>,
    /// For `--exec-each`.
    pub exec: Option<Box<ExecFields>>,
}

/// Dispositions for one connection. The channel carrying them is unbounded, but what is in it
/// is bounded by that connection's link credit: only delivered, unsettled messages get one.
#[derive(Debug, Default)]
pub struct Acks {
    /// Written (or filtered, or duplicate): accept.
    pub accept: Vec<DeliveryId>,
    /// Not written (past `--count`, or a failed `--exec-each`): release for redelivery.
    pub release: Vec<DeliveryId>,
}

/// Where a connection's dispositions go.
pub type AckSender = mpsc::UnboundedSender<Acks>;

/// What one connection hands over at a time.
#[derive(Debug)]
pub struct Batch {
    /// Rendered messages back to back.
    pub bytes: Vec<u8>,
    /// The messages.
    pub items: Vec<Item>,
    /// The connection's dispositions channel.
    pub acks: AckSender,
}

/// Counters shared with the connections (and printed at the end).
#[derive(Debug, Default)]
pub struct Counters {
    /// Deliveries received.
    pub received: AtomicU64,
    /// Messages written (or handled by `--exec-each`).
    pub written: AtomicU64,
    /// Deliveries accepted.
    pub accepted: AtomicU64,
    /// Deliveries rejected as undecodable.
    pub rejected: AtomicU64,
    /// Deliveries released back to the cloud.
    pub released: AtomicU64,
    /// Duplicates not written.
    pub duplicates: AtomicU64,
    /// Messages filtered out by topic.
    pub filtered: AtomicU64,
}

/// Where messages go.
pub enum Target {
    /// Lines to stdout or an `--exec` child.
    Write(Writer),
    /// `--exec-each`.
    ExecEach {
        /// The command (`sh -c`).
        command: Arc<str>,
        /// At most this many at once.
        jobs: usize,
        /// A command running longer is killed and its message released.
        timeout: Duration,
    },
}

/// How the sink behaves.
pub struct SinkOptions {
    /// Where messages go.
    pub target: Target,
    /// `Some((size, age))`: suppress ids seen within the window.
    pub dedup: Option<(usize, Duration)>,
    /// `--reorder-window`.
    pub reorder: Option<Duration>,
    /// `--count`.
    pub count: Option<u64>,
    /// `--idle-exit`.
    pub idle_exit: Option<Duration>,
}

/// A held (reordered) message.
struct Held {
    acks: AckSender,
    delivery: DeliveryId,
    key: Option<u64>,
    generate_time: Option<i64>,
    bytes: Vec<u8>,
}

/// An `--exec-each` job waiting for a slot.
struct Job {
    acks: AckSender,
    delivery: DeliveryId,
    key: Option<u64>,
    generate_time: Option<i64>,
    fields: Box<ExecFields>,
    body: Vec<u8>,
}

/// A finished `--exec-each` job.
struct Done {
    acks: AckSender,
    delivery: DeliveryId,
    key: Option<u64>,
    generate_time: Option<i64>,
    message_id: Option<String>,
    result: Result<(), String>,
}

struct Sink {
    writer: Option<Writer>,
    exec: Option<(Arc<str>, usize, Duration)>,
    dedup: Option<dedup::Window>,
    reorder: Option<Reorder<Held>>,
    budget: Option<u64>,
    idle_exit: Option<Duration>,
    last_message: Instant,
    stopper: Arc<Stopper>,
    counters: Arc<Counters>,
    delay: metrics::Histogram,
    // The current write cycle: per message its connection, delivery, dedup key, generateTime.
    out: Vec<u8>,
    cycle: Vec<(AckSender, DeliveryId, Option<u64>, Option<i64>)>,
    cycle_keys: dedup::KeySet,
    // Keys of messages held for reordering or queued/running for `--exec-each`: a duplicate
    // arriving meanwhile must not go out a second time.
    in_progress: dedup::KeySet,
    immediate: Vec<(AckSender, Acks)>,
    jobs: std::collections::VecDeque<Job>,
    running: JoinSet<Done>,
    output_broken: bool,
}

/// Runs until every connection has hung up (after a stop, they all do).
pub async fn run(
    mut rx: mpsc::Receiver<Batch>,
    options: SinkOptions,
    stopper: Arc<Stopper>,
    status: Arc<Status>,
) {
    let counters = status.counters.clone();
    let (writer, exec) = match options.target {
        Target::Write(w) => (Some(w), None),
        Target::ExecEach {
            command,
            jobs,
            timeout,
        } => (None, Some((command, jobs.max(1), timeout))),
    };
    let mut sink = Sink {
        writer,
        exec,
        dedup: options
            .dedup
            .map(|(size, age)| dedup::Window::new(size, age)),
        reorder: options.reorder.map(Reorder::new),
        budget: options.count,
        idle_exit: options.idle_exit,
        last_message: Instant::now(),
        stopper: stopper.clone(),
        counters,
        delay: Status::delay_histogram(),
        out: Vec::with_capacity(64 * 1024),
        cycle: Vec::new(),
        cycle_keys: Default::default(),
        in_progress: Default::default(),
        immediate: Vec::new(),
        jobs: Default::default(),
        running: JoinSet::new(),
        output_broken: false,
    };
    let stopping = stopper.token();
    let mut flushed_held_at_stop = false;
    loop {
        let wake = [
            sink.reorder.as_ref().and_then(Reorder::next_due),
            sink.idle_exit.map(|d| sink.last_message + d),
        ]
        .into_iter()
        .flatten()
        .min();
        let room = sink
            .exec
            .as_ref()
            .is_none_or(|(_, jobs, _)| sink.jobs.is_empty() && sink.running.len() < *jobs);
        tokio::select! {
            biased;
            done = sink.running.join_next(), if !sink.running.is_empty() => {
                if let Some(Ok(done)) = done {
                    sink.exec_done(done);
                }
            }
            batch = rx.recv(), if room => match batch {
                Some(batch) => {
                    sink.admit(batch);
                    // Take what else is waiting, up to a bound, to write it in one go.
                    for _ in 0..rx.max_capacity() {
                        match rx.try_recv() {
                            Ok(batch) => sink.admit(batch),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            _ = stopping.cancelled(), if !flushed_held_at_stop => {
                // Held messages go out now, while the connections still wait for their accepts.
                flushed_held_at_stop = true;
                sink.release_held(None);
            }
            _ = sleep_until(wake), if wake.is_some() => {
                let now = Instant::now();
                sink.release_held(Some(now));
                if let Some(idle) = sink.idle_exit {
                    if now >= sink.last_message + idle {
                        tracing::info!(idle = ?idle, "no message for the --idle-exit time; stopping");
                        sink.idle_exit = None;
                        stopper.stop(StopReason::Idle);
                    }
                }
            }
        }
        sink.start_jobs();
        sink.flush().await;
    }
    sink.release_held(None);
    sink.flush().await;
    // Running commands finish within their timeout.
    while let Some(done) = sink.running.join_next().await {
        if let Ok(done) = done {
            sink.exec_done(done);
        }
    }
    sink.send_immediate();
    if let Some(w) = sink.writer.as_mut() {
        w.close().await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn push_ack(list: &mut Vec<(AckSender, Acks)>, to: &AckSender, delivery: DeliveryId, accept: bool) {
    // Messages of one batch come one after another: look at the last connection first.
    let found = match list.last() {
        Some((s, _)) if s.same_channel(to) => Some(list.len() - 1),
        _ => list.iter().position(|(s, _)| s.same_channel(to)),
    };
    let slot = match found {
        Some(i) => &mut list[i].1,
        None => {
            list.push((to.clone(), Acks::default()));
            &mut list.last_mut().expect("just pushed").1
        }
    };
    if accept {
        slot.accept.push(delivery);
    } else {
        slot.release.push(delivery);
    }
}

impl Sink {
    fn is_duplicate(&mut self, key: Option<u64>, now: Instant) -> bool {
        match (self.dedup.as_mut(), key) {
            (Some(window), Some(key)) => {
                window.contains(key, now)
                    || self.cycle_keys.contains(&key)
                    || self.in_progress.contains(&key)
            }
            _ => false,
        }
    }

    /// Takes the budget for one message; false when `--count` is used up.
    fn take_budget(&mut self) -> bool {
        match self.budget.as_mut() {
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
            None => true,
        }
    }

    fn admit(&mut self, batch: Batch) {
        let now = Instant::now();
        self.last_message = now;
        let Batch { bytes, items, acks } = batch;
        for item in items {
            if self.output_broken {
                push_ack(&mut self.immediate, &acks, item.delivery, false);
                continue;
            }
            if self.is_duplicate(item.key, now) {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                push_ack(&mut self.immediate, &acks, item.delivery, true);
                continue;
            }
            if !self.take_budget() {
                push_ack(&mut self.immediate, &acks, item.delivery, false);
                continue;
            }
            let slice = &bytes[item.range.clone()];
            // The key to track while the message is on its way out (with dedup on).
            let tracked = item.key.filter(|_| self.dedup.is_some());
            if let Some(fields) = item.exec {
                if let Some(key) = tracked {
                    self.in_progress.insert(key);
                }
                self.jobs.push_back(Job {
                    acks: acks.clone(),
                    delivery: item.delivery,
                    key: item.key,
                    generate_time: item.generate_time,
                    fields,
                    body: slice.to_vec(),
                });
            } else if let Some(reorder) = self.reorder.as_mut() {
                if let Some(key) = tracked {
                    self.in_progress.insert(key);
                }
                let held = Held {
                    acks: acks.clone(),
                    delivery: item.delivery,
                    key: item.key,
                    generate_time: item.generate_time,
                    bytes: slice.to_vec(),
                };
                let at = item
                    .generate_time
                    .unwrap_or_else(|| crate::time::now_ms() as i64);
                reorder.push(at, held, now);
            } else {
                if let Some(key) = tracked {
                    self.cycle_keys.insert(key);
                }
                self.out.extend_from_slice(slice);
                self.cycle
                    .push((acks.clone(), item.delivery, item.key, item.generate_time));
            }
        }
    }

    /// Moves due (or, with `None`, all) held messages into the write cycle.
    fn release_held(&mut self, now: Option<Instant>) {
        let Some(reorder) = self.reorder.as_mut() else {
            return;
        };
        let mut due = Vec::new();
        match now {
            Some(now) => reorder.release_due(now, &mut due),
            None => reorder.release_all(&mut due),
        }
        for held in due {
            if let Some(key) = held.key {
                if self.in_progress.remove(&key) {
                    self.cycle_keys.insert(key);
                }
            }
            self.out.extend_from_slice(&held.bytes);
            self.cycle
                .push((held.acks, held.delivery, held.key, held.generate_time));
        }
    }

    /// Writes the cycle's output; then accepts what was written and sends the other acks.
    async fn flush(&mut self) {
        if !self.out.is_empty() {
            let result = match self.writer.as_mut() {
                Some(w) => w.write_batch(&self.out).await,
                None => Ok(()),
            };
            self.out.clear();
            let cycle = std::mem::take(&mut self.cycle);
            match result {
                Ok(()) => {
                    let now = Instant::now();
                    let now_ms = crate::time::now_ms();
                    self.counters
                        .written
                        .fetch_add(cycle.len() as u64, Ordering::Relaxed);
                    for (acks, delivery, key, generate_time) in cycle {
                        Status::record_delay(&self.delay, generate_time, now_ms);
                        if let (Some(window), Some(key)) = (self.dedup.as_mut(), key) {
                            window.insert(key, now);
                        }
                        push_ack(&mut self.immediate, &acks, delivery, true);
                    }
                }
                Err(e) => {
                    // Nothing of this cycle is accepted: the cloud sends it again.
                    for (acks, delivery, _, _) in cycle {
                        push_ack(&mut self.immediate, &acks, delivery, false);
                    }
                    self.output_broken = true;
                    match e.kind() {
                        std::io::ErrorKind::BrokenPipe => {
                            tracing::info!("the reader of the output went away; stopping");
                            self.stopper.stop(StopReason::OutputClosed)
                        }
                        std::io::ErrorKind::Interrupted => {}
                        _ => {
                            tracing::error!(error = %e, "writing the output failed; stopping");
                            self.stopper.stop(StopReason::OutputFailed(e.to_string()))
                        }
                    }
                }
            }
        }
        self.cycle_keys.clear();
        self.send_immediate();
        if self.budget == Some(0)
            && self.jobs.is_empty()
            && self.running.is_empty()
            && self.reorder.as_ref().is_none_or(Reorder::is_empty)
        {
            self.stopper.stop(StopReason::Count);
        }
    }

    fn send_immediate(&mut self) {
        for (to, acks) in self.immediate.drain(..) {
            self.counters
                .released
                .fetch_add(acks.release.len() as u64, Ordering::Relaxed);
            // A closed channel means that connection is gone; the cloud redelivers.
            let _ = to.send(acks);
        }
    }

    fn start_jobs(&mut self) {
        let Some((command, jobs, timeout)) = self.exec.clone() else {
            return;
        };
        while self.running.len() < jobs {
            let Some(job) = self.jobs.pop_front() else {
                break;
            };
            let command = command.clone();
            self.running.spawn(async move {
                let result = exec_each::run(command, &job.fields, &job.body, timeout).await;
                Done {
                    acks: job.acks,
                    delivery: job.delivery,
                    key: job.key,
                    generate_time: job.generate_time,
                    message_id: job.fields.message_id,
                    result,
                }
            });
        }
    }

    fn exec_done(&mut self, done: Done) {
        let Done {
            acks,
            delivery,
            key,
            generate_time,
            message_id,
            result,
        } = done;
        if let Some(key) = key {
            self.in_progress.remove(&key);
        }
        match result {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                Status::record_delay(&self.delay, generate_time, crate::time::now_ms());
                if let (Some(window), Some(key)) = (self.dedup.as_mut(), key) {
                    window.insert(key, Instant::now());
                }
                push_ack(&mut self.immediate, &acks, delivery, true);
            }
            Err(why) => {
                let message_id = message_id.as_deref().unwrap_or("-");
                tracing::warn!(%message_id, result = %why, "exec-each: command failed; releasing the message for redelivery");
                if let Some(n) = self.budget.as_mut() {
                    *n += 1;
                }
                push_ack(&mut self.immediate, &acks, delivery, false);
            }
        }
    }
}
