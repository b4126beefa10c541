//! The consumer group's message store: the ready queue, delayed redeliveries, the in-flight
//! table, and the accounting (accepted ids, transfer counts, outcome counters, and the
//! optional accept journal).
//!
//! Invariant: every published message is, at any moment, in exactly one of ready, delayed,
//! in flight (one or more copies) or accepted. Nothing here ever drops a message.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::DeviceMessage;

/// `publish_wait` blocks while ready + delayed holds this many messages.
pub(crate) const BACKLOG_BOUND: usize = 100_000;
/// How many accepted ids and per-id transfer counts are remembered (the oldest are forgotten).
pub(crate) const HISTORY_LIMIT: usize = 1 << 20;
/// Reorder injection picks the next message at random among this many at the head.
const REORDER_WINDOW: usize = 8;

/// A published message with its internal identity (ids supplied by callers may repeat).
#[derive(Clone)]
pub(crate) struct Queued {
    pub key: u64,
    pub msg: Arc<DeviceMessage>,
    /// Fault injection: the message's sections byte for byte, sent instead of `msg` (which then
    /// only carries the id for accounting).
    pub encoded: Option<Bytes>,
}

/// What a connection's pump takes: one message and one delivery number per copy to send
/// (two copies when duplicate injection fires).
pub(crate) struct Taken {
    pub seqs: Vec<u64>,
    pub msg: Arc<DeviceMessage>,
    pub encoded: Option<Bytes>,
}

/// How one delivery ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    Accepted,
    Rejected,
    Released,
    Modified,
    /// No outcome within the ack timeout (Aliyun log 9650).
    TimedOut,
    /// The link or connection went away first; goes back at once.
    Lost,
    /// The link cannot carry it (max-message-size); treated like a rejection.
    Undeliverable,
}

struct InFlight {
    conn: u64,
    q: Queued,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub transfers_sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub released: u64,
    pub timed_out: u64,
    pub backlog: usize,
    pub in_flight: usize,
}

struct Inner {
    next_key: u64,
    next_seq: u64,
    ready: VecDeque<Queued>,
    // (due, seq) keeps equal deadlines apart and in order.
    delayed: BTreeMap<(Instant, u64), Queued>,
    in_flight: HashMap<u64, InFlight>,
    // Copies of a message currently in flight, by key.
    copies: HashMap<u64, u32>,
    // Keys accepted while another copy is still in flight (so that copy is not requeued).
    accepted_while_copies: HashSet<u64>,
    accepted_ids: VecDeque<String>,
    delivery_counts: HashMap<String, u32>,
    counts_order: VecDeque<String>,
    counters: Counters,
    reorder: bool,
    duplicate_probability: f64,
}

/// The shared store. One per emulator (one consumer group).
pub(crate) struct Backlog {
    inner: Mutex<Inner>,
    // Wakes pumps when a message becomes ready or a redelivery deadline changes.
    work: Notify,
    // Wakes `publish_wait` when the backlog shrinks.
    space: Notify,
    accepted_tx: watch::Sender<u64>,
    redelivery_delay: Duration,
    // Each newly accepted messageId is appended here as one line, written straight to the
    // file (no user-space buffer), so it survives the emulator being killed.
    journal: Option<Mutex<File>>,
}

