//! The audit: do a sale's books balance, and has nothing been left behind?
//!
//! For each SKU two checks, read from the store (`GET /v1/audit`, `flashgate audit`):
//!
//! 1. **The equation** `added == stock + held + sold + uncertain` (units). `added` is the net
//!    number of units ever put into the sale: every stock set adds its difference from the
//!    previous stock, every add its delta, in the same atomic step as the change
//!    (`set_stock.lua`, `add_stock.lua`). Every other step moves units without creating any:
//!    a reserve moves them from `stock` to `held`; settle from `held` to `sold` or `uncertain`;
//!    a release (and a resolve to `released`) from `held`/`uncertain` back to `stock`, which
//!    is why `released` is not in the sum; a resolve to `sold` from `uncertain` to `sold`. A
//!    `cancelled` tombstone holds nothing. So the equation holds after any sequence of
//!    flashgate's own steps, and a difference means something changed the keys behind
//!    flashgate's back (an edit by hand, a lost write after a Redis failover).
//! 2. **Nothing left `held`** longer than a threshold: a held reservation is an order whose
//!    outcome is not recorded yet; one much older than `upstream.request_timeout` was left by
//!    a flashgate that died mid-order (or a store outage longer than the bookkeeping retries).
//!    Resolve it (`flashgate reservations resolve`) once the shop has checked its orders.
//!
//! `uncertain` reservations do not fail the audit: they are counted in the equation, and the
//! report says how many wait for reconciliation.

use std::time::Duration;

use serde::Serialize;

use crate::ids::Sku;
use crate::store::{OpenState, ReservationQuery, SaleStatus, StateCounts, Store, StoreError};

/// At most this many stale `held` reservations are counted per SKU (the report says "or
/// more"); `flashgate reservations SKU --state held` lists them.
pub const STALE_SAMPLE: usize = 1000;

/// The audit of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaleAudit {
    pub sku: Sku,
    /// No problem found.
    pub ok: bool,
    /// `ok`, or the first problem: `mismatch`, `not_recorded`, `not_configured`, `stale_held`.
    pub verdict: Verdict,
    pub stock: Option<u64>,
    pub added: Option<u64>,
    /// Units by state.
    pub units: StateCounts,
    /// `stock + held + sold + uncertain`: what `added` must be.
    pub accounted: u64,
    /// `held` reservations older than the threshold (at least this many when
    /// `stale_held_more`).
    pub stale_held: u64,
    pub stale_held_more: bool,
    /// Every problem, for people.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    /// `added` differs from `stock + held + sold + uncertain`, or the stock key is gone while
    /// the sale has units on its books.
    Mismatch,
    /// Stock is set but `added` was never recorded (stocked by a flashgate older than it).
    NotRecorded,
    /// No stock was ever set for this SKU.
    NotConfigured,
    /// `held` reservations older than the threshold.
    StaleHeld,
}

/// Audits one SKU: the equation from its status and, when anything is `held`, a bounded
/// listing of the held reservations older than `held_older_than`.
pub async fn audit_sale(
    store: &dyn Store,
    sku: &Sku,
    held_older_than: Duration,
) -> Result<SaleAudit, StoreError> {
    let status = store.status(sku).await?;
    let (stale, more) = if status.reservations.held > 0 || status.units.held > 0 {
        let query = ReservationQuery {
            state: OpenState::Held,
            older_than: held_older_than,
            limit: STALE_SAMPLE,
        };
        let page = store.reservations(sku, &query).await?;
        (page.reservations.len() as u64, page.truncated)
    } else {
        (0, false)
    };
    Ok(check(&status, stale, more, held_older_than))
}

