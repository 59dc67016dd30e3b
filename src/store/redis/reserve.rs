//! Reserve batches: reserves arriving on one thread within the same scheduler turn go to
//! Redis as one `reserve.lua` call that decides each buyer in turn (see
//! [`Shared::reserve_inner`]): every decision is still atomic and sees the ones before it,
//! and a busy sale costs one round trip per batch rather than one per buyer. On one Redis
//! server a batch holds every SKU's buyers (a sale of many SKUs batches as well as a sale of
//! one); on a Redis Cluster, one SKU's (a script runs on one slot). The call runs
//! in its own task, so a buyer who disconnects mid-call cannot strand a unit: a unit won for
//! a buyer who is gone is cancelled at once (the [`Reply`] guard, [`Shared::cancel_later`]).
//!
//! A timeout on `reserve` is ambiguous: the script may have run, or may still
//! run later (a stalled server executes what is queued in its sockets when it
//! thaws). We report `Unavailable` (the buyer gets 503, never a forward), and
//! cancel the batch's reservations in the background, retrying until Redis answers:
//! `release.lua` in `cancel` mode returns a held unit, or leaves a tombstone
//! that makes a late-running reserve with that id fail. Otherwise the unit
//! would stay `held` with nobody behind it, and the buyer, told to retry,
//! would be told `already_purchased`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::Value;

use super::batch::Batches;
use super::reply::reserve_outcome;
use super::scripts::keys_cmd;
use super::{Mode, Shared};
use crate::store::{
    ReleaseOutcome, ReservationId, ReserveOutcome, ReserveRequest, Sku, StoreError, UserId,
    new_reservation_id, retry_while_unavailable, validate_reserve,
};

/// Most buyers decided in one `reserve.lua` call. Bounds how long one script holds Redis
/// (each decision is a handful of hash operations, ~10 µs for the lot at this size); a
/// bigger queue is split over several calls.
const RESERVE_BATCH_MAX: usize = 64;

impl Shared {
    /// Reserves are batched per SKU and thread: the first buyer of a batch spawns a task
    /// that waits one scheduler turn (every request that is ready runs first and joins),
    /// then sends the whole batch as one `reserve.lua` call, which decides each buyer in
    /// turn. At one call per batch instead of per buyer, Redis and this process spend their
    /// time on decisions rather than on round trips.
    ///
    /// The batch runs in its own task, so a buyer who goes away mid-call (hyper drops the
    /// request future) cannot lose a reply: a unit won for nobody is released at once.
    pub(super) async fn reserve_inner(
        self: &Arc<Self>,
        req: &ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        validate_reserve(req)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = ReserveWaiter {
            sku: req.sku.clone(),
            user: req.user.clone(),
            quantity: req.quantity,
            per_user_limit: req.per_user_limit,
            reservation: new_reservation_id(),
            tx,
        };
        let (shared, sku) = (Arc::clone(self), req.sku.clone());
        let mut reply = Reply::new(rx, move |id| {
            shared.cancel_later(&sku, &id, "buyer left as the reservation was answered");
        });
        let queue = Arc::clone(self.reserves.get_or_default());
        let batch = if self.mixed_batches {
            ""
        } else {
            req.sku.as_str()
        };
        if queue.push(batch, waiter) {
            spawn_reserve_batch(Arc::clone(self), queue, batch.to_owned());
        }
        reply.recv().await
    }

