//! Signed callbacks already queued by this instance, remembered for a while: a captured request
//! replayed (the same signature and nonce) is answered 200 again without being published again.
//! Per instance and bounded: the worker's dedupe of identical callbacks stays the guarantee
//! across instances; this only keeps replay floods off the broker and the database.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shared::plivo::form::{hash_fields, hash_text};

pub struct ReplayCache {
    ttl: Duration,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Being published now (at most one entry per request in progress).
    in_flight: HashSet<[u8; 32]>,
    at: HashMap<[u8; 32], Instant>,
    /// Insertion order, for eviction: the oldest entries go first.
    order: VecDeque<[u8; 32]>,
}

impl ReplayCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { ttl, capacity, seen: Mutex::new(Seen::default()) }
    }

    /// The identity of a verified request: what its signature proved (scheme, method, URL,
    /// form fields in signature order, nonce), never the header's text, which a replayer can
    /// vary (extra list entries, a junk second header) without breaking the verification.
    pub fn key(scheme: &str, method: &str, url: &str, fields: &[(String, String)], nonce: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for text in [scheme, method, url, nonce] {
            hash_text(&mut hasher, text);
        }
        hash_fields(&mut hasher, fields);
        hasher.finalize().into()
    }

    /// What to do with a verified request: publish it (holding the returned guard until it is
    /// confirmed), answer it as already queued, or refuse it while a copy is being published
    /// (concurrent copies would otherwise all pass the check and all be published).
    pub fn begin(&self, key: [u8; 32]) -> Begin<'_> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.at.get(&key).is_some_and(|at| at.elapsed() < self.ttl) {
            return Begin::Queued;
        }
        if !seen.in_flight.insert(key) {
            return Begin::InFlight;
        }
        Begin::Fresh(Publishing { cache: self, key, queued: false })
    }

    /// Remembers a request once it is durably queued (`seen`: the cache, locked).
    fn remember(&self, seen: &mut Seen, key: [u8; 32]) {
        let now = Instant::now();
        while let Some(oldest) = seen.order.front().copied() {
            let expired = seen.at.get(&oldest).is_none_or(|at| now.duration_since(*at) >= self.ttl);
            if !expired && seen.order.len() < self.capacity {
                break;
            }
            seen.order.pop_front();
            seen.at.remove(&oldest);
        }
        if seen.at.insert(key, now).is_none() {
            seen.order.push_back(key);
        }
    }
}

pub enum Begin<'a> {
    Fresh(Publishing<'a>),
    Queued,
    InFlight,
}

/// A request being published; dropped without `queued` (a failed or abandoned publish), it is
/// forgotten, so its next copy is published.
pub struct Publishing<'a> {
    cache: &'a ReplayCache,
    key: [u8; 32],
    queued: bool,
}

impl Publishing<'_> {
    pub fn queued(mut self) {
        self.queued = true;
    }
}

impl Drop for Publishing<'_> {
    fn drop(&mut self) {
        let mut seen = self.cache.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.in_flight.remove(&self.key);
        if self.queued {
            self.cache.remember(&mut seen, self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ReplayCache {
        fn seen(&self, key: &[u8; 32]) -> bool {
            matches!(self.begin(*key), Begin::Queued)
        }
    }

    #[test]
    fn a_copy_arriving_while_the_first_is_published_is_refused_and_a_failed_publish_is_forgotten() {
        let cache = ReplayCache::new(Duration::from_secs(60), 10);
        let key = ReplayCache::key("v3", "POST", "u", &[], "n");
        let Begin::Fresh(first) = cache.begin(key) else { panic!("the first copy is published") };
        assert!(matches!(cache.begin(key), Begin::InFlight), "a concurrent copy waits its turn");
        drop(first); // the publish failed
        let Begin::Fresh(again) = cache.begin(key) else { panic!("a failed publish is not remembered") };
        again.queued();
        assert!(matches!(cache.begin(key), Begin::Queued), "once queued, copies are answered as queued");
    }

    #[test]
    fn remembers_within_its_ttl_and_its_capacity() {
        let cache = ReplayCache::new(Duration::from_secs(60), 3);
        let keys: Vec<[u8; 32]> = (0..5).map(|i| ReplayCache::key("v3", "POST", "u", &[], &i.to_string())).collect();
        assert!(!cache.seen(&keys[0]));
        for key in &keys {
            cache.remember(&mut cache.seen.lock().unwrap(), *key);
        }
        assert!(keys[2..].iter().all(|k| cache.seen(k)), "the newest three are kept");
        assert!(!cache.seen(&keys[0]) && !cache.seen(&keys[1]), "the oldest went when it was full");
        assert_ne!(
            ReplayCache::key("v3", "POST", "ab", &[], "c"),
            ReplayCache::key("v3", "POST", "a", &[], "bc"),
            "no ambiguity between the parts"
        );
        let fields = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(
            ReplayCache::key("v3", "POST", "u", &fields(&[("a", "1"), ("b", "2")]), "n"),
            ReplayCache::key("v3", "POST", "u", &fields(&[("b", "2"), ("a", "1")]), "n"),
            "wire order is not part of what was signed"
        );

        let short = ReplayCache::new(Duration::from_millis(0), 10);
        short.remember(&mut short.seen.lock().unwrap(), keys[0]);
        assert!(!short.seen(&keys[0]), "forgotten after its TTL");
    }
}