impl Backlog {
    pub fn new(redelivery_delay: Duration, journal: Option<File>) -> Self {
        let (accepted_tx, _) = watch::channel(0);
        Backlog {
            inner: Mutex::new(Inner {
                next_key: 0,
                next_seq: 0,
                ready: VecDeque::new(),
                delayed: BTreeMap::new(),
                in_flight: HashMap::new(),
                copies: HashMap::new(),
                accepted_while_copies: HashSet::new(),
                accepted_ids: VecDeque::new(),
                delivery_counts: HashMap::new(),
                counts_order: VecDeque::new(),
                counters: Counters::default(),
                reorder: false,
                duplicate_probability: 0.0,
            }),
            work: Notify::new(),
            space: Notify::new(),
            accepted_tx,
            redelivery_delay,
            journal: journal.map(Mutex::new),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is one step),
        // so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues without waiting (never drops; may exceed `BACKLOG_BOUND`).
    pub fn publish(&self, msg: DeviceMessage) {
        self.enqueue(msg, None);
    }

    /// Enqueues hand-encoded message sections (fault injection), accounted under `message_id`.
    pub fn publish_encoded(&self, message_id: String, sections: Bytes) {
        let placeholder = DeviceMessage {
            topic: String::new(),
            message_id,
            generate_time: 0,
            body: Vec::new(),
            extra_properties: Vec::new(),
        };
        self.enqueue(placeholder, Some(sections));
    }

    fn enqueue(&self, msg: DeviceMessage, encoded: Option<Bytes>) {
        {
            let mut g = self.lock();
            let key = g.next_key;
            g.next_key += 1;
            g.ready.push_back(Queued {
                key,
                msg: Arc::new(msg),
                encoded,
            });
        }
        self.work.notify_waiters();
    }

    /// Enqueues, first waiting while the backlog holds `BACKLOG_BOUND` messages or more.
    pub async fn publish_wait(&self, msg: DeviceMessage) {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let g = self.lock();
                if g.ready.len() + g.delayed.len() < BACKLOG_BOUND {
                    break;
                }
            }
            space.await;
        }
        self.publish(msg);
    }

    /// Takes the next message for connection `conn`, waiting until one is ready.
    /// Returns `None` once `cancel` fires.
    pub async fn next(&self, conn: u64, cancel: &CancellationToken) -> Option<Taken> {
        loop {
            let work = self.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            let next_due = {
                let mut g = self.lock();
                g.promote_due(Instant::now());
                if let Some(taken) = g.take(conn) {
                    drop(g);
                    self.space.notify_waiters();
                    return Some(taken);
                }
                g.delayed.keys().next().map(|(due, _)| *due)
            };
            let sleep_until =
                next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = &mut work => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    /// Records that delivery `seq` went out as a transfer.
    pub fn on_sent(&self, seq: u64) {
        let mut g = self.lock();
        let Some(id) = g.in_flight.get(&seq).map(|f| f.q.msg.message_id.clone()) else {
            return;
        };
        g.counters.transfers_sent += 1;
        g.count_transfer(id);
    }

    /// Applies the outcome of delivery `seq`. Unknown or already settled `seq`s are ignored.
    pub fn settle(&self, seq: u64, how: Settled) {
        let (requeued, newly_accepted) = {
            let mut g = self.lock();
            let before = g.counters.accepted;
            let requeued = g.settle(seq, how, self.redelivery_delay);
            let newly = (g.counters.accepted > before)
                .then(|| g.accepted_ids.back().cloned())
                .flatten();
            (requeued, newly)
        };
        if let Some(id) = newly_accepted {
            self.record_in_journal(&id);
        }
        if how == Settled::Accepted {
            let n = self.lock().counters.accepted;
            self.accepted_tx.send_replace(n);
        }
        if requeued {
            self.work.notify_waiters();
        }
    }

    /// Puts every delivery of connection `conn` that is still in flight back at the head
    /// of the ready queue, in their original order.
    pub fn requeue_connection(&self, conn: u64) {
        let requeued = {
            let mut g = self.lock();
            let mut seqs: Vec<u64> = g
                .in_flight
                .iter()
                .filter(|(_, f)| f.conn == conn)
                .map(|(s, _)| *s)
                .collect();
            // Highest first: each goes to the front, so the lowest ends up first.
            seqs.sort_unstable_by(|a, b| b.cmp(a));
            let mut any = false;
            for seq in seqs {
                any |= g.settle(seq, Settled::Lost, self.redelivery_delay);
            }
            any
        };
        if requeued {
            self.work.notify_waiters();
        }
    }

    fn record_in_journal(&self, id: &str) {
        let Some(journal) = &self.journal else {
            return;
        };
        let mut file = journal.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line: with O_APPEND it lands whole even if the process dies next.
        if let Err(e) = file.write_all(format!("{id}\n").as_bytes()) {
            tracing::warn!(error = %e, message_id = %id, "could not append to the accept journal");
        }
    }

    pub fn set_reorder(&self, on: bool) {
        self.lock().reorder = on;
    }

    pub fn set_duplicate_probability(&self, p: f64) {
        self.lock().duplicate_probability = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    }

    pub fn counters(&self) -> Counters {
        let g = self.lock();
        Counters {
            backlog: g.ready.len() + g.delayed.len(),
            in_flight: g.in_flight.len(),
            ..g.counters_copy()
        }
    }

    pub fn accepted_ids(&self) -> Vec<String> {
        self.lock().accepted_ids.iter().cloned().collect()
    }

    pub fn delivery_counts(&self) -> HashMap<String, u32> {
        self.lock().delivery_counts.clone()
    }

    /// Waits until `n` messages in total have been accepted.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.accepted_tx.subscribe();
        let want = n as u64;
        let reached = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c >= want)).await,
            Ok(Ok(_))
        );
        reached
    }

    /// Message ids not yet accepted: ready, delayed and in flight (each message once). A stray
    /// duplicate copy of an accepted message is not pending.
    #[cfg(test)]
    pub fn pending_ids(&self) -> Vec<String> {
        let g = self.lock();
        let mut keys: HashSet<u64> = g.accepted_while_copies.clone();
        let mut out = Vec::new();
        let all = g
            .ready
            .iter()
            .chain(g.delayed.values())
            .chain(g.in_flight.values().map(|f| &f.q));
        for q in all {
            if keys.insert(q.key) {
                out.push(q.msg.message_id.clone());
            }
        }
        out
    }
}