    /// One `reserve.lua` call for up to [`RESERVE_BATCH_MAX`] buyers, grouped by SKU (in order
    /// of each SKU's first buyer; each SKU's buyers in arrival order).
    async fn reserve_call(self: &Arc<Self>, waiters: Vec<ReserveWaiter>) {
        // A buyer who left before the batch went out is not reserved for at all.
        let mut groups: Vec<(Sku, Vec<ReserveWaiter>)> = Vec::new();
        for w in waiters.into_iter().filter(|w| !w.tx.is_closed()) {
            match groups.iter_mut().find(|(sku, _)| *sku == w.sku) {
                Some((_, group)) => group.push(w),
                None => groups.push((w.sku.clone(), vec![w])),
            }
        }
        if groups.is_empty() {
            return;
        }
        let keys: Vec<_> = groups.iter().map(|(sku, _)| self.keys(sku)).collect();
        let key_refs: Vec<&str> = keys.iter().flat_map(|k| k.script_keys()).collect();
        // Several SKUs: the group sizes go first (see `lua/reserve.lua`).
        let sizes: Vec<usize> = if groups.len() > 1 {
            groups.iter().map(|(_, g)| g.len()).collect()
        } else {
            Vec::new()
        };
        let waiters: Vec<ReserveWaiter> = groups.into_iter().flat_map(|(_, g)| g).collect();
        // One buffer for the whole command; integers are written in place.
        let bytes = waiters
            .iter()
            .map(|w| w.user.as_str().len() + 48)
            .sum::<usize>();
        let args = sizes.len() + waiters.len() * 4;
        let mut cmd = keys_cmd(&self.reserve, &key_refs, args, bytes + sizes.len() * 8);
        for n in sizes {
            cmd.arg(n);
        }
        for w in &waiters {
            cmd.arg(w.user.as_str().as_bytes())
                .arg(w.quantity)
                .arg(w.per_user_limit)
                .arg(w.reservation.as_str().as_bytes());
        }
        let sent = AtomicBool::new(false);
        let (reply, unreplicated) = match self.replication {
            None => (
                self.run_script_tracked(&self.reserve, cmd, &sent).await,
                None,
            ),
            Some(wait) => {
                match self
                    .run_script_replicated(&self.reserve, cmd, &sent, wait)
                    .await
                {
                    Ok((reply, acks)) if acks >= u64::from(wait.replicas) => (Ok(reply), None),
                    Ok((reply, acks)) => (
                        Ok(reply),
                        Some(StoreError::Unavailable(format!(
                            "reservation not replicated: {acks} of {} replicas acknowledged \
                             it within {:?}",
                            wait.replicas, wait.timeout
                        ))),
                    ),
                    Err(e) => (Err(e), None),
                }
            }
        };
        let replies = match reply {
            Ok(Value::Array(items)) if items.len() == waiters.len() => items,
            Ok(other) => {
                // Nothing we understand: the buyers get 503; if any unit was taken, the
                // cancel below returns it.
                let e = StoreError::Protocol(format!("reserve answered {other:?}"));
                self.fail_batch(waiters, &e, true);
                return;
            }
            Err(e) => {
                // Without a reply the script may have run (or may still run, queued in a
                // stalled server): cancel every reservation of the batch.
                let ambiguous =
                    matches!(e, StoreError::Unavailable(_)) && sent.load(Ordering::Relaxed);
                self.fail_batch(waiters, &e, ambiguous);
                return;
            }
        };
        for (w, reply) in waiters.into_iter().zip(replies) {
            let mut outcome = reserve_outcome(reply, w.reservation);
            // Won, but a failover now could forget it (`store.wait_replicas`): never forward
            // it; give the unit back and tell the buyer to retry.
            if let (Some(e), Ok(ReserveOutcome::Won { reservation, .. })) =
                (&unreplicated, &outcome)
            {
                self.cancel_later(&w.sku, reservation, "reservation not on enough replicas");
                outcome = Err(e.clone());
            }
            if let Err(Ok(ReserveOutcome::Won { reservation, .. })) = w.tx.send(outcome) {
                // The buyer left while the script ran: nobody will forward this unit.
                self.cancel_later(
                    &w.sku,
                    &reservation,
                    "buyer left before the reservation was answered",
                );
            }
        }
    }

    fn fail_batch(self: &Arc<Self>, waiters: Vec<ReserveWaiter>, e: &StoreError, cancel: bool) {
        for w in waiters {
            if cancel {
                self.cancel_later(&w.sku, &w.reservation, "reserve got no usable reply");
            }
            let _ = w.tx.send(Err(e.clone()));
        }
    }

    /// A reserve sent with reservation `id` failed without a reply: the buyer is told 503
    /// and never forwarded, so whatever that reserve did (or will do, if it is still queued
    /// in a stalled server) must be undone. Retries in the background until Redis answers.
    fn cancel_later(self: &Arc<Self>, sku: &Sku, id: &ReservationId, why: &'static str) {
        let store = Arc::clone(self);
        let (sku, id) = (sku.clone(), id.clone());
        tracing::warn!(%sku, reservation = %id, why, "cancelling a reservation in the background");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(%sku, reservation = %id, "no runtime left to cancel the reservation: it stays held");
            return;
        };
        runtime.spawn(async move {
            let cancelled =
                retry_while_unavailable(|| store.release_inner(&sku, &id, Mode::Cancel)).await;
            match cancelled {
                Ok(ReleaseOutcome::Released { .. }) => {
                    tracing::info!(%sku, reservation = %id, "cancelled reservation had run: unit released");
                }
                Ok(ReleaseOutcome::NotHeld { .. }) => {}
                Err(e) => {
                    tracing::warn!(%sku, reservation = %id, error = %e, "cancelling a reservation failed");
                }
            }
        });
    }
}

