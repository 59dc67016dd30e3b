//! The audit as the last word on a sale: after a test has run its story (faults included),
//! [`assert_audit_clean`] runs flashgate's own audit (`flashgate::audit`, what `GET /v1/audit`
//! and `flashgate audit` run) on the instance's store: `added == stock + held + sold +
//! uncertain`, and no reservation left `held`.

use std::time::Duration;

use super::{Flashgate, sku};

/// A reservation still `held` after this long at the end of a test was left behind (every
/// test's backend answers, or times out, well within it).
pub const LEFT_HELD_AFTER: Duration = Duration::from_secs(30);

/// Fails the test, with the audit's findings, unless the books of `sku` balance and nothing is
/// left held. Reads the store directly, so it also works for an instance without an admin API.
pub async fn assert_audit_clean(fg: &Flashgate, sku_name: &str) {
    let audit = flashgate::audit::audit_sale(&*fg.app.store, &sku(sku_name), LEFT_HELD_AFTER)
        .await
        .unwrap_or_else(|e| panic!("audit of {sku_name}: the store failed: {e}"));
    assert!(
        audit.ok,
        "audit of {sku_name} failed: {:?}\n{audit:?}",
        audit.problems
    );
}
