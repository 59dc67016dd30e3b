//! Settle batches: settles on one thread that arrive in the same scheduler turn go to Redis
//! as one `settle.lua` call ([`Shared::settle_inner`]): settles of any SKUs on one server,
//! one SKU's on a Redis Cluster (a script runs on one slot), as reserves are batched. The first settle of a
//! batch leads it: it sends the batch and hands every waiter its own result ([`deliver`]);
//! a leader cancelled before sending empties its batch so nobody waits for it ([`Batch`]).

use redis::Value;

use super::Shared;
use super::batch::Batches;
use crate::store::{ReservationId, Settlement, Sku, StoreError};

impl Shared {
    /// Settles are batched: the first settle of a batch on this thread waits one scheduler
    /// turn (every task that is ready runs first), takes whatever other settles joined
    /// meanwhile, and sends them all in one script call, grouped by SKU. Settles run after the buyer has been
    /// answered, so the wait costs nobody latency, and a busy sale costs Redis about one
    /// settle call per batch instead of one per order.
    pub(super) async fn settle_inner(
        &self,
        sku: &Sku,
        id: &ReservationId,
        to: Settlement,
    ) -> Result<bool, StoreError> {
        let queue = self.settles.get_or_default().to(to);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = if self.mixed_batches { "" } else { sku.as_str() };
        if queue.push(key, (sku.clone(), id.clone(), tx)) {
            let mut batch = Batch {
                queue,
                key: Some(key),
            };
            tokio::task::yield_now().await;
            let waiters = by_sku(batch.take());
            let mut skus: Vec<(&Sku, usize)> = Vec::new();
            for (sku, _, _) in &waiters {
                match skus.last_mut() {
                    Some((last, n)) if *last == sku => *n += 1,
                    _ => skus.push((sku, 1)),
                }
            }
            let keys: Vec<_> = skus.iter().map(|(sku, _)| self.keys(sku)).collect();
            let key_refs: Vec<&str> = keys.iter().flat_map(|k| k.script_keys()).collect();
            let sizes: Vec<String> = if skus.len() > 1 {
                skus.iter().map(|(_, n)| n.to_string()).collect()
            } else {
                Vec::new()
            };
            let mut args: Vec<&[u8]> = Vec::with_capacity(1 + sizes.len() + waiters.len());
            args.push(to.as_str().as_bytes());
            // Several SKUs: the group sizes first (see `lua/settle.lua`).
            args.extend(sizes.iter().map(|n| n.as_bytes()));
            args.extend(waiters.iter().map(|(_, id, _)| id.as_str().as_bytes()));
            let reply = self.run_script_keys(&self.settle, &key_refs, &args).await;
            deliver(reply, waiters);
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "settle batch abandoned before it was sent".into(),
            ))
        })
    }
}

type SettleWaiter = (
    Sku,
    ReservationId,
    tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
);

/// The waiters grouped by SKU (in order of each SKU's first settle), each SKU's in arrival
/// order: the order of the script's keys and replies.
fn by_sku(waiters: Vec<SettleWaiter>) -> Vec<SettleWaiter> {
    let mut groups: Vec<Vec<SettleWaiter>> = Vec::new();
    for w in waiters {
        match groups.iter_mut().find(|g| g[0].0 == w.0) {
            Some(group) => group.push(w),
            None => groups.push(vec![w]),
        }
    }
    groups.into_iter().flatten().collect()
}

/// Settles of one thread waiting for their batch's leader: one queue per target state.
#[derive(Default)]
pub(super) struct SettleQueues {
    sold: Batches<SettleWaiter>,
    uncertain: Batches<SettleWaiter>,
}

impl SettleQueues {
    fn to(&self, to: Settlement) -> &Batches<SettleWaiter> {
        match to {
            Settlement::Sold => &self.sold,
            Settlement::Uncertain => &self.uncertain,
        }
    }
}

/// A leader's claim on its batch. Dropped before the batch was taken (the leader was
/// cancelled), it empties the batch so the others get an error and retry, instead of
/// waiting for a leader that is gone.
struct Batch<'q> {
    queue: &'q Batches<SettleWaiter>,
    /// The queue's key: `""` on one server (every SKU), the SKU on a cluster.
    key: Option<&'q str>,
}