/// The buyer's end of a reserve batch's reply. The batch task's `send` can succeed in the
/// very moment the buyer's future is dropped (the client went away, or a timeout fired): then
/// the reply sits in the channel and nobody reads it. Dropped unread, this guard closes the
/// channel — from then on the batch's `send` fails and the batch cancels the unit itself — and
/// takes out a reply that already arrived, cancelling a unit won for nobody. Either way no
/// `Won` is lost and no unit stays `held`.
struct Reply {
    rx: Option<ReplyReceiver>,
    /// Cancels a reservation won for nobody (by id); runs at most once.
    on_unread: Option<Box<dyn FnOnce(ReservationId) + Send>>,
}

type ReplyReceiver = tokio::sync::oneshot::Receiver<Result<ReserveOutcome, StoreError>>;

impl Reply {
    fn new(rx: ReplyReceiver, on_unread: impl FnOnce(ReservationId) + Send + 'static) -> Reply {
        Reply {
            rx: Some(rx),
            on_unread: Some(Box::new(on_unread)),
        }
    }

    async fn recv(&mut self) -> Result<ReserveOutcome, StoreError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(StoreError::Unavailable("reserve reply already read".into()));
        };
        let reply = rx.await;
        // Read: from here the caller owns the outcome.
        self.rx = None;
        reply.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "reserve batch abandoned before it was answered".into(),
            ))
        })
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        rx.close();
        if let (Ok(Ok(ReserveOutcome::Won { reservation, .. })), Some(cancel)) =
            (rx.try_recv(), self.on_unread.take())
        {
            cancel(reservation);
        }
    }
}

/// One buyer waiting in a reserve batch.
pub(super) struct ReserveWaiter {
    sku: Sku,
    user: UserId,
    quantity: u32,
    per_user_limit: u32,
    /// Chosen before the call, so a batch whose reply is lost can be cancelled by id.
    reservation: ReservationId,
    tx: tokio::sync::oneshot::Sender<Result<ReserveOutcome, StoreError>>,
}

