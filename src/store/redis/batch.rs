//! The queue every batch waits in: calls of one thread, by SKU ([`Batches`]), shared by
//! reserve batches ([`super::reserve`]) and settle batches ([`super::settle`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Calls of one thread waiting to be sent together, by SKU (reserves and settles alike).
pub(super) struct Batches<W> {
    // A std mutex: held for a push or a take, never across `.await`.
    pending: Mutex<HashMap<String, Vec<W>>>,
}

impl<W> Default for Batches<W> {
    fn default() -> Self {
        Batches {
            pending: Mutex::new(HashMap::new()),
        }
    }
}

impl<W> Batches<W> {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<W>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a call; true when it starts a batch (its caller must see the batch sent).
    pub(super) fn push(&self, sku: &str, waiter: W) -> bool {
        let mut pending = self.lock();
        match pending.get_mut(sku) {
            Some(waiters) => {
                waiters.push(waiter);
                false
            }
            None => {
                pending.insert(sku.to_owned(), vec![waiter]);
                true
            }
        }
    }

    /// Takes up to `max` waiters of `sku`, oldest first; true if more are left (the queue
    /// then stays non-empty, so new arrivals wait for whoever takes the rest).
    pub(super) fn take(&self, sku: &str, max: usize) -> (Vec<W>, bool) {
        let mut pending = self.lock();
        let Some(waiters) = pending.get_mut(sku) else {
            return (Vec::new(), false);
        };
        if waiters.len() <= max {
            let all = pending.remove(sku).unwrap_or_default();
            return (all, false);
        }
        (waiters.drain(..max).collect(), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiters are plain numbers here: the queue does not look at them.
    fn queue() -> Batches<u32> {
        Batches::default()
    }

    #[test]
    fn only_the_first_waiter_of_a_sku_starts_a_batch() {
        let q = queue();
        assert!(q.push("tee", 1), "the first call starts the batch");
        assert!(!q.push("tee", 2), "later calls join it");
        assert!(!q.push("tee", 3));
    }

    #[test]
    fn each_sku_has_its_own_batch() {
        let q = queue();
        assert!(q.push("tee", 1));
        assert!(q.push("mug", 2), "another SKU starts its own batch");
        assert!(!q.push("tee", 3));
        assert_eq!(q.take("mug", usize::MAX), (vec![2], false));
        assert_eq!(q.take("tee", usize::MAX), (vec![1, 3], false));
    }

    #[test]
    fn take_hands_over_the_whole_batch_oldest_first_and_the_next_call_starts_anew() {
        let q = queue();
        for n in 1..=5 {
            q.push("tee", n);
        }
        assert_eq!(q.take("tee", 64), (vec![1, 2, 3, 4, 5], false));
        assert_eq!(q.take("tee", 64), (Vec::new(), false), "nothing is left");
        assert!(
            q.push("tee", 6),
            "after a take, the next call leads a new batch"
        );
    }

    #[test]
    fn take_of_a_sku_nobody_waits_for_is_empty() {
        assert_eq!(queue().take("tee", 64), (Vec::new(), false));
    }

    #[test]
    fn a_batch_over_the_cap_splits_and_new_calls_join_the_rest() {
        let q = queue();
        for n in 0..5 {
            q.push("tee", n);
        }
        assert_eq!(q.take("tee", 3), (vec![0, 1, 2], true), "more are left");
        // The rest stays queued for a successor, so a new call must not start another batch.
        assert!(!q.push("tee", 5), "the successor will take this one too");
        assert_eq!(q.take("tee", 3), (vec![3, 4, 5], false));
        assert!(q.push("tee", 6));
    }

    #[test]
    fn a_batch_exactly_at_the_cap_is_taken_whole() {
        let q = queue();
        for n in 0..3 {
            q.push("tee", n);
        }
        assert_eq!(q.take("tee", 3), (vec![0, 1, 2], false));
        assert!(q.push("tee", 3), "nothing was left, so this call leads");
    }
}
