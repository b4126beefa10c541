//! `--reorder-window`: holds messages for up to a window and releases them in generateTime order.
//!
//! When the message that has waited longest is due, every held message with a generateTime up
//! to its own is released, oldest first. No message waits longer than the window; a message
//! that arrives after later ones were released can still come out of order (it is late by more
//! than the window).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

struct Held<T> {
    generate_time: i64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.generate_time, self.seq) == (other.generate_time, other.seq)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Held<T> {
    // Reversed: BinaryHeap is a max-heap and the smallest generateTime must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.generate_time, other.seq).cmp(&(self.generate_time, self.seq))
    }
}

/// The buffer. Its size is bounded by the link credit: held messages are not yet accepted.
pub struct Reorder<T> {
    window: Duration,
    heap: BinaryHeap<Held<T>>,
    arrivals: VecDeque<(Instant, i64)>,
    seq: u64,
}

impl<T> Reorder<T> {
    /// Holds messages for up to `window`.
    pub fn new(window: Duration) -> Self {
        Reorder {
            window,
            heap: BinaryHeap::new(),
            arrivals: VecDeque::new(),
            seq: 0,
        }
    }

    /// Holds `item`, stamped with `generate_time` (ms).
    pub fn push(&mut self, generate_time: i64, item: T, now: Instant) {
        self.seq += 1;
        self.heap.push(Held {
            generate_time,
            seq: self.seq,
            item,
        });
        self.arrivals.push_back((now, generate_time));
    }

    /// When the next message is due, if any is held.
    pub fn next_due(&self) -> Option<Instant> {
        self.arrivals.front().map(|(at, _)| *at + self.window)
    }

    /// Appends the messages that are due at `now` to `out`, in generateTime order.
    pub fn release_due(&mut self, now: Instant, out: &mut Vec<T>) {
        while let Some(&(at, generate_time)) = self.arrivals.front() {
            if at + self.window > now {
                break;
            }
            self.arrivals.pop_front();
            while self
                .heap
                .peek()
                .is_some_and(|h| h.generate_time <= generate_time)
            {
                if let Some(h) = self.heap.pop() {
                    out.push(h.item);
                }
            }
        }
    }

    /// Appends everything held to `out`, in generateTime order (at shutdown).
    pub fn release_all(&mut self, out: &mut Vec<T>) {
        self.arrivals.clear();
        while let Some(h) = self.heap.pop() {
            out.push(h.item);
        }
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_generate_time_order_within_the_window() {
        let w = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut r = Reorder::new(w);
        // Arrival order 3, 1, 2 (the cloud does not keep order).
        r.push(3000, "c", t0);
        r.push(1000, "a", t0 + Duration::from_millis(10));
        r.push(2000, "b", t0 + Duration::from_millis(20));
        let mut out = Vec::new();
        r.release_due(t0 + Duration::from_millis(50), &mut out);
        assert!(out.is_empty(), "nothing is due before the window");
        assert_eq!(r.next_due(), Some(t0 + w));
        r.release_due(t0 + w, &mut out);
        assert_eq!(
            out,
            ["a", "b", "c"],
            "the first arrival is due: all up to its time go"
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_due_message_takes_only_earlier_ones_with_it() {
        let w = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut r = Reorder::new(w);
        r.push(2000, "b", t0);
        r.push(1000, "a", t0 + Duration::from_millis(50));
        r.push(5000, "e", t0 + Duration::from_millis(60));
        let mut out = Vec::new();
        r.release_due(t0 + w, &mut out);
        assert_eq!(out, ["a", "b"]);
        assert_eq!(r.len(), 1);
        // Stale arrival entries for released items are harmless.
        r.release_due(t0 + Duration::from_millis(159), &mut out);
        assert_eq!(out, ["a", "b"]);
        r.release_due(t0 + Duration::from_millis(160), &mut out);
        assert_eq!(out, ["a", "b", "e"]);
        r.push(4000, "d", t0);
        r.release_all(&mut out);
        assert_eq!(out.last(), Some(&"d"));
    }
}
