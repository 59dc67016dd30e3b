//! Global rate limits on Redis (`scope: global`): `lua/gcra.lua`, batched like reserves. The
//! checks of one route arriving on one thread in the same scheduler turn go to Redis as one
//! script call, which decides each request in turn on the Redis clock (see
//! [`crate::store::limits`] for the arithmetic and the keys). Every key of a call carries the
//! route's hash tag, so on a Redis Cluster the call goes to the one node owning that slot.
//!
//! Unlike a reserve, a lost reply strands nothing: at worst a token was taken for a request
//! that was then answered 503 (or admitted, with `on_store_error: open`). So a batch needs no
//! cancellation, only a task of its own so that a caller who goes away cannot leave the
//! others waiting. The call is bounded by `response_timeout` like every other.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::Value;

use super::Shared;
use super::batch::Batches;
use super::scripts::keys_cmd;
use crate::store::StoreError;
use crate::store::limits::{LimitBucket, LimitCheck, LimitVerdict, limit_key, validate_check};

/// Most requests decided in one `gcra.lua` call (a few key reads and writes each).
const LIMIT_BATCH_MAX: usize = 64;

/// One request waiting in a limit batch.
pub(super) struct LimitWaiter {
    buckets: Vec<LimitBucket>,
    tx: tokio::sync::oneshot::Sender<Result<LimitVerdict, StoreError>>,
}

impl Shared {
    /// Queues `check` in this thread's batch for its route (the first check of a batch
    /// spawns the task that sends it) and waits for its verdict.
    pub(super) async fn check_limits_inner(
        self: &Arc<Self>,
        check: &LimitCheck,
    ) -> Result<LimitVerdict, StoreError> {
        validate_check(check)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = LimitWaiter {
            buckets: check.buckets.clone(),
            tx,
        };
        let queue = Arc::clone(self.limits.get_or_default());
        if queue.push(&check.route, waiter) {
            spawn_limit_batch(Arc::clone(self), queue, check.route.clone());
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "limit batch abandoned before it was answered".into(),
            ))
        })
    }

    /// One `gcra.lua` call for up to [`LIMIT_BATCH_MAX`] requests of `route`.
    async fn limit_call(&self, route: &str, mut waiters: Vec<LimitWaiter>) {
        // A request whose client left needs no token.
        waiters.retain(|w| !w.tx.is_closed());
        if waiters.is_empty() {
            return;
        }
        // Each key once in KEYS; a request names its buckets by index.
        let mut keys: Vec<String> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut requests: Vec<Vec<(usize, u64, u64)>> = Vec::with_capacity(waiters.len());
        for w in &waiters {
            let buckets = w
                .buckets
                .iter()
                .map(|b| {
                    let i = *index.entry(b.key.as_str()).or_insert_with(|| {
                        keys.push(limit_key(&self.prefix, route, &b.key));
                        keys.len()
                    });
                    (i, b.period_us(), b.tolerance_us())
                })
                .collect();
            requests.push(buckets);
        }
        let args = requests.iter().map(|r| 1 + 3 * r.len()).sum();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = keys_cmd(&self.gcra, &key_refs, args, args * 12);
        for r in &requests {
            cmd.arg(r.len());
            for (i, period, tolerance) in r {
                cmd.arg(*i).arg(*period).arg(*tolerance);
            }
        }
        let reply = self
            .run_script_tracked(&self.gcra, cmd, &AtomicBool::new(false))
            .await;
        deliver(reply, waiters);
    }
}

/// The task that sends one batch: it waits one scheduler turn so the checks that are ready
/// join, then takes the batch (leaving a successor for what does not fit) and sends it.
fn spawn_limit_batch(store: Arc<Shared>, queue: Arc<Batches<LimitWaiter>>, route: String) {
    tokio::spawn(async move {
        tokio::task::yield_now().await;
        let (waiters, more) = queue.take(&route, LIMIT_BATCH_MAX);
        if more {
            spawn_limit_batch(Arc::clone(&store), queue, route.clone());
        }
        store.limit_call(&route, waiters).await;
    });
}

/// Hands each waiter its own verdict from the batch reply.
fn deliver(reply: Result<Value, StoreError>, waiters: Vec<LimitWaiter>) {
    let items = match reply {
        Ok(Value::Array(items)) if items.len() == waiters.len() => items,
        Ok(other) => {
            let e = StoreError::Protocol(format!("gcra answered {other:?}"));
            for w in waiters {
                let _ = w.tx.send(Err(e.clone()));
            }
            return;
        }
        Err(e) => {
            for w in waiters {
                let _ = w.tx.send(Err(e.clone()));
            }
            return;
        }
    };
    for (w, item) in waiters.into_iter().zip(items) {
        let _ = w.tx.send(verdict(item, w.buckets.len()));
    }
}

/// One request's reply: `{0, 0}` or `{bucket (1-based), wait_ms}`.
fn verdict(item: Value, buckets: usize) -> Result<LimitVerdict, StoreError> {
    match item {
        Value::Array(pair) => match pair.as_slice() {
            [Value::Int(0), Value::Int(0)] => Ok(LimitVerdict::Allowed),
            [Value::Int(b), Value::Int(ms)] if *b >= 1 && *ms >= 0 => {
                let bucket = usize::try_from(*b - 1).unwrap_or(usize::MAX);
                if bucket >= buckets {
                    return Err(StoreError::Protocol(format!(
                        "gcra named bucket {b} of {buckets}"
                    )));
                }
                Ok(LimitVerdict::Limited {
                    bucket,
                    retry_after: Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
                })
            }
            _ => Err(StoreError::Protocol(format!("gcra answered {pair:?}"))),
        },
        other => Err(StoreError::Protocol(format!("gcra answered {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_become_verdicts() {
        let pair = |a, b| Value::Array(vec![Value::Int(a), Value::Int(b)]);
        assert_eq!(verdict(pair(0, 0), 2).unwrap(), LimitVerdict::Allowed);
        assert_eq!(
            verdict(pair(2, 950), 2).unwrap(),
            LimitVerdict::Limited {
                bucket: 1,
                retry_after: Duration::from_millis(950)
            }
        );
        assert!(matches!(
            verdict(pair(3, 1), 2),
            Err(StoreError::Protocol(_))
        ));
        assert!(matches!(
            verdict(pair(1, -1), 2),
            Err(StoreError::Protocol(_))
        ));
        assert!(matches!(
            verdict(Value::Int(0), 1),
            Err(StoreError::Protocol(_))
        ));
    }
}
