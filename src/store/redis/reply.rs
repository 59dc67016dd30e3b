//! Script replies into outcomes: one buyer's `reserve.lua` answer ([`reserve_outcome`]),
//! the `{status, ...}` arrays of the other scripts ([`split_reply`]), typed conversions and
//! the errors for replies we do not understand.

use redis::{FromRedisValue, Value};

use crate::store::{MAX_UNITS, ReservationId, ReserveOutcome, StoreError};

/// One buyer's reply from `reserve.lua`. Matched in place: this runs once per buyer.
pub(super) fn reserve_outcome(
    reply: Value,
    reservation: ReservationId,
) -> Result<ReserveOutcome, StoreError> {
    let unexpected = |reply: &Value| StoreError::Protocol(format!("reserve answered {reply:?}"));
    let Value::Array(items) = &reply else {
        return Err(unexpected(&reply));
    };
    let status: &[u8] = match items.first() {
        Some(Value::BulkString(b)) => b,
        Some(Value::SimpleString(s)) => s.as_bytes(),
        _ => return Err(unexpected(&reply)),
    };
    match (status, &items[1..]) {
        (b"won", [remaining]) => Ok(ReserveOutcome::Won {
            reservation,
            remaining: non_negative(remaining, "reserve remaining")?,
        }),
        (b"sold_out", [remaining]) => Ok(ReserveOutcome::SoldOut {
            remaining: non_negative(remaining, "reserve remaining")?,
        }),
        (b"already_purchased", [held]) => {
            let held = non_negative(held, "reserve held")?;
            Ok(ReserveOutcome::AlreadyPurchased {
                held: u32::try_from(held).unwrap_or(u32::MAX),
            })
        }
        (b"not_configured", []) => Ok(ReserveOutcome::NotConfigured),
        (b"closed", []) => Ok(ReserveOutcome::Closed),
        _ => Err(unexpected(&reply)),
    }
}

/// Typed conversion of a raw reply. Done outside [`Shared::with_conn`](super::Shared::with_conn)
/// because redis-rs files conversion failures under `Parse`, which would
/// otherwise count as a broken connection: bad data is not a bad link.
pub(super) fn convert<T: FromRedisValue>(reply: Value, what: &str) -> Result<T, StoreError> {
    redis::from_redis_value(reply)
        .map_err(|e| StoreError::Protocol(format!("{what}: unexpected reply: {e}")))
}

/// Split a script's `{status, ...}` array reply.
pub(super) fn split_reply(reply: Value, script: &str) -> Result<(String, Vec<Value>), StoreError> {
    let Value::Array(mut items) = reply else {
        return Err(StoreError::Protocol(format!("{script} answered {reply:?}")));
    };
    if items.is_empty() {
        return Err(StoreError::Protocol(format!(
            "{script} answered an empty array"
        )));
    }
    let rest = items.split_off(1);
    let status = text(&items[0])
        .ok_or_else(|| StoreError::Protocol(format!("{script} status {:?}", items[0])))?;
    Ok((status, rest))
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

pub(super) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

pub(super) fn non_negative(v: &Value, what: &str) -> Result<u64, StoreError> {
    int(v)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| StoreError::Protocol(format!("{what} is {v:?}, expected an integer >= 0")))
}

/// A stock read back from Redis. Negative only if someone edited the key by
/// hand: say so rather than hide it.
pub(super) fn stock_value(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Protocol(format!("stock key holds {n}")))
}

pub(super) fn added_overflow(added: &Value) -> StoreError {
    StoreError::Invalid(format!(
        "units ever added would exceed {MAX_UNITS} (2^53 - 1; {} so far)",
        int(added).unwrap_or(0)
    ))
}

pub(super) fn unexpected(script: &str, status: &str, rest: &[Value]) -> StoreError {
    StoreError::Protocol(format!("{script} answered {status:?} {rest:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reserve_replies_become_outcomes() {
        let cases = [
            (
                vec![bulk("won"), Value::Int(9)],
                Some(ReserveOutcome::Won {
                    reservation: ReservationId::from_number(1),
                    remaining: 9,
                }),
            ),
            (
                vec![Value::SimpleString("sold_out".into()), Value::Int(0)],
                Some(ReserveOutcome::SoldOut { remaining: 0 }),
            ),
            (
                vec![bulk("already_purchased"), bulk("2")],
                Some(ReserveOutcome::AlreadyPurchased { held: 2 }),
            ),
            (
                vec![bulk("already_purchased"), Value::Int(1 << 40)],
                Some(ReserveOutcome::AlreadyPurchased { held: u32::MAX }),
            ),
            (
                vec![bulk("not_configured")],
                Some(ReserveOutcome::NotConfigured),
            ),
            (vec![bulk("closed")], Some(ReserveOutcome::Closed)),
            // Unknown status, wrong arity, a negative count: protocol errors, never a guess.
            (vec![bulk("maybe")], None),
            (vec![bulk("won")], None),
            (vec![bulk("closed"), Value::Int(1)], None),
            (vec![bulk("won"), Value::Int(-1)], None),
            (vec![Value::Int(1), Value::Int(1)], None),
            (vec![], None),
        ];
        for (items, expected) in cases {
            let got = reserve_outcome(Value::Array(items.clone()), ReservationId::from_number(1));
            match expected {
                Some(outcome) => assert_eq!(got.unwrap(), outcome, "{items:?}"),
                None => assert!(matches!(got, Err(StoreError::Protocol(_))), "{items:?}"),
            }
        }
        assert!(matches!(
            reserve_outcome(Value::Int(1), ReservationId::from_number(1)),
            Err(StoreError::Protocol(_))
        ));
    }

    #[test]
    fn split_reply_takes_the_status_off_the_front() {
        let (status, rest) =
            split_reply(Value::Array(vec![bulk("ok"), Value::Int(5)]), "x").unwrap();
        assert_eq!(status, "ok");
        assert_eq!(rest, [Value::Int(5)]);
        for bad in [
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1)]),
            Value::Int(1),
        ] {
            assert!(matches!(
                split_reply(bad, "x"),
                Err(StoreError::Protocol(_))
            ));
        }
    }

    #[test]
    fn counts_must_be_non_negative_integers() {
        assert_eq!(non_negative(&Value::Int(3), "n").unwrap(), 3);
        assert_eq!(non_negative(&bulk("4"), "n").unwrap(), 4);
        assert!(non_negative(&Value::Int(-1), "n").is_err());
        assert!(non_negative(&bulk("four"), "n").is_err());
        assert!(
            stock_value(-2).is_err(),
            "a hand-edited negative stock is reported"
        );
    }
}
