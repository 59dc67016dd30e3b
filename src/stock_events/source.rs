//! One SKU's source: what this instance believes about the SKU's stock ([`State`]), the
//! `watch` channel every subscriber of the SKU reads, and the task that publishes changes at
//! most every [`COALESCE`], re-reads the store every [`REREAD_EVERY`] and sends the
//! heartbeat. Subscribers never call the store: one source per SKU does, for all of them.
//!
//! # Ordering updates without versions
//!
//! Updates arrive from several places at once, and the store gives no version to order them:
//! two buyers who won the 5th-last and 4th-last unit report `remaining: 5` and `remaining: 4`
//! from two tasks, in either order. So:
//!
//! - A **decision** (a reserve outcome) can only *lower* what is shown (`min`), and only if no
//!   **set** happened since the decision was asked for (its [`Ticket`]'s epoch). Between two
//!   sets stock only falls, so the smallest value seen is the newest.
//! - A **set** is this instance's own write whose result is the stock at that moment: an admin
//!   set/add, a release (`Released { remaining }`), a close or an open. It replaces the value
//!   and starts a new epoch, so decisions asked for before it are ignored (they may be older).
//! - A **re-read** (the store's `status`) is a set when nothing could make it stale: no
//!   decision landed while it was in flight, or the sale's *raise signature* — units ever
//!   `added`, units `released`, `closed` — changed since the last read (another instance or
//!   the operator raised stock, released a unit, closed or opened the sale). Otherwise it may
//!   only lower. That is how changes made through other instances are followed.
//!
//! A change made behind flashgate's back (a `SET` on the stock key in Redis) moves no
//! signature: it is followed at the next re-read during which no decision landed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use super::Registry;
use crate::ids::Sku;
use crate::store::{ReserveOutcome, SaleStatus};

/// At most one event per this long per SKU (so per subscriber): ~10 a second.
pub const COALESCE: Duration = Duration::from_millis(100);
/// How often a live source reads the store, to follow what this instance did not do itself.
pub const REREAD_EVERY: Duration = Duration::from_secs(1);
/// How often subscribers get a `: keep-alive` comment (so proxies keep the stream open).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
/// Bound on one store read (the store has its own shorter timeout and breaker).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What shoppers are told about a SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockState {
    Open,
    SoldOut,
    Closed,
    NotConfigured,
}

impl StockState {
    pub fn as_str(self) -> &'static str {
        match self {
            StockState::Open => "open",
            StockState::SoldOut => "sold_out",
            StockState::Closed => "closed",
            StockState::NotConfigured => "not_configured",
        }
    }
}

/// One event: `{"sku","remaining","state"}` (the SKU is the source's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub remaining: u64,
    pub state: StockState,
}

/// What a source believes: units left (`None`: not configured) and whether the operator
/// closed the sale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stock {
    pub remaining: Option<u64>,
    pub closed: bool,
}

impl Stock {
    pub fn event(self) -> Event {
        let state = match (self.closed, self.remaining) {
            (true, _) => StockState::Closed,
            (false, None) => StockState::NotConfigured,
            (false, Some(0)) => StockState::SoldOut,
            (false, Some(_)) => StockState::Open,
        };
        Event {
            remaining: self.remaining.unwrap_or(0),
            state,
        }
    }
}

/// The SSE frame of one event, written once per change and shared by every subscriber.
fn sse_frame(sku: &Sku, event: Event) -> Bytes {
    // A `Sku` is letters, digits, `.`, `_` and `-` only: nothing to escape in JSON.
    Bytes::from(format!(
        "data: {{\"sku\":\"{sku}\",\"remaining\":{},\"state\":\"{}\"}}\n\n",
        event.remaining,
        event.state.as_str()
    ))
}

/// Why a source could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The store has no stock for the SKU.
    NotConfigured,
    /// The store could not be read.
    Unavailable,
}

