//! Hearing the other instances: applies the shared store's stock events
//! ([`crate::store::StoreEvent`]) to this instance's own state, so stock raised, a sale
//! reopened or the last unit sold through any instance (or the CLI) is known here at once:
//! the local sold-out flag (`sale::SoldOut`) is set or cleared, and shoppers' stock streams
//! (`stock_events`) move. The flag's `sold_out_recheck` stays the fallback when a message is
//! lost; a (re)subscription clears every flag, since messages may have been missed.
//!
//! Owns the follower task and its stop signal ([`Fleet`]); the embedded store has no other
//! instances to hear.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::state::App;
use crate::store::StoreEvent;

/// How long a sold-out flag set by another instance's event lasts when no sale route says
/// (the longest `sold_out_recheck` of the current routes is used otherwise).
const DEFAULT_RECHECK: Duration = Duration::from_secs(1);

/// The follower's stop signal (the drain ends it).
#[derive(Default)]
pub struct Fleet {
    stop: CancellationToken,
}

impl Fleet {
    /// Follow `events` on behalf of `app` until [`Fleet::shutdown`] or the app is gone.
    pub fn follow(&self, app: &Arc<App>, mut events: mpsc::Receiver<StoreEvent>) {
        let app: Weak<App> = Arc::downgrade(app);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = stop.cancelled() => None,
                };
                let (Some(event), Some(app)) = (event, app.upgrade()) else {
                    return;
                };
                apply(&app, event);
            }
        });
    }

    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

/// One event, applied to this instance's flags and streams.
pub fn apply(app: &App, event: StoreEvent) {
    tracing::debug!(?event, "stock event from the store");
    match event {
        StoreEvent::Stock { sku, remaining: 0 } => {
            app.sold_out.mark(&sku, longest_recheck(app));
            app.stock_events.stock_set(&sku, 0);
        }
        StoreEvent::Stock { sku, remaining } => {
            app.sold_out.clear(&sku);
            app.stock_events.stock_set(&sku, remaining);
        }
        StoreEvent::Closed { sku, closed } => {
            if !closed {
                app.sold_out.clear(&sku);
            }
            app.stock_events.closed(&sku, closed);
        }
        StoreEvent::Resync => app.sold_out.clear_all(),
    }
}

fn longest_recheck(app: &App) -> Duration {
    app.snapshot()
        .routes
        .iter()
        .filter_map(|r| r.route.sale.as_ref())
        .map(|s| s.sold_out_recheck)
        .max()
        .unwrap_or(DEFAULT_RECHECK)
}
