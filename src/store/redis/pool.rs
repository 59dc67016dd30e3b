//! The connections to Redis: one set per thread, each connection in a [`Slot`] that
//! (re)connects lazily, in a background task, and [`Shared::with_conn`], through which every
//! store call reaches Redis.
//!
//! - [`RedisStore::connect`] never fails because Redis is down: the proxy must
//!   start anyway, answer 503 on flash routes, and recover by itself.
//! - A connection that returned an I/O error or timed out is dropped; the next
//!   call starts a new connect attempt. A failed attempt blocks new attempts for
//!   [`RECONNECT_BACKOFF`], and calls in that window fail at once instead of
//!   each waiting for a timeout (a store outage must not become a per-request
//!   hang).
//! - The connect attempt runs in its own task, bounded by `connect_timeout`, so
//!   a caller giving up at `response_timeout` does not cancel it.
//!
//! We do not use redis-rs' `ConnectionManager`: it caches a failed connect
//! attempt forever unless the error is an I/O error (e.g. `LOADING` or an auth
//! error during the handshake would never heal), and its retry loop is not
//! bounded by our response timeout.
//!
//! Every call is bounded by `response_timeout` as a whole (waiting for a
//! connection included) and maps any connection trouble to
//! [`StoreError::Unavailable`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};
use thread_local::ThreadLocal;
use tokio::sync::Notify;
use tokio::time::Instant;

#[cfg(doc)]
use super::RedisStore;
use super::Shared;
use super::link::{Connector, Link};
use crate::store::StoreError;

/// After a failed connect attempt, a slot waits this long before the next one.
/// Calls in between fail fast with `Unavailable`.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// The connections, one set per thread. A multiplexed connection's driver task lives on the
/// runtime that opened it; shared across the per-core runtimes, every reservation would hop to
/// another thread and back. Each serving thread opens its own `size` connections on first use.
pub(super) struct Pool {
    connector: Connector,
    connect_timeout: Duration,
    size: usize,
    per_thread: ThreadLocal<Vec<Arc<Slot>>>,
    /// Bumped whenever any connection is found dead. Every thread's connections older than
    /// the current epoch are then dropped before use: after a Redis restart, a thread that
    /// has been quiet must not spend a buyer's request discovering its connection is gone.
    epoch: Arc<AtomicU64>,
}

impl Pool {
    pub(super) fn new(connector: Connector, connect_timeout: Duration, size: usize) -> Pool {
        Pool {
            connector,
            connect_timeout,
            size,
            per_thread: ThreadLocal::new(),
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    /// How many connections each thread opens.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Connect this thread's slots now, in parallel, so the first buyers do not pay for it.
    /// Failures are fine (Redis may come later); each attempt is bounded by
    /// `connect_timeout`. Serving threads connect their own slots on first use.
    pub(super) async fn warm_up(&self) {
        let mut warmups = tokio::task::JoinSet::new();
        for slot in self.slots() {
            warmups.spawn(Arc::clone(slot).connection());
        }
        while warmups.join_next().await.is_some() {}
    }

    /// Whether this thread has asked for its connections yet (tests: did a call reach for
    /// Redis at all?).
    #[cfg(test)]
    pub(super) fn opened_on_this_thread(&self) -> bool {
        self.per_thread.get().is_some()
    }

    fn slots(&self) -> &[Arc<Slot>] {
        self.per_thread.get_or(|| {
            (0..self.size)
                .map(|index| {
                    Arc::new(Slot {
                        index,
                        connector: self.connector.clone(),
                        connect_timeout: self.connect_timeout,
                        state: Mutex::new(SlotState::default()),
                        changed: Notify::new(),
                        epoch: self.epoch.clone(),
                    })
                })
                .collect()
        })
    }
}

impl Shared {
    /// Run `op` on the next connection (round-robin), the whole thing bounded
    /// by `response_timeout`. A connection that failed or timed out is
    /// dropped so the next call reconnects.
    pub(super) async fn with_conn<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let slots = self.pool.slots();
        let n = self.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        let mut slot = &slots[n];
        let mut used: Option<u64> = None;
        let outcome = tokio::time::timeout(self.response_timeout, async {
            let conn = match Arc::clone(slot).connection().await {
                Ok(conn) => conn,
                // This slot is in its reconnect backoff, but Redis may already
                // be back: borrow a sibling's live connection if there is one.
                Err(e) => {
                    let (other, conn) = self.live_sibling(n).ok_or(e)?;
                    slot = other;
                    conn
                }
            };
            used = Some(conn.id);
            op(conn.inner).await.map_err(|e| {
                if drops_connection(&e) {
                    slot.forget(conn.id);
                }
                map_redis_error(e)
            })
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_elapsed) => {
                // No answer in time: the server may be stopped or the link
                // half-open. Start over on a fresh connection next time.
                if let Some(id) = used {
                    slot.forget(id);
                }
                Err(StoreError::Unavailable(format!(
                    "redis did not answer within {:?}",
                    self.response_timeout
                )))
            }
        }
    }

    /// Any other slot's current connection, without waiting.
    fn live_sibling(&self, skip: usize) -> Option<(&Arc<Slot>, Conn)> {
        let slots = self.pool.slots();
        let n = slots.len();
        (1..n)
            .map(|k| &slots[(skip + k) % n])
            .find_map(|slot| slot.current().map(|conn| (slot, conn)))
    }
}

/// One lazily (re)connected multiplexed connection.
struct Slot {
    index: usize,
    connector: Connector,
    connect_timeout: Duration,
    /// A std mutex: held only for a few field updates, never across `.await`.
    state: Mutex<SlotState>,
    /// Wakes callers waiting for a connect attempt to finish.
    changed: Notify,
    /// The pool's epoch (see [`Pool::epoch`]).
    epoch: Arc<AtomicU64>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Conn>,
    /// A connect task is running.
    connecting: bool,
    /// No new connect attempt before this instant (set after a failure).
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Ids tell a stale connection apart from its replacement in `forget`.
    next_id: u64,
}

#[derive(Clone)]
struct Conn {
    id: u64,
    /// The pool epoch the connection was opened in.
    epoch: u64,
    inner: Link,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        // Nothing panics while the lock is held; a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current connection, if any (and not from an older epoch).
    fn current(&self) -> Option<Conn> {
        let mut st = self.state();
        self.drop_stale(&mut st);
        st.conn.clone()
    }