/// What the source's channel holds.
#[derive(Debug, Clone)]
pub enum Published {
    /// The first store read is under way.
    Loading,
    /// The first read failed; the source is gone.
    Failed(Failure),
    Live(Live),
}

#[derive(Debug, Clone)]
pub struct Live {
    pub event: Event,
    /// The event as an SSE frame.
    pub frame: Bytes,
    /// Bumped every [`HEARTBEAT_EVERY`]: a subscriber seeing it change with the same event
    /// writes a keep-alive comment.
    pub heartbeat: u32,
}

/// When an update was asked for: the epoch, and how many decisions had landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    epoch: u64,
    decided: u64,
}

/// What moves when stock is raised or the sale is closed or opened, through any instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    added: Option<u64>,
    released: u64,
    closed: bool,
}

/// The ordering rules of the module doc, as pure state (unit-tested below).
#[derive(Debug, Default)]
pub struct State {
    pub stock: Stock,
    /// Bumped by every set.
    epoch: u64,
    /// Decisions applied so far.
    decided: u64,
    /// The last applied read's.
    signature: Option<Signature>,
}

impl State {
    pub fn ticket(&self) -> Ticket {
        Ticket {
            epoch: self.epoch,
            decided: self.decided,
        }
    }

    /// A reserve outcome asked for at `ticket`.
    pub fn decided(&mut self, ticket: Ticket, outcome: &ReserveOutcome) {
        if ticket.epoch != self.epoch {
            return;
        }
        match outcome {
            ReserveOutcome::Won { remaining, .. } | ReserveOutcome::SoldOut { remaining } => {
                self.lower(*remaining);
            }
            ReserveOutcome::Closed => self.stock.closed = true,
            // Nothing about stock (the per-user limit), or a sale deleted under us (the
            // re-read tells).
            ReserveOutcome::AlreadyPurchased { .. } | ReserveOutcome::NotConfigured => return,
        }
        self.decided += 1;
    }

    fn lower(&mut self, remaining: u64) {
        let now = self.stock.remaining.map_or(remaining, |r| r.min(remaining));
        self.stock.remaining = Some(now);
    }

    /// This instance set the stock (admin set/add, a release): `remaining` is now true.
    pub fn set_remaining(&mut self, remaining: u64) {
        self.stock.remaining = Some(remaining);
        self.epoch += 1;
    }

    /// This instance closed or opened the sale.
    pub fn set_closed(&mut self, closed: bool) {
        self.stock.closed = closed;
        self.epoch += 1;
    }

    /// A store read asked for at `ticket`.
    pub fn read(&mut self, ticket: Ticket, status: &SaleStatus) {
        if ticket.epoch != self.epoch {
            // A set landed meanwhile; the next read will do.
            return;
        }
        let signature = Signature {
            added: status.added,
            released: status.units.released,
            closed: status.closed,
        };
        let quiet = ticket.decided == self.decided;
        let raised = self.signature != Some(signature);
        self.signature = Some(signature);
        if quiet || raised {
            self.stock = Stock {
                remaining: status.stock,
                closed: status.closed,
            };
            self.epoch += 1;
        } else if let Some(remaining) = status.stock {
            self.lower(remaining);
        }
    }
}

/// One SKU's source, shared by the registry, its task and the decisions that update it.
pub struct Source {
    pub sku: Sku,
    pub tx: watch::Sender<Published>,
    state: Mutex<State>,
    /// Rung by every update; the task publishes.
    changed: Notify,
}

