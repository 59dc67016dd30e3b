//! Hearing the other instances: applies the shared store's stock events
//! ([`crate::store::StoreEvent`]) to this instance's own state, so stock raised or a sale
//! reopened through any instance (or the CLI) is known here at once: the local sold-out flag
//! (`sale::SoldOut`) is cleared, and shoppers' stock streams (`stock_events`) move (also when
//! the last unit is sold elsewhere). The flag's `sold_out_recheck` stays the fallback when a
//! message is lost; a (re)subscription clears every flag, since messages may have been missed.
//!
//! Owns the follower task and its stop signal ([`Fleet`]); the embedded store has no other
//! instances to hear.

use std::sync::{Arc, Weak};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::state::App;
use crate::store::StoreEvent;

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
        // Sold out elsewhere: only the streams move. The flag is set by this instance's own
        // next reserve (one store call): units still held may come back, and a flag set from
        // an event could outlive the release that returns them.
        StoreEvent::Stock { sku, remaining: 0 } => app.stock_events.stock_set(&sku, 0),
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
