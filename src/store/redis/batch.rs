//! The queue every batch waits in: calls of one thread, by SKU ([`Batches`]), shared by
//! reserve batches ([`super::reserve`]) and settle batches ([`super::settle`]), and
//! [`same_error`], which hands one failure to every waiter of a batch.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::store::StoreError;

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

/// A copy of `e` for each waiter of a failed batch (`StoreError` is not `Clone`).
pub(super) fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Invalid(m) => StoreError::Invalid(m.clone()),
        StoreError::Protocol(m) => StoreError::Protocol(m.clone()),
    }
}