/// The task that sends one batch: it waits one scheduler turn so the requests that are
/// ready join, then takes the batch (leaving a successor for what does not fit) and sends it.
/// `batch` names the queue: `""` (every SKU) on one server, the SKU on a cluster.
fn spawn_reserve_batch(store: Arc<Shared>, queue: Arc<Batches<ReserveWaiter>>, batch: String) {
    tokio::spawn(async move {
        tokio::task::yield_now().await;
        let (waiters, more) = queue.take(&batch, RESERVE_BATCH_MAX);
        if more {
            spawn_reserve_batch(Arc::clone(&store), queue, batch.clone());
        }
        store.reserve_call(waiters).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use super::super::RedisConfig;
    use super::super::pool::Pool;

    fn rid(n: u128) -> ReservationId {
        ReservationId::from_number(n)
    }

    fn tee() -> Sku {
        Sku::parse("tee").unwrap()
    }

    fn won(n: u128) -> Result<ReserveOutcome, StoreError> {
        Ok(ReserveOutcome::Won {
            reservation: rid(n),
            remaining: 0,
        })
    }

    /// A `Reply` whose cancellations are written down instead of sent to Redis.
    type Sender = tokio::sync::oneshot::Sender<Result<ReserveOutcome, StoreError>>;

    fn reply() -> (Sender, Reply, Arc<Mutex<Vec<ReservationId>>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cancelled = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&cancelled);
        let reply = Reply::new(rx, move |id| log.lock().unwrap().push(id));
        (tx, reply, cancelled)
    }

    #[tokio::test]
    async fn a_won_reply_delivered_but_never_read_is_cancelled() {
        let (tx, reply, cancelled) = reply();
        assert!(tx.send(won(1)).is_ok(), "the batch's send succeeds");
        drop(reply);
        assert_eq!(*cancelled.lock().unwrap(), [rid(1)]);
    }

    #[tokio::test]
    async fn after_the_buyer_left_the_batch_send_fails_and_hands_the_unit_back() {
        let (tx, reply, cancelled) = reply();
        drop(reply);
        let back = tx.send(won(2));
        assert!(
            matches!(back, Err(Ok(ReserveOutcome::Won { ref reservation, .. })) if *reservation == rid(2)),
            "the batch gets the unit back to cancel it itself"
        );
        assert!(cancelled.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_read_reply_or_a_loss_cancels_nothing() {
        let (tx, mut reply, cancelled) = reply();
        tx.send(won(3)).unwrap();
        assert!(matches!(reply.recv().await, Ok(ReserveOutcome::Won { .. })));
        drop(reply);

        let (tx, reply2, cancelled2) = super::tests::reply();
        tx.send(Ok(ReserveOutcome::SoldOut { remaining: 0 }))
            .unwrap();
        drop(reply2);
        assert!(cancelled.lock().unwrap().is_empty());
        assert!(cancelled2.lock().unwrap().is_empty());
    }

    /// A store whose Redis is nowhere: fine for everything that must not reach it.
    fn offline_store() -> Arc<Shared> {
        let cfg = RedisConfig::new("redis://127.0.0.1:1");
        let (connector, event_clients) = super::super::connector(&cfg).unwrap();
        let pool = Pool::new(connector, cfg.connect_timeout, 1);
        Arc::new(Shared::new(pool, event_clients, &cfg))
    }

    fn waiter(n: u128) -> (ReserveWaiter, ReplyReceiver) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = ReserveWaiter {
            sku: tee(),
            user: UserId::parse(&format!("buyer-{n}")).unwrap(),
            quantity: 1,
            per_user_limit: 1,
            reservation: rid(n),
            tx,
        };
        (waiter, rx)
    }

    #[tokio::test]
    async fn a_reply_is_read_once() {
        let (tx, mut reply, _) = reply();
        tx.send(won(4)).unwrap();
        assert!(reply.recv().await.is_ok());
        assert!(
            matches!(reply.recv().await, Err(StoreError::Unavailable(m)) if m.contains("already read"))
        );
    }

    #[tokio::test]
    async fn a_batch_dropped_unanswered_is_unavailable_not_a_hang() {
        let (tx, mut reply, cancelled) = reply();
        drop(tx);
        assert!(
            matches!(reply.recv().await, Err(StoreError::Unavailable(m)) if m.contains("abandoned"))
        );
        assert!(cancelled.lock().unwrap().is_empty());
    }

    #[test]
    fn a_queue_longer_than_one_batch_is_sent_as_several() {
        let queue = Batches::default();
        let mut receivers = Vec::new();
        for n in 0..=RESERVE_BATCH_MAX {
            let (w, rx) = waiter(n as u128);
            assert_eq!(
                queue.push("tee", w),
                n == 0,
                "only the first buyer starts the batch"
            );
            receivers.push(rx);
        }
        let (first, more) = queue.take("tee", RESERVE_BATCH_MAX);
        assert!(more, "one buyer is left for the next batch");
        let ids: Vec<_> = first.iter().map(|w| w.reservation.clone()).collect();
        let expected: Vec<_> = (0..RESERVE_BATCH_MAX).map(|n| rid(n as u128)).collect();
        assert_eq!(ids, expected, "the oldest go first");
        let (rest, more) = queue.take("tee", RESERVE_BATCH_MAX);
        assert!(!more);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].reservation, rid(RESERVE_BATCH_MAX as u128));
    }

    #[tokio::test]
    async fn buyers_who_left_before_the_batch_went_out_are_not_reserved_for() {
        let store = offline_store();
        let (a, rx_a) = waiter(5);
        let (b, rx_b) = waiter(6);
        drop((rx_a, rx_b));
        store.reserve_call(vec![a, b]).await;
        assert!(
            !store.pool.opened_on_this_thread(),
            "a batch of buyers who are all gone never reaches for Redis"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_tells_every_buyer_the_same_error() {
        let store = offline_store();
        let (a, rx_a) = waiter(7);
        let (b, rx_b) = waiter(8);
        let e = StoreError::Protocol("reserve answered nonsense".into());
        store.fail_batch(vec![a, b], &e, false);
        for rx in [rx_a, rx_b] {
            assert!(
                matches!(rx.await, Ok(Err(StoreError::Protocol(m))) if m == "reserve answered nonsense")
            );
        }
        assert!(!store.pool.opened_on_this_thread(), "no cancel was needed");
    }
}