impl Inner {
    fn counters_copy(&self) -> Counters {
        Counters {
            transfers_sent: self.counters.transfers_sent,
            accepted: self.counters.accepted,
            rejected: self.counters.rejected,
            released: self.counters.released,
            timed_out: self.counters.timed_out,
            backlog: 0,
            in_flight: 0,
        }
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let q = entry.remove();
            self.ready.push_back(q);
        }
    }

    fn take(&mut self, conn: u64) -> Option<Taken> {
        let window = self.ready.len().min(REORDER_WINDOW);
        let index = if self.reorder && window > 1 {
            fastrand::usize(..window)
        } else {
            0
        };
        let q = self.ready.remove(index)?;
        let copies =
            if self.duplicate_probability > 0.0 && fastrand::f64() < self.duplicate_probability {
                2
            } else {
                1
            };
        let mut seqs = Vec::with_capacity(copies);
        for _ in 0..copies {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.in_flight.insert(seq, InFlight { conn, q: q.clone() });
            seqs.push(seq);
        }
        *self.copies.entry(q.key).or_insert(0) += copies as u32;
        Some(Taken {
            seqs,
            msg: q.msg,
            encoded: q.encoded,
        })
    }

    fn count_transfer(&mut self, id: String) {
        if let Some(n) = self.delivery_counts.get_mut(&id) {
            *n += 1;
            return;
        }
        if self.counts_order.len() >= HISTORY_LIMIT {
            if let Some(old) = self.counts_order.pop_front() {
                self.delivery_counts.remove(&old);
            }
        }
        self.counts_order.push_back(id.clone());
        self.delivery_counts.insert(id, 1);
    }

    /// Returns whether the message went back to ready or delayed.
    fn settle(&mut self, seq: u64, how: Settled, delay: Duration) -> bool {
        let Some(InFlight { q, .. }) = self.in_flight.remove(&seq) else {
            return false;
        };
        let remaining = match self.copies.get_mut(&q.key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if remaining == 0 {
            self.copies.remove(&q.key);
        }
        let already_accepted = self.accepted_while_copies.contains(&q.key);
        if remaining == 0 {
            self.accepted_while_copies.remove(&q.key);
        }

        match how {
            Settled::Accepted => {
                if !already_accepted {
                    self.counters.accepted += 1;
                    if self.accepted_ids.len() >= HISTORY_LIMIT {
                        self.accepted_ids.pop_front();
                    }
                    self.accepted_ids.push_back(q.msg.message_id.clone());
                    if remaining > 0 {
                        self.accepted_while_copies.insert(q.key);
                    }
                }
                false
            }
            other => {
                match other {
                    Settled::Rejected | Settled::Undeliverable => self.counters.rejected += 1,
                    Settled::Released | Settled::Modified => self.counters.released += 1,
                    Settled::TimedOut => self.counters.timed_out += 1,
                    Settled::Lost | Settled::Accepted => {}
                }
                // Accepted through another copy, or another copy still out: its fate decides.
                if already_accepted || remaining > 0 {
                    return false;
                }
                if other == Settled::Lost {
                    self.ready.push_front(q);
                } else {
                    let due = Instant::now() + delay;
                    self.delayed.insert((due, seq), q);
                }
                true
            }
        }
    }
}
