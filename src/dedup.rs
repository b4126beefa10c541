//! Duplicate suppression: a bounded window (by count and by age) of message ids already written.
//!
//! Ids are kept as 64-bit keyed hashes (SipHash with a per-process random key), so the window
//! costs about 40 bytes an entry whatever the id's length; a false match needs a 64-bit collision.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::time::{Duration, Instant};

/// Default number of ids remembered.
pub const DEFAULT_SIZE: usize = 32_768;
/// Default age after which an id is forgotten. Aliyun redelivers after about a minute.
pub const DEFAULT_AGE: Duration = Duration::from_secs(600);

/// Turns a message id into its window key; cheap to clone into every connection.
#[derive(Clone, Debug, Default)]
pub struct Keyer(RandomState);

impl Keyer {
    /// The key of `id`.
    pub fn key(&self, id: &str) -> u64 {
        self.0.hash_one(id)
    }
}

/// Hashes a key to itself: keys are already keyed SipHash outputs, uniformly spread, so
/// hashing them again in every set that holds them would only cost time.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used for keys; anything else still hashes correctly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A set of keys.
pub type KeySet = HashSet<u64, BuildHasherDefault<KeyHasher>>;

/// The window of keys already written.
#[derive(Debug)]
pub struct Window {
    keys: KeySet,
    order: VecDeque<(u64, Instant)>,
    size: usize,
    age: Duration,
}

impl Window {
    /// Remembers at most `size` ids, each for at most `age`.
    pub fn new(size: usize, age: Duration) -> Self {
        Window {
            keys: KeySet::with_capacity_and_hasher(size.min(4096), Default::default()),
            order: VecDeque::with_capacity(size.min(4096)),
            size: size.max(1),
            age,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            if self.order.len() > self.size || now.duration_since(at) > self.age {
                self.order.pop_front();
                self.keys.remove(&key);
            } else {
                break;
            }
        }
    }

    /// Whether `key` was written within the window.
    pub fn contains(&mut self, key: u64, now: Instant) -> bool {
        self.expire(now);
        self.keys.contains(&key)
    }

    /// Records `key` as written at `now`.
    pub fn insert(&mut self, key: u64, now: Instant) {
        if self.keys.insert(key) {
            self.order.push_back((key, now));
        }
        self.expire(now);
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_size_and_age() {
        let k = Keyer::default();
        let t0 = Instant::now();
        let mut w = Window::new(3, Duration::from_secs(10));
        for id in ["a", "b", "c"] {
            assert!(!w.contains(k.key(id), t0));
            w.insert(k.key(id), t0);
        }
        assert!(w.contains(k.key("a"), t0));
        w.insert(k.key("d"), t0);
        assert_eq!(w.len(), 3);
        assert!(!w.contains(k.key("a"), t0), "oldest evicted by size");
        assert!(w.contains(k.key("d"), t0));
        assert!(
            !w.contains(k.key("b"), t0 + Duration::from_secs(11)),
            "expired by age"
        );
        assert!(w.is_empty());
    }

    #[test]
    fn keys_differ_per_id_and_match_across_clones() {
        let k = Keyer::default();
        let k2 = k.clone();
        assert_eq!(k.key("1700000000000000001"), k2.key("1700000000000000001"));
        assert_ne!(k.key("1700000000000000001"), k.key("1700000000000000002"));
    }
}
