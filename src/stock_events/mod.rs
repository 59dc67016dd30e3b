//! The stock stream for shoppers: a sale route may name `sale.stock_events`
//! (`/api/flash/{sku}/events`), and flashgate serves that path itself, on the proxy port, as
//! `text/event-stream`: `data: {"sku","remaining","state"}` on connect and on every change,
//! `state` one of `open`, `sold_out`, `closed`, `not_configured`.
//!
//! - **One source per SKU** ([`source::Source`]), however many subscribers: a registry maps
//!   each SKU with subscribers to its source. A new source reads the store once (`status`) for
//!   its first value; subscribers arriving meanwhile wait for that one read. The source leaves
//!   the registry when its last subscriber does; at most [`MAX_SOURCES`] SKUs have one.
//! - **Updates** come from this instance's own decisions — reserve outcomes (`gate.rs`, through
//!   [`StockEvents::probe`] and [`StockEvents::decided`]), releases (`order.rs`), the admin
//!   API's stock set/add and close/open — and, for whatever this instance did not do itself
//!   (other instances, settles, the operator in Redis), a re-read of the store every
//!   [`source::REREAD_EVERY`] per live SKU. `source.rs` says how they are ordered.
//! - **Coalescing**: a source publishes at most once per [`source::COALESCE`] (100 ms), always
//!   its newest value, never the same event twice; a subscriber that fell behind skips to the
//!   newest (a `watch` channel keeps one value, shared). So nothing queues per subscriber.
//! - **The wire** (`stream.rs`): each event is formatted once per change and shared by every
//!   subscriber; a `: keep-alive` comment every [`source::HEARTBEAT_EVERY`].
//!
//! On HTTP/1.1 the server takes the connection out of hyper once the response head is out
//! and writes the events itself, keeping only the socket and the subscription (see
//! `server/detach.rs`): an idle subscriber costs about what a parked keep-alive connection
//! costs. A shutdown ends every stream (the drain does not wait for them).

mod source;
mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use crate::ids::Sku;
use crate::reject::Reject;
use crate::store::{ReserveOutcome, Store, StoreError};
use source::{Failure, Published, Source, Ticket};

pub use source::{COALESCE, Event, HEARTBEAT_EVERY, REREAD_EVERY, StockState};
pub use stream::{Paths, Subscription, answer};

/// Most SKUs with a live source at once; a subscriber to one more gets 503 `overloaded`.
pub const MAX_SOURCES: usize = 1024;

/// The registry of sources, in `App`: lives across reloads (subscribers keep their stream).
pub struct StockEvents {
    registry: Arc<Registry>,
}

pub struct Registry {
    store: Arc<dyn Store>,
    sources: RwLock<HashMap<Sku, Arc<Source>>>,
    /// `sources.len()`, read without the lock: a reserve on a SKU nobody watches pays one
    /// atomic load.
    live: AtomicUsize,
    /// Cancelled on shutdown: sources stop, and their subscribers' streams end.
    cancel: CancellationToken,
}

/// A source found before a reserve, with the moment it was asked (see `source.rs`).
pub struct Probe {
    source: Arc<Source>,
    ticket: Ticket,
}

