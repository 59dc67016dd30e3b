//! Settle batches: settles of one SKU on one thread that arrive in the same scheduler turn
//! go to Redis as one `settle.lua` call ([`Shared::settle_inner`]). The first settle of a
//! batch leads it: it sends the batch and hands every waiter its own result ([`deliver`]);
//! a leader cancelled before sending empties its batch so nobody waits for it ([`Batch`]).

use redis::Value;

use super::Shared;
use super::batch::{Batches, same_error};
use crate::store::{Settlement, StoreError, validate_sku};

impl Shared {
    /// Settles are batched: the first settle of a SKU on this thread waits one scheduler turn
    /// (every task that is ready runs first), takes whatever other settles of that SKU joined
    /// meanwhile, and sends them all in one script call. Settles run after the buyer has been
    /// answered, so the wait costs nobody latency, and a busy sale costs Redis about one
    /// settle call per batch instead of one per order.
    pub(super) async fn settle_inner(
        &self,
        sku: &str,
        id: &str,
        to: Settlement,
    ) -> Result<bool, StoreError> {
        validate_sku(sku)?;
        let queue = self.settles.get_or_default().to(to);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if queue.push(sku, (id.to_owned(), tx)) {
            let mut batch = Batch {
                queue,
                sku: Some(sku),
            };
            tokio::task::yield_now().await;
            let waiters = batch.take();
            let keys = self.keys(sku)?;
            let mut args: Vec<&[u8]> = Vec::with_capacity(waiters.len() + 1);
            args.push(to.as_str().as_bytes());
            args.extend(waiters.iter().map(|(id, _)| id.as_bytes()));
            let reply = self.run_script(&self.settle, &keys, &args).await;
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
    String,
    tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
);

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
    sku: Option<&'q str>,
}

impl Batch<'_> {
    fn take(&mut self) -> Vec<SettleWaiter> {
        match self.sku.take() {
            Some(sku) => self.queue.take(sku, usize::MAX).0,
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
            for (_, tx) in waiters {
                let _ = tx.send(Err(StoreError::Protocol(e.clone())));
            }
            return;
        }
        Err(e) => {
            for (_, tx) in waiters {
                let _ = tx.send(Err(same_error(&e)));
            }
            return;
        }
    };
    for ((id, tx), item) in waiters.into_iter().zip(results) {
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
