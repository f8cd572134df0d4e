//! Signed callbacks already queued by this instance, remembered for a while: a captured request
//! replayed (the same signature and nonce) is answered 200 again without being published again.
//! Per instance and bounded: the worker's dedupe of identical callbacks stays the guarantee
//! across instances; this only keeps replay floods off the broker and the database.

use std::collections::{HashMap, VecDeque};
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

    /// Whether this request was queued here within the TTL.
    pub fn seen(&self, key: &[u8; 32]) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.at.get(key).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Remembers a request once it is durably queued.
    pub fn remember(&self, key: [u8; 32]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_its_ttl_and_its_capacity() {
        let cache = ReplayCache::new(Duration::from_secs(60), 3);
        let keys: Vec<[u8; 32]> = (0..5).map(|i| ReplayCache::key("v3", "POST", "u", &[], &i.to_string())).collect();
        assert!(!cache.seen(&keys[0]));
        for key in &keys {
            cache.remember(*key);
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
        short.remember(keys[0]);
        assert!(!short.seen(&keys[0]), "forgotten after its TTL");
    }
}