    fn drop_stale(&self, st: &mut SlotState) {
        let epoch = self.epoch.load(Ordering::Acquire);
        if st.conn.as_ref().is_some_and(|c| c.epoch < epoch) {
            st.conn = None;
        }
    }

    /// The current connection, or wait for a connect attempt (starting one if
    /// none is running and the backoff has passed). Callers bound the wait.
    async fn connection(self: Arc<Self>) -> Result<Conn, StoreError> {
        loop {
            let notified = self.changed.notified();
            {
                let mut st = self.state();
                self.drop_stale(&mut st);
                if let Some(conn) = &st.conn {
                    return Ok(conn.clone());
                }
                if !st.connecting {
                    if let Some(at) = st.retry_at
                        && Instant::now() < at
                    {
                        return Err(StoreError::Unavailable(format!(
                            "redis unreachable: {}",
                            st.last_error.as_deref().unwrap_or("connect failed")
                        )));
                    }
                    st.connecting = true;
                    tokio::spawn(Arc::clone(&self).connect_task());
                }
                // `notified` was created under the lock, before the connect
                // task can publish its result, so no wake-up is missed.
            }
            notified.await;
            // Re-check: either a connection now exists, or the attempt
            // failed and `retry_at` makes the next pass return the error.
        }
    }

    /// One connect attempt, in its own task so a caller's timeout cannot
    /// cancel it halfway.
    async fn connect_task(self: Arc<Self>) {
        // Whatever happens (even a panic in the client), clear `connecting`
        // and wake the waiters, or they would wait for a result that never comes.
        struct Done<'a>(&'a Slot);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.state().connecting = false;
                self.0.changed.notify_waiters();
            }
        }
        let _done = Done(&self);

        let attempt = tokio::time::timeout(self.connect_timeout, self.connector.connect()).await;
        let mut st = self.state();
        match attempt {
            Ok(Ok(inner)) => {
                let id = st.next_id;
                st.next_id += 1;
                let epoch = self.epoch.load(Ordering::Acquire);
                st.conn = Some(Conn { id, epoch, inner });
                st.retry_at = None;
                if st.last_error.take().is_some() {
                    tracing::info!(slot = self.index, "redis connection restored");
                }
            }
            Ok(Err(e)) => self.failed(&mut st, e.to_string()),
            Err(_) => self.failed(
                &mut st,
                format!("connect timed out after {:?}", self.connect_timeout),
            ),
        }
        // Unlock before `_done` runs (it takes the lock again).
        drop(st);
    }

    fn failed(&self, st: &mut SlotState, error: String) {
        if st.last_error.as_deref() != Some(error.as_str()) {
            tracing::warn!(slot = self.index, %error, "redis connect failed");
        }
        st.retry_at = Some(Instant::now() + RECONNECT_BACKOFF);
        st.last_error = Some(error);
    }

    /// Drop connection `id` (if it is still the current one) so the next
    /// call reconnects.
    fn forget(&self, id: u64) {
        if !self.connector.replace_on_failure() {
            return;
        }
        let mut st = self.state();
        if st.conn.as_ref().is_some_and(|c| c.id == id) {
            st.conn = None;
            // Whatever killed this connection (a restart, a stall) killed its siblings on
            // the other threads too.
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Whether an error means the connection itself is unusable.
fn drops_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error()
}

/// Connection trouble and transient server states are `Unavailable` (the
/// proxy answers 503 and retries later); anything else is a protocol error.
fn map_redis_error(e: RedisError) -> StoreError {
    let transient = match e.kind() {
        ErrorKind::Io | ErrorKind::AuthenticationFailed | ErrorKind::ClusterConnectionNotFound => {
            true
        }
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::NoScript
        ),
        // BUSY: another script is running too long on the server.
        ErrorKind::Extension => e.code() == Some("BUSY"),
        _ => false,
    };
    if transient {
        StoreError::Unavailable(format!("redis: {e}"))
    } else {
        StoreError::Protocol(format!("redis: {e}"))
    }
}
