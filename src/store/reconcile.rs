//! What the store answers for audits and reconciliation: the SKUs it knows, the reservations
//! of one sale that need attention (`held`, `uncertain`), and the operator's resolution of one
//! of them. Shared by both stores, so both answer in the same types.
//!
//! Listing is always bounded: a sale may hold a million reservations, so a listing returns at
//! most `limit` of them and says when there were more (`truncated`). Resolving what was listed
//! and listing again walks through the rest: a resolved reservation no longer matches.

use std::time::Duration;

use serde::Serialize;

use super::{ReservationId, Sku, UserId};

/// SKUs ever stocked through this store (a stock set or add), sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SkuList {
    pub skus: Vec<Sku>,
    /// More SKUs exist than the `limit` asked for.
    pub truncated: bool,
}

/// The reservation states that need someone's attention: `held` (the outcome is not recorded
/// yet; old ones were left behind by a flashgate that died mid-order) and `uncertain` (the
/// backend may or may not have the order). `sold` and `released` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpenState {
    Held,
    Uncertain,
}

impl OpenState {
    /// The state name stored in the reservation record.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenState::Held => "held",
            OpenState::Uncertain => "uncertain",
        }
    }

    /// `held` or `uncertain`; anything else is `None`.
    pub fn parse(s: &str) -> Option<OpenState> {
        match s {
            "held" => Some(OpenState::Held),
            "uncertain" => Some(OpenState::Uncertain),
            _ => None,
        }
    }
}

/// Which reservations of one sale to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationQuery {
    pub state: OpenState,
    /// Only those reserved at least this long ago (by the store's clock); zero: all of them.
    pub older_than: Duration,
    /// At most this many in the answer.
    pub limit: usize,
}

/// One reservation, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReservationInfo {
    pub id: ReservationId,
    pub user: UserId,
    pub quantity: u64,
    pub state: OpenState,
    /// When it was reserved, in Unix milliseconds (the store's clock: Redis's `TIME`).
    pub reserved_at_ms: u64,
    /// How long ago that was, by the same clock.
    pub age_ms: u64,
}

/// An answer to a [`ReservationQuery`]: oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReservationPage {
    pub reservations: Vec<ReservationInfo>,
    /// More reservations matched than `limit`: resolve these, then list again.
    pub truncated: bool,
}

/// Where the operator settles a reservation, once the shop has checked its orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// The shop has the order: the unit stays sold.
    Sold,
    /// The shop has no such order: the units go back to stock and the user's slot is freed.
    Released,
}

impl Resolution {
    /// The state name stored in the reservation record.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Sold => "sold",
            Resolution::Released => "released",
        }
    }

    /// `sold` or `released`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Resolution> {
        match s {
            "sold" => Some(Resolution::Sold),
            "released" => Some(Resolution::Released),
            _ => None,
        }
    }
}

/// What a resolve did. It changes a reservation at most once: a second resolve finds it
/// `sold` or `released` and is [`ResolveOutcome::NotResolvable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveOutcome {
    /// Moved from `from` to the resolution. `remaining`: the stock after a release (`None`
    /// for a sold one).
    Resolved {
        from: OpenState,
        quantity: u64,
        remaining: Option<u64>,
    },
    /// Nothing changed: the reservation is `state` (`sold`, `released`, a `held` one younger
    /// than the minimum age, a `cancelled` tombstone), reserved `age_ms` ago.
    NotResolvable { state: String, age_ms: u64 },
    /// No reservation has this id in this sale.
    Unknown,
}