impl Batch<'_> {
    fn take(&mut self) -> Vec<SettleWaiter> {
        match self.key.take() {
            Some(key) => self.queue.take(key, usize::MAX).0,
            None => Vec::new(),
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// Hands each waiter its own result from the batch reply.
fn deliver(reply: Result<Value, StoreError>, waiters: Vec<SettleWaiter>) {
    let results = match reply {
        Ok(Value::Array(items)) if items.len() == waiters.len() => items,
        Ok(other) => {
            let e = format!("settle answered {other:?}");
            for (_, _, tx) in waiters {
                let _ = tx.send(Err(StoreError::Protocol(e.clone())));
            }
            return;
        }
        Err(e) => {
            for (_, _, tx) in waiters {
                let _ = tx.send(Err(e.clone()));
            }
            return;
        }
    };
    for ((_, id, tx), item) in waiters.into_iter().zip(results) {
        let result = match item {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(StoreError::Protocol(format!(
                "settle of {id} answered {other:?} (malformed reservation record?)"
            ))),
        };
        let _ = tx.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Receiver = tokio::sync::oneshot::Receiver<Result<bool, StoreError>>;

    fn rid(n: u128) -> ReservationId {
        ReservationId::from_number(n)
    }

    fn waiter(n: u128) -> (SettleWaiter, Receiver) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ((Sku::parse("tee").unwrap(), rid(n), tx), rx)
    }

    fn queued(queue: &Batches<SettleWaiter>, sku: &str, ids: &[u128]) -> Vec<Receiver> {
        ids.iter()
            .map(|&n| {
                let (w, rx) = waiter(n);
                queue.push(sku, w);
                rx
            })
            .collect()
    }

    #[test]
    fn sold_and_uncertain_settles_wait_in_separate_batches() {
        let queues = SettleQueues::default();
        let (sold, _rx1) = waiter(1);
        let (uncertain, _rx2) = waiter(2);
        assert!(queues.to(Settlement::Sold).push("tee", sold));
        assert!(
            queues.to(Settlement::Uncertain).push("tee", uncertain),
            "an uncertain settle leads its own batch: one script call settles to one state"
        );
        let taken = queues.to(Settlement::Sold).take("tee", usize::MAX).0;
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1, rid(1));
    }

    #[tokio::test]
    async fn a_leader_dropped_before_sending_releases_its_followers() {
        let queue = Batches::default();
        let receivers = queued(&queue, "tee", &[1, 2, 3]);
        let batch = Batch {
            queue: &queue,
            key: Some("tee"),
        };
        drop(batch);
        for rx in receivers {
            assert!(rx.await.is_err(), "the follower is told, not left waiting");
        }
        let (w, _rx) = waiter(4);
        assert!(queue.push("tee", w), "the next settle leads a new batch");
    }

    #[test]
    fn a_leader_takes_its_batch_once() {
        let queue = Batches::default();
        let _receivers = queued(&queue, "tee", &[1, 2]);
        let mut batch = Batch {
            queue: &queue,
            key: Some("tee"),
        };
        let ids: Vec<_> = batch.take().into_iter().map(|(_, id, _)| id).collect();
        assert_eq!(ids, [rid(1), rid(2)]);
        let _late = queued(&queue, "tee", &[3]);
        assert!(
            batch.take().is_empty(),
            "a later batch is not this leader's"
        );
        drop(batch);
        assert_eq!(
            queue.take("tee", usize::MAX).0.len(),
            1,
            "dropping a leader that already sent leaves the next batch alone"
        );
    }

    #[tokio::test]
    async fn deliver_hands_each_waiter_its_own_result() {
        let (a, rx_a) = waiter(1);
        let (b, rx_b) = waiter(2);
        let (c, rx_c) = waiter(3);
        let reply = Value::Array(vec![
            Value::Int(1),
            Value::Int(0),
            Value::BulkString(b"what".to_vec()),
        ]);
        deliver(Ok(reply), vec![a, b, c]);
        assert!(matches!(rx_a.await, Ok(Ok(true))));
        assert!(matches!(rx_b.await, Ok(Ok(false))));
        assert!(
            matches!(rx_c.await, Ok(Err(StoreError::Protocol(m))) if m.contains(rid(3).as_str()))
        );
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_length_fails_every_waiter() {
        let (a, rx_a) = waiter(1);
        let (b, rx_b) = waiter(2);
        deliver(Ok(Value::Array(vec![Value::Int(1)])), vec![a, b]);
        for rx in [rx_a, rx_b] {
            assert!(matches!(rx.await, Ok(Err(StoreError::Protocol(_)))));
        }
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_waiter_with_its_error() {
        let (a, rx_a) = waiter(1);
        let (b, rx_b) = waiter(2);
        deliver(Err(StoreError::Unavailable("down".into())), vec![a, b]);
        for rx in [rx_a, rx_b] {
            assert!(matches!(rx.await, Ok(Err(StoreError::Unavailable(m))) if m == "down"));
        }
    }
}
