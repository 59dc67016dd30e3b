//! What audits and reconciliation read and write in Redis: the registry of SKUs
//! (`{prefix}:skus`), bounded listings of one sale's open reservations (`HSCAN`), and the
//! operator's resolve (`release.lua` in its `resolve` mode).
//!
//! **Why a registry set, not `SCAN`.** Listing sales needs every SKU. `SCAN MATCH
//! fg:{*}:stock` would walk the whole keyspace — on every Cluster node, and through whatever
//! else shares that Redis — to find a handful of sales. The registry is one small set, read
//! with `SSCAN` in pages. It cannot be written inside a sale's script (every key of a script
//! must hash to the sale's `{sku}` slot, and the registry belongs to no sale), so the stock
//! set/add path `SADD`s the SKU first, as its own command: a set or add that fails after it
//! leaves the SKU listed with no stock (the audit says "not configured"), never a stocked SKU
//! missing from the list. SKUs stocked by a flashgate older than the registry are listed
//! after their next set or add; until then `flashgate audit SKU` names them explicitly.

use std::collections::HashSet;
use std::time::Duration;

use redis::Value;

use super::Shared;
use super::reply::{convert, int, non_negative, split_reply, text, unexpected};
use crate::store::{
    OpenState, ReservationId, ReservationInfo, ReservationPage, ReservationQuery, Resolution,
    ResolveOutcome, Sku, SkuList, StoreError, UserId, registry_key,
};

/// Entries one `SSCAN` / `HSCAN` call asks for. Each call is one short round trip (bounded by
/// `store.response_timeout`); a million reservations take a thousand of them.
const SCAN_COUNT: usize = 1000;

