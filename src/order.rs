//! A won order, from the reservation to its recorded outcome: steps 8 and 9 of the request
//! path. The winner is forwarded with the `X-Flashgate-*` headers the backend trusts, and the
//! backend's answer decides the unit's fate — sold, released (the backend certainly did not
//! take the order) or uncertain. Whatever happens to the request meanwhile (the client goes
//! away, the task panics), the outcome is recorded: no unit stays `held`.
//!
//! The gate runs [`Won::forward`] as a task of its own (tracked by `App::bookkeeping`, so a
//! graceful shutdown waits for it) and awaits its answer, which the task hands over as soon
//! as the backend's response head is in. The same task then records a sold or uncertain
//! outcome: no second task per order.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request, Response};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::body::Body;
use crate::forward::{Again, ForwardError, Peer, Upstream};
use crate::ids::{ReservationId, Sku, UserId};
use crate::metrics::Metrics;
use crate::signing::Admission;
use crate::state::App;
use crate::store::{Record, ReleaseOutcome, Settlement, Store, record_retrying};

// Static names: `insert("x-flashgate-…")` with a `&str` would copy the name on every winner.
const X_RESERVATION: HeaderName = HeaderName::from_static("x-flashgate-reservation");
const X_SKU: HeaderName = HeaderName::from_static("x-flashgate-sku");
const X_USER: HeaderName = HeaderName::from_static("x-flashgate-user");
const X_QUANTITY: HeaderName = HeaderName::from_static("x-flashgate-quantity");
const X_SIGNATURE: HeaderName = HeaderName::from_static("x-flashgate-signature");

/// A buyer who won a reservation, on the way to the backend.
pub(crate) struct Won {
    pub app: Arc<App>,
    pub upstream: Arc<Upstream>,
    pub release_on_status: Vec<u16>,
    pub sku: Sku,
    pub user: UserId,
    pub quantity: u32,
    pub reservation: ReservationId,
}

