//! Tokens already verified, so a buyer who sends the same token again costs a hash and a map
//! lookup instead of a signature check.
//!
//! Keyed by SHA-256 of the whole token, so a different token cannot land on someone else's
//! entry (a short hash could be made to collide). Bounded: at most `capacity` entries, spread
//! over shards so the serving threads rarely wait on one lock; a full shard first drops its
//! expired entries, then an arbitrary one. An entry never outlives its token's `exp`, and it
//! belongs to one generation of keys: after a rotation, entries verified with the old keys
//! are never served (and are dropped at once).

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::ids::UserId;

const SHARDS: usize = 16;

pub type TokenKey = [u8; 32];

pub struct TokenCache {
    shards: Box<[Mutex<HashMap<TokenKey, Entry>>]>,
    per_shard: usize,
}

struct Entry {
    user: UserId,
    /// The token's `exp`, unix seconds: the entry is dead from then on.
    exp: u64,
    generation: u64,
}

impl TokenCache {
    /// A cache for about `capacity` tokens; `None` when `capacity` is 0 (caching off).
    pub fn new(capacity: usize) -> Option<TokenCache> {
        if capacity == 0 {
            return None;
        }
        let per_shard = capacity.div_ceil(SHARDS);
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Some(TokenCache { shards, per_shard })
    }

    pub fn key(token: &[u8]) -> TokenKey {
        Sha256::digest(token).into()
    }

    /// The user of a token verified with keys of `generation`, if it has not expired by `now`.
    pub fn get(&self, key: &TokenKey, generation: u64, now: u64) -> Option<UserId> {
        let shard = self.shard(key).lock().ok()?;
        let e = shard.get(key)?;
        (e.generation == generation && now < e.exp).then(|| e.user.clone())
    }

    pub fn insert(&self, key: TokenKey, user: UserId, exp: u64, generation: u64, now: u64) {
        if exp <= now {
            return;
        }
        let Ok(mut shard) = self.shard(&key).lock() else {
            return;
        };
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| now < e.exp && e.generation == generation);
            if shard.len() >= self.per_shard
                && let Some(victim) = shard.keys().next().copied()
            {
                shard.remove(&victim);
            }
        }
        shard.insert(
            key,
            Entry {
                user,
                exp,
                generation,
            },
        );
    }

    /// Forgets everything (the keys changed).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            if let Ok(mut s) = shard.lock() {
                s.clear();
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &TokenKey) -> &Mutex<HashMap<TokenKey, Entry>> {
        &self.shards[usize::from(key[0]) % SHARDS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn entries_end_at_exp_and_with_their_key_generation() {
        let c = TokenCache::new(100).unwrap();
        let k = TokenCache::key(b"token-a");
        c.insert(k, user("alice"), 1_000, 1, 900);
        assert_eq!(c.get(&k, 1, 999).unwrap(), "alice");
        assert!(c.get(&k, 1, 1_000).is_none(), "dead at exp");
        assert!(c.get(&k, 2, 999).is_none(), "other keys");
        assert!(c.get(&TokenCache::key(b"token-b"), 1, 999).is_none());
        c.insert(TokenCache::key(b"old"), user("bob"), 800, 1, 900);
        assert_eq!(c.len(), 1, "an expired token is not stored");
        c.clear();
        assert!(c.is_empty());
        assert!(TokenCache::new(0).is_none());
    }

    #[test]
    fn the_size_stays_bounded() {
        let c = TokenCache::new(64).unwrap();
        for i in 0..10_000u32 {
            c.insert(TokenCache::key(&i.to_be_bytes()), user("u"), 10_000, 0, 1);
        }
        assert!(c.len() <= 64, "{}", c.len());
        // The newest is always kept.
        assert!(
            c.get(&TokenCache::key(&9_999u32.to_be_bytes()), 0, 2)
                .is_some()
        );
    }
}
