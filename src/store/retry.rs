//! Recording a reservation's outcome when the store is away: tries again while it answers
//! `Unavailable`, pausing 50 ms doubling to 2 s, for up to [`RECORD_RETRY_FOR`].

use std::future::Future;
use std::time::Duration;

use super::{ReservationId, Settlement, Sku, Store, StoreError};

/// How long [`record_retrying`] keeps trying while the store is unavailable.
pub const RECORD_RETRY_FOR: Duration = Duration::from_secs(600);
/// First pause between two tries of [`record_retrying`]; doubles up to [`RECORD_RETRY_MAX`].
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(50);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(2);

/// What happened to a won reservation once the backend was asked, for [`record_retrying`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Settle(Settlement),
    Release,
}

/// Records a reservation's outcome (settle or release), trying again while the store is
/// unavailable, for up to [`RECORD_RETRY_FOR`].
///
/// By then the backend has answered (or certainly never saw the order): giving up on the
/// first failure would leave the unit `held` for good — counted as neither sold nor back in
/// stock, and the buyer told `already_purchased` on a retry. Both scripts are idempotent (a
/// reservation leaves `held` once), so a try that timed out after it ran is harmless to
/// repeat. Run it off the response path.
pub async fn record_retrying(
    store: &dyn Store,
    sku: &Sku,
    reservation: &ReservationId,
    what: Record,
) -> Result<(), StoreError> {
    retry_while_unavailable(|| async move {
        match what {
            Record::Settle(to) => store.settle(sku, reservation, to).await.map(drop),
            Record::Release => store.release(sku, reservation).await.map(drop),
        }
    })
    .await
}

/// Runs `call` until it gives anything but [`StoreError::Unavailable`], pausing between tries
/// (50ms doubling to 2s), for up to [`RECORD_RETRY_FOR`].
pub(crate) async fn retry_while_unavailable<T, F, Fut>(mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let give_up = tokio::time::Instant::now() + RECORD_RETRY_FOR;
    let mut pause = RECORD_RETRY_FIRST;
    loop {
        match call().await {
            Err(StoreError::Unavailable(e)) if tokio::time::Instant::now() + pause < give_up => {
                tracing::debug!(error = %e, "store unavailable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECORD_RETRY_MAX);
            }
            other => return other,
        }
    }
}