impl Source {
    pub fn new(sku: Sku) -> Source {
        Source {
            sku,
            tx: watch::Sender::new(Published::Loading),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }

    /// Runs `f` on the state (a short critical section, never across an `.await`).
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn ticket(&self) -> Ticket {
        self.with(|s| s.ticket())
    }

    /// Applies an update and tells the task.
    pub fn update(&self, f: impl FnOnce(&mut State)) {
        self.with(f);
        self.changed.notify_one();
    }

    /// Publishes the current event if it differs from the one published last.
    fn publish(&self) -> bool {
        let event = self.with(|s| s.stock.event());
        self.tx.send_if_modified(|p| {
            let heartbeat = match p {
                Published::Live(live) if live.event == event => return false,
                Published::Live(live) => live.heartbeat,
                _ => 0,
            };
            *p = Published::Live(Live {
                event,
                frame: sse_frame(&self.sku, event),
                heartbeat,
            });
            true
        })
    }

    /// Reads the store and applies what it says: the stock read (`None`: not configured),
    /// or `Err` if the store could not be read in time.
    async fn reread(&self, registry: &Registry) -> Result<Option<u64>, ()> {
        let ticket = self.ticket();
        match tokio::time::timeout(READ_TIMEOUT, registry.store.status(&self.sku)).await {
            Ok(Ok(status)) => {
                self.with(|s| s.read(ticket, &status));
                Ok(status.stock)
            }
            Ok(Err(e)) => {
                debug!(sku = %self.sku, error = %e, "stock stream: store read failed");
                Err(())
            }
            Err(_) => Err(()),
        }
    }
}

/// The source's task: the first read, then publishing, re-reading and heartbeats until the
/// last subscriber leaves or the server shuts down.
pub async fn run(source: Arc<Source>, registry: Arc<Registry>) {
    let failure = match source.reread(&registry).await {
        Ok(Some(_)) => None,
        Ok(None) => Some(Failure::NotConfigured),
        Err(()) => Some(Failure::Unavailable),
    };
    if let Some(failure) = failure {
        // Every subscriber waiting for the first value gets this answer; the next one to
        // come starts a new source (and a new read).
        source.tx.send_replace(Published::Failed(failure));
        registry.remove(&source);
        return;
    }
    source.publish();
    let every = |period: Duration| {
        let mut t = tokio::time::interval_at(Instant::now() + period, period);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    };
    let (mut reread, mut heartbeat) = (every(REREAD_EVERY), every(HEARTBEAT_EVERY));
    loop {
        tokio::select! {
            biased;
            () = registry.cancel.cancelled() => return,
            () = source.tx.closed() => {
                if registry.remove_if_unused(&source) {
                    return;
                }
                continue;
            }
            () = source.changed.notified() => {}
            _ = reread.tick() => {
                let _ = source.reread(&registry).await;
            }
            _ = heartbeat.tick() => {
                source.tx.send_modify(|p| {
                    if let Published::Live(live) = p {
                        live.heartbeat = live.heartbeat.wrapping_add(1);
                    }
                });
                continue;
            }
        }
        if source.publish() {
            // Coalescing: changes meanwhile wait in the state (and ring `changed`, which
            // keeps one wake-up), and the newest goes out after the pause.
            tokio::select! {
                biased;
                () = registry.cancel.cancelled() => return,
                () = tokio::time::sleep(COALESCE) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ReservationId;
    use crate::store::StateCounts;

    fn status(stock: Option<u64>, added: u64, released: u64, closed: bool) -> SaleStatus {
        SaleStatus {
            sku: Sku::parse("tee").unwrap(),
            stock,
            added: Some(added),
            closed,
            buyers: 0,
            reservations: StateCounts::default(),
            units: StateCounts {
                released,
                ..StateCounts::default()
            },
        }
    }

    fn won(remaining: u64) -> ReserveOutcome {
        ReserveOutcome::Won {
            reservation: ReservationId::random(),
            remaining,
        }
    }

    fn live(stock: u64) -> State {
        let mut s = State::default();
        s.read(s.ticket(), &status(Some(stock), stock, 0, false));
        s
    }

    #[test]
    fn events() {
        let e = |remaining, closed| Stock { remaining, closed }.event();
        assert_eq!(e(Some(3), false).state, StockState::Open);
        assert_eq!(e(Some(0), false).state, StockState::SoldOut);
        assert_eq!(e(Some(3), true).state, StockState::Closed);
        assert_eq!(e(None, false).state, StockState::NotConfigured);
        assert_eq!(e(None, false).remaining, 0);
        let frame = sse_frame(&Sku::parse("tee").unwrap(), e(Some(3), false));
        assert_eq!(
            &frame[..],
            b"data: {\"sku\":\"tee\",\"remaining\":3,\"state\":\"open\"}\n\n"
        );
    }

    #[test]
    fn decisions_only_lower_whatever_order_they_land_in() {
        let mut s = live(10);
        let (a, b) = (s.ticket(), s.ticket());
        s.decided(b, &won(4));
        s.decided(a, &won(5));
        assert_eq!(s.stock.remaining, Some(4));
        s.decided(s.ticket(), &ReserveOutcome::SoldOut { remaining: 0 });
        assert_eq!(s.stock.event().state, StockState::SoldOut);
        s.decided(s.ticket(), &ReserveOutcome::AlreadyPurchased { held: 1 });
        assert_eq!(s.stock.remaining, Some(0));
    }

    #[test]
    fn a_set_makes_older_decisions_stale() {
        let mut s = live(0);
        let before = s.ticket();
        s.set_remaining(10);
        s.decided(before, &won(0));
        assert_eq!(s.stock.remaining, Some(10), "asked before the set: ignored");
        s.decided(s.ticket(), &won(9));
        assert_eq!(s.stock.remaining, Some(9));
        s.set_closed(true);
        assert_eq!(s.stock.event().state, StockState::Closed);
        assert_eq!(s.stock.event().remaining, 9);
        s.decided(s.ticket(), &ReserveOutcome::Closed);
        s.set_closed(false);
        assert_eq!(s.stock.event().state, StockState::Open);
    }

    #[test]
    fn a_quiet_read_is_the_truth_either_way() {
        let mut s = live(10);
        s.read(s.ticket(), &status(Some(25), 10, 0, false));
        assert_eq!(s.stock.remaining, Some(25), "raised behind our back");
        s.read(s.ticket(), &status(Some(3), 10, 0, false));
        assert_eq!(s.stock.remaining, Some(3));
        s.read(s.ticket(), &status(None, 10, 0, false));
        assert_eq!(s.stock.event().state, StockState::NotConfigured);
    }

    #[test]
    fn a_read_raced_by_decisions_only_lowers_unless_the_signature_moved() {
        let mut s = live(10);
        let t = s.ticket();
        s.decided(s.ticket(), &won(7));
        // Read before those decisions landed in the store: stale, not a raise.
        s.read(t, &status(Some(8), 10, 0, false));
        assert_eq!(s.stock.remaining, Some(7));
        let t = s.ticket();
        s.decided(s.ticket(), &won(6));
        s.read(t, &status(Some(5), 10, 0, false));
        assert_eq!(s.stock.remaining, Some(5), "lower is always fine");
        // Another instance added 20: `added` moved, so the read is a set.
        let t = s.ticket();
        s.decided(s.ticket(), &won(4));
        s.read(t, &status(Some(24), 30, 0, false));
        assert_eq!(s.stock.remaining, Some(24));
        // A release elsewhere moves `released`; a close elsewhere moves `closed`.
        let t = s.ticket();
        s.decided(s.ticket(), &won(23));
        s.read(t, &status(Some(24), 30, 1, true));
        assert_eq!(s.stock.event().state, StockState::Closed);
        assert_eq!(s.stock.remaining, Some(24));
    }

    #[test]
    fn a_read_that_a_set_overtook_is_dropped() {
        let mut s = live(10);
        let t = s.ticket();
        s.set_remaining(50);
        s.read(t, &status(Some(10), 10, 0, false));
        assert_eq!(s.stock.remaining, Some(50));
    }
}