impl StockEvents {
    pub fn new(store: Arc<dyn Store>) -> StockEvents {
        StockEvents {
            registry: Arc::new(Registry {
                store,
                sources: RwLock::new(HashMap::new()),
                live: AtomicUsize::new(0),
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// Subscribes to `sku`: its live source, or a new one once its first store read is in.
    /// 404 `not_configured` for a SKU without stock, 503 `unavailable` when the store cannot
    /// be read (or the server is shutting down), 503 `overloaded` past [`MAX_SOURCES`].
    pub async fn subscribe(&self, sku: Sku) -> Result<Subscription, Reject> {
        let mut rx = self.registry.subscribe(&sku)?;
        // In a block: the guard `wait_for` returns must be gone before `rx` moves on.
        let failure = {
            let first = tokio::time::timeout(
                source::READ_TIMEOUT * 2,
                rx.wait_for(|p| !matches!(p, Published::Loading)),
            )
            .await;
            match first {
                Ok(Ok(published)) => match &*published {
                    Published::Failed(f) => Some(*f),
                    _ => None,
                },
                // Shut down, or a read that outlived its own timeout.
                Ok(Err(_)) | Err(_) => Some(Failure::Unavailable),
            }
        };
        match failure {
            None => Ok(Subscription::new(rx)),
            Some(Failure::NotConfigured) => Err(Reject::NotConfigured {
                sku: sku.to_string(),
            }),
            Some(Failure::Unavailable) => Err(Reject::Unavailable),
        }
    }

    /// Before a reserve on `sku`: its live source, if any, and the moment. `None` (one atomic
    /// load) when no SKU is watched.
    pub fn probe(&self, sku: &Sku) -> Option<Probe> {
        let source = self.registry.find(sku)?;
        let ticket = source.ticket();
        Some(Probe { source, ticket })
    }

    /// After a reserve: what it decided moves the stream (an error says nothing).
    pub fn decided(&self, probe: Option<Probe>, outcome: &Result<ReserveOutcome, StoreError>) {
        if let (Some(p), Ok(outcome)) = (probe, outcome) {
            p.source.update(|s| s.decided(p.ticket, outcome));
        }
    }

    /// This instance set `sku`'s stock to `remaining` (admin set or add, a release).
    pub fn stock_set(&self, sku: &Sku, remaining: u64) {
        if let Some(source) = self.registry.find(sku) {
            source.update(|s| s.set_remaining(remaining));
        }
    }

    /// This instance closed (or reopened) `sku`'s sale.
    pub fn closed(&self, sku: &Sku, closed: bool) {
        if let Some(source) = self.registry.find(sku) {
            source.update(|s| s.set_closed(closed));
        }
    }

    /// Ends every stream and refuses new ones: called when the server starts draining, so
    /// open streams do not hold the drain until its timeout.
    pub fn shutdown(&self) {
        self.registry.cancel.cancel();
        self.registry.sources_mut().clear();
        self.registry.live.store(0, Ordering::Release);
    }

    /// SKUs with a live source.
    pub fn sources(&self) -> usize {
        self.registry.live.load(Ordering::Acquire)
    }

    /// Subscribers of `sku` (0 without a live source).
    pub fn subscribers(&self, sku: &Sku) -> usize {
        self.registry.find(sku).map_or(0, |s| s.tx.receiver_count())
    }
}

impl Registry {
    fn sources(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Sku, Arc<Source>>> {
        // Held for a lookup or an insert, never across an `.await`.
        self.sources.read().unwrap_or_else(|p| p.into_inner())
    }

    fn sources_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Sku, Arc<Source>>> {
        self.sources.write().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, sku: &Sku) -> Option<Arc<Source>> {
        if self.live.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.sources().get(sku).cloned()
    }

    /// A receiver of `sku`'s source, starting the source if there is none. Under the lock,
    /// so a source never leaves the registry between being found and being subscribed to.
    fn subscribe(
        self: &Arc<Self>,
        sku: &Sku,
    ) -> Result<tokio::sync::watch::Receiver<Published>, Reject> {
        if self.cancel.is_cancelled() {
            return Err(Reject::Unavailable);
        }
        if let Some(source) = self.sources().get(sku) {
            return Ok(source.tx.subscribe());
        }
        let mut sources = self.sources_mut();
        if let Some(source) = sources.get(sku) {
            return Ok(source.tx.subscribe());
        }
        if sources.len() >= MAX_SOURCES {
            return Err(Reject::Overloaded);
        }
        let source = Arc::new(Source::new(sku.clone()));
        let rx = source.tx.subscribe();
        sources.insert(sku.clone(), source.clone());
        self.live.store(sources.len(), Ordering::Release);
        tokio::spawn(source::run(source, self.clone()));
        Ok(rx)
    }

    /// Takes `source` out of the registry (if it is still the SKU's).
    fn remove(&self, source: &Arc<Source>) {
        let mut sources = self.sources_mut();
        if sources
            .get(&source.sku)
            .is_some_and(|s| Arc::ptr_eq(s, source))
        {
            sources.remove(&source.sku);
            self.live.store(sources.len(), Ordering::Release);
        }
    }

    /// Takes `source` out if nobody subscribes to it; `false` if someone just did.
    fn remove_if_unused(&self, source: &Arc<Source>) -> bool {
        let mut sources = self.sources_mut();
        if source.tx.receiver_count() > 0 {
            return false;
        }
        if sources
            .get(&source.sku)
            .is_some_and(|s| Arc::ptr_eq(s, source))
        {
            sources.remove(&source.sku);
            self.live.store(sources.len(), Ordering::Release);
        }
        true
    }
}