/// The verdict on one sale, from its status and the count of stale held reservations.
pub fn check(
    status: &SaleStatus,
    stale_held: u64,
    stale_held_more: bool,
    held_older_than: Duration,
) -> SaleAudit {
    let u = &status.units;
    let on_books = u128::from(u.held) + u128::from(u.sold) + u128::from(u.uncertain);
    let accounted = u128::from(status.stock.unwrap_or(0)) + on_books;
    let mut problems = Vec::new();
    let mut verdict = Verdict::Ok;
    match (status.stock, status.added) {
        (Some(_), Some(added)) if u128::from(added) == accounted => {}
        (Some(stock), Some(added)) => {
            verdict = Verdict::Mismatch;
            let off = i128::try_from(accounted).unwrap_or(i128::MAX) - i128::from(added);
            problems.push(format!(
                "added {added} != stock {stock} + held {} + sold {} + uncertain {} (= {accounted}, \
                 {off:+}): the stock key or the counters changed behind flashgate's back",
                u.held, u.sold, u.uncertain
            ));
        }
        (Some(_), None) => {
            verdict = Verdict::NotRecorded;
            problems.push(
                "units ever added are not recorded (stocked by an older flashgate): a stock set \
                 or add starts counting"
                    .to_owned(),
            );
        }
        (None, added) if added.is_some() || on_books > 0 => {
            verdict = Verdict::Mismatch;
            problems.push(format!(
                "the stock key is missing, yet the sale has {} units added and {on_books} on its \
                 books: it was deleted behind flashgate's back",
                added.map_or("no".to_owned(), |a| a.to_string())
            ));
        }
        (None, _) => {
            verdict = Verdict::NotConfigured;
            problems.push("no stock was ever set for this SKU".to_owned());
        }
    }
    if stale_held > 0 {
        if verdict == Verdict::Ok {
            verdict = Verdict::StaleHeld;
        }
        let reservations = if stale_held == 1 && !stale_held_more {
            "1 reservation".to_owned()
        } else {
            format!(
                "{stale_held}{} reservations",
                if stale_held_more { " or more" } else { "" }
            )
        };
        problems.push(format!(
            "{reservations} held for more than {}: the outcome of their orders was never \
             recorded; check the shop's orders, then `flashgate reservations resolve`",
            humantime::format_duration(held_older_than)
        ));
    }
    SaleAudit {
        sku: status.sku.clone(),
        ok: problems.is_empty(),
        verdict,
        stock: status.stock,
        added: status.added,
        units: status.units.clone(),
        accounted: u64::try_from(accounted).unwrap_or(u64::MAX),
        stale_held,
        stale_held_more,
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(stock: Option<u64>, added: Option<u64>, units: [u64; 4]) -> SaleStatus {
        let [held, sold, released, uncertain] = units;
        SaleStatus {
            sku: Sku::parse("tee").unwrap(),
            stock,
            added,
            closed: false,
            buyers: 0,
            reservations: StateCounts::default(),
            units: StateCounts {
                held,
                sold,
                released,
                uncertain,
            },
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn verdicts() {
        let cases = [
            // Released units are back in stock: not in the sum.
            (status(Some(2), Some(5), [0, 2, 7, 1]), 0, Verdict::Ok),
            (status(Some(0), Some(3), [1, 2, 0, 0]), 0, Verdict::Ok),
            (status(Some(9), Some(5), [0, 2, 0, 1]), 0, Verdict::Mismatch),
            (status(Some(1), Some(5), [0, 2, 0, 1]), 0, Verdict::Mismatch),
            (status(Some(5), None, [0, 0, 0, 0]), 0, Verdict::NotRecorded),
            (status(None, None, [0, 0, 0, 0]), 0, Verdict::NotConfigured),
            (status(None, Some(3), [0, 0, 0, 0]), 0, Verdict::Mismatch),
            (status(None, None, [0, 1, 0, 0]), 0, Verdict::Mismatch),
            (
                status(Some(0), Some(3), [1, 2, 0, 0]),
                1,
                Verdict::StaleHeld,
            ),
            // The equation's failure comes first; the stale held one is listed too.
            (status(Some(1), Some(3), [1, 2, 0, 0]), 1, Verdict::Mismatch),
        ];
        for (s, stale, verdict) in cases {
            let a = check(&s, stale, false, MINUTE);
            assert_eq!(a.verdict, verdict, "{s:?}: {:?}", a.problems);
            assert_eq!(a.ok, verdict == Verdict::Ok, "{a:?}");
            assert_eq!(a.problems.is_empty(), a.ok, "{a:?}");
        }
    }

    #[test]
    fn a_mismatch_says_by_how_much() {
        let a = check(&status(Some(9), Some(5), [0, 2, 0, 1]), 0, false, MINUTE);
        assert_eq!(a.accounted, 12);
        assert!(
            a.problems[0]
                .starts_with("added 5 != stock 9 + held 0 + sold 2 + uncertain 1 (= 12, +7)"),
            "{:?}",
            a.problems
        );
        let a = check(&status(Some(0), Some(3), [1, 2, 0, 0]), 1000, true, MINUTE);
        assert!(
            a.problems[0].starts_with("1000 or more reservations held for more than 1m"),
            "{:?}",
            a.problems
        );
    }
}