impl Shared {
    /// Adds `sku` to the registry of stocked SKUs (before its stock script runs).
    pub(super) async fn register(&self, sku: &Sku) -> Result<(), StoreError> {
        let key = registry_key(&self.prefix);
        self.with_conn(|mut c| async move {
            redis::cmd("SADD")
                .arg(&key)
                .arg(sku.as_str())
                .query_async::<Value>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    /// The registry, sorted, at most `limit` SKUs. A member that is not a valid SKU (written by
    /// hand) is skipped.
    pub(super) async fn list_skus_inner(&self, limit: usize) -> Result<SkuList, StoreError> {
        let key = registry_key(&self.prefix);
        let mut skus = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let reply = self.scan_page("SSCAN", &key, &cursor).await?;
            let (next, members): (String, Vec<String>) = convert(reply, "SSCAN")?;
            skus.extend(members.iter().filter_map(|m| Sku::parse(m).ok()));
            cursor = next;
            // One past the limit is enough to know there are more.
            if cursor == "0" || skus.len() > limit {
                break;
            }
        }
        skus.sort();
        skus.dedup();
        let truncated = skus.len() > limit;
        skus.truncate(limit);
        Ok(SkuList { skus, truncated })
    }

    /// One page of `SSCAN`/`HSCAN` (`cmd`) over `key` from `cursor`.
    async fn scan_page(
        &self,
        cmd: &'static str,
        key: &str,
        cursor: &str,
    ) -> Result<Value, StoreError> {
        let (key, cursor) = (key.to_owned(), cursor.to_owned());
        self.with_conn(|mut c| async move {
            redis::cmd(cmd)
                .arg(&key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async::<Value>(&mut c)
                .await
        })
        .await
    }

    /// Reservations of `sku` in `query.state`, read with `HSCAN`. The scan stops as soon as it
    /// has seen as many reservations in that state as the sale's counter says there are (after
    /// a sale with nothing uncertain it reads nothing at all), or one more match than the
    /// limit. Ages come from the Redis clock, which also stamped the records.
    pub(super) async fn reservations_inner(
        &self,
        sku: &Sku,
        query: &ReservationQuery,
    ) -> Result<ReservationPage, StoreError> {
        let keys = self.keys(sku);
        let state = query.state;
        let mut pipe = redis::pipe();
        pipe.cmd("HGET")
            .arg(&keys.stats)
            .arg(format!("res:{}", state.as_str()))
            .cmd("TIME");
        let reply = self
            .with_conn(|mut c| async move { pipe.query_async::<Value>(&mut c).await })
            .await?;
        let (expected, (secs, micros)): (Option<i64>, (u64, u64)) =
            convert(reply, "reservation count")?;
        let now_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let expected = expected.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        let older_than = u64::try_from(query.older_than.as_millis()).unwrap_or(u64::MAX);

        let mut found = Vec::new();
        // Ids, since HSCAN may return an entry twice (while the hash is rehashed).
        let mut seen_in_state = HashSet::new();
        let mut cursor = "0".to_owned();
        while (seen_in_state.len() as u64) < expected && found.len() <= query.limit {
            let reply = self.scan_page("HSCAN", &keys.reservations, &cursor).await?;
            let (next, items): (String, Vec<Value>) = convert(reply, "HSCAN")?;
            for pair in items.chunks(2) {
                let [field, value] = pair else { continue };
                let Some(info) = parse_record(field, value, now_ms) else {
                    continue;
                };
                if info.state != state || !seen_in_state.insert(info.id.clone()) {
                    continue;
                }
                if info.age_ms >= older_than {
                    found.push(info);
                }
            }
            cursor = next;
            if cursor == "0" {
                break;
            }
        }
        found.sort_by(|a, b| (a.reserved_at_ms, &a.id).cmp(&(b.reserved_at_ms, &b.id)));
        let truncated = found.len() > query.limit;
        found.truncate(query.limit);
        Ok(ReservationPage {
            reservations: found,
            truncated,
        })
    }

    pub(super) async fn resolve_inner(
        &self,
        sku: &Sku,
        id: &ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        let keys = self.keys(sku);
        let min_age = held_min_age.as_millis().to_string();
        let reply = self
            .run_script(
                &self.release,
                &keys,
                &[
                    id.as_str().as_bytes(),
                    b"resolve",
                    min_age.as_bytes(),
                    to.as_str().as_bytes(),
                ],
            )
            .await?;
        let (status, rest) = split_reply(reply, "resolve")?;
        match (status.as_str(), rest.as_slice()) {
            ("resolved", [from, quantity, remaining]) => {
                let from = text(from)
                    .as_deref()
                    .and_then(OpenState::parse)
                    .ok_or_else(|| unexpected("resolve", &status, &rest))?;
                Ok(ResolveOutcome::Resolved {
                    from,
                    quantity: non_negative(quantity, "resolve quantity")?,
                    remaining: int(remaining).and_then(|n| u64::try_from(n).ok()),
                })
            }
            ("unresolvable", [state, age]) => Ok(ResolveOutcome::NotResolvable {
                state: text(state).ok_or_else(|| unexpected("resolve", &status, &rest))?,
                age_ms: non_negative(age, "resolve age")?,
            }),
            ("not_held", []) => Ok(ResolveOutcome::Unknown),
            _ => Err(unexpected("resolve", &status, &rest)),
        }
    }
}

/// One `res` hash entry (`id` → `state|qty|unix_ms|user`) as a listed reservation, or `None`
/// for a state that is not open (sold, released, a cancelled tombstone) or an entry that is
/// not ours (an id or user flashgate would never write: edited by hand).
fn parse_record(field: &Value, value: &Value, now_ms: u64) -> Option<ReservationInfo> {
    let id = ReservationId::parse(&text(field)?).ok()?;
    let record = text(value)?;
    let mut parts = record.splitn(4, '|');
    let state = OpenState::parse(parts.next()?)?;
    let quantity = parts.next()?.parse().ok()?;
    let reserved_at_ms: u64 = parts.next()?.parse().ok()?;
    let user = UserId::parse(parts.next()?).ok()?;
    Some(ReservationInfo {
        id,
        user,
        quantity,
        state,
        reserved_at_ms,
        age_ms: now_ms.saturating_sub(reserved_at_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn records_parse_into_open_reservations_only() {
        let id = "0123456789abcdef0123456789abcdef";
        let r = parse_record(&bulk(id), &bulk("uncertain|2|1000|a|b"), 1500).unwrap();
        assert_eq!(r.id.as_str(), id);
        assert_eq!(r.user.as_str(), "a|b", "the user is last and may hold '|'");
        assert_eq!(
            (r.state, r.quantity, r.reserved_at_ms, r.age_ms),
            (OpenState::Uncertain, 2, 1000, 500)
        );
        let held = parse_record(&bulk(id), &bulk("held|1|2000|bob"), 1500).unwrap();
        assert_eq!(
            held.age_ms, 0,
            "a record from the future is not negative-aged"
        );
        for (field, value) in [
            (id, "sold|1|1000|bob"),
            (id, "released|1|1000|bob"),
            (id, "cancelled|0|1000|"),
            (id, "held|x|1000|bob"),
            (id, "held|1|soon|bob"),
            (id, "held|1|1000|"),
            (id, "held|1|1000"),
            ("not-an-id", "held|1|1000|bob"),
        ] {
            assert!(
                parse_record(&bulk(field), &bulk(value), 1500).is_none(),
                "{field} {value}"
            );
        }
    }
}