impl Won {
    /// Steps 8 and 9: forward the winner, then record sold, released or uncertain. The
    /// backend's answer goes to `answer` once it is known: after a release (the buyer's retry
    /// must be able to win the unit back), before a settle (the buyer does not wait for
    /// bookkeeping; this task records it next).
    pub async fn forward(
        self,
        mut req: Request<Body>,
        peer: Peer,
        answer: oneshot::Sender<Result<Response<Body>, ForwardError>>,
    ) {
        let Won {
            app,
            upstream,
            release_on_status,
            sku,
            user,
            quantity,
            reservation,
        } = self;
        // From here on the reservation must end sold, released or uncertain, even if this
        // task is dropped (a runtime shutting down) or panics.
        let mut pending = Pending {
            store: app.store.clone(),
            metrics: app.metrics.clone(),
            counted: false,
            tasks: app.bookkeeping.clone(),
            sku: sku.clone(),
            reservation: reservation.clone(),
            on_drop: Some(Outcome::Settle(Settlement::Uncertain)),
        };

        // 8. Forward the winner with headers the backend can trust.
        let h = req.headers_mut();
        for (name, value) in [
            (X_RESERVATION, reservation.as_str()),
            (X_SKU, sku.as_str()),
            (X_USER, user.as_str()),
        ] {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
        h.insert(X_QUANTITY, HeaderValue::from(quantity));
        if let Some(key) = &app.signer {
            let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let path_and_query = upstream.forwarded_path(pq);
            let method = req.method().as_str().to_owned();
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let signature = key.sign(
                t,
                &Admission {
                    method: &method,
                    path_and_query: &path_and_query,
                    reservation: reservation.as_str(),
                    sku: sku.as_str(),
                    user: user.as_str(),
                    quantity,
                },
            );
            req.headers_mut().insert(X_SIGNATURE, signature);
        }
        let result = upstream.forward(req, peer, Again::Never).await;

        // 9. Outcome: sold, released (the backend certainly did not take it) or uncertain.
        let outcome = match &result {
            Ok(resp) if release_on_status.contains(&resp.status().as_u16()) => Outcome::Release,
            Ok(_) => Outcome::Settle(Settlement::Sold),
            Err(ForwardError::Connect(_)) => Outcome::Release,
            Err(
                ForwardError::Timeout(_)
                | ForwardError::Failed(_)
                | ForwardError::BadResponse(_)
                | ForwardError::ClientBody(_),
            ) => Outcome::Settle(Settlement::Uncertain),
        };
        outcome.count(&app.metrics);
        pending.counted = true;
        match outcome {
            Outcome::Release => {
                // Awaited: the buyer's retry must be able to win the unit back.
                pending.on_drop = Some(Outcome::Release);
                let released = app.store.release(&sku, &reservation).await;
                pending.done();
                match released {
                    Ok(released) => {
                        if let ReleaseOutcome::Released { remaining } = released {
                            app.stock_events.stock_set(&sku, remaining);
                        }
                        app.sold_out.clear(&sku);
                        info!(%sku, %reservation, "backend did not take the order: unit released");
                    }
                    Err(e) => {
                        warn!(%sku, %reservation, error = %e, "release failed: retrying in the background");
                        record_later(&app, sku, reservation, Record::Release);
                    }
                }
                // The buyer may be gone: nobody to tell.
                let _ = answer.send(result);
            }
            Outcome::Settle(to) => {
                if to == Settlement::Uncertain {
                    warn!(%sku, %reservation, %user, "backend outcome unknown: unit kept, reservation marked uncertain");
                }
                // The winner has the answer first; recording it is this task's next step (the
                // `Pending` guard still records it if the task ends early).
                let _ = answer.send(result);
                pending.on_drop = Some(Outcome::Settle(to));
                let recorded =
                    record_retrying(&*app.store, &sku, &reservation, Record::Settle(to)).await;
                pending.done();
                if let Err(e) = recorded {
                    warn!(%sku, %reservation, error = %e, "recording the order's outcome failed: reservation stays held");
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Release,
    Settle(Settlement),
}

impl Outcome {
    /// `flashgate_reservations_total{outcome}`, counted once the outcome is decided.
    fn count(self, metrics: &Metrics) {
        match self {
            Outcome::Release => metrics.reservation_released(),
            Outcome::Settle(to) => metrics.reservation(to),
        }
    }

    fn record(self) -> Record {
        match self {
            Outcome::Release => Record::Release,
            Outcome::Settle(to) => Record::Settle(to),
        }
    }
}

/// Records a reservation's outcome off the response path, retrying while the store is away;
/// tracked so a graceful shutdown waits for it.
fn record_later(app: &App, sku: Sku, reservation: ReservationId, what: Record) {
    spawn_record(app.store.clone(), &app.bookkeeping, sku, reservation, what);
}

fn spawn_record(
    store: Arc<dyn Store>,
    tasks: &TaskTracker,
    sku: Sku,
    reservation: ReservationId,
    what: Record,
) {
    tasks.spawn(async move {
        if let Err(e) = record_retrying(&*store, &sku, &reservation, what).await {
            warn!(%sku, %reservation, error = %e, "recording the order's outcome failed: reservation stays held");
        }
    });
}

/// A won reservation whose outcome (step 9) is not recorded yet. The winner's exchange runs
/// in its own task, so a client going away does not end it; if the task itself ends early (it
/// panicked, or the runtime is shutting down), the drop records `on_drop` off the response
/// path: `uncertain` while the order may be with the backend, `release` once the backend
/// refused it. Otherwise the unit would stay `held` for good and the buyer would be told
/// `already_purchased` for an order nobody knows about.
struct Pending {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// The outcome is in the metrics already (the drop came during a release).
    counted: bool,
    tasks: TaskTracker,
    sku: Sku,
    reservation: ReservationId,
    on_drop: Option<Outcome>,
}

impl Pending {
    /// Step 9 ran: nothing left to do on drop.
    fn done(&mut self) {
        self.on_drop = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(outcome) = self.on_drop.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (sku, reservation) = (self.sku.clone(), self.reservation.clone());
        warn!(%sku, %reservation, "request dropped mid-order (client gone): recording the outcome anyway");
        if !self.counted {
            outcome.count(&self.metrics);
        }
        spawn_record(
            self.store.clone(),
            &self.tasks,
            sku,
            reservation,
            outcome.record(),
        );
    }
}
