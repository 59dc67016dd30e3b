//! Flash-sale admission steps that need no store: reading the SKU and quantity from the
//! request, the sale window, and the local sold-out fast path.

use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use http::request::Parts;
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::body::{self, Body};
use crate::config::{Quantity, Sale, Source};
use crate::reject::Reject;
use crate::store::MAX_SKU_LEN;

/// What the buyer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub sku: String,
    pub quantity: u32,
}

/// Reads the SKU and quantity. When one of them is a JSON body field, the body is read (at
/// most `max_body` bytes) and handed back intact for forwarding.
pub async fn read_order(
    sale: &Sale,
    parts: &Parts,
    path_params: &matchit::Params<'_, '_>,
    body: Body,
) -> Result<(Order, Body), Reject> {
    let (json, body) = if sale.reads_body() {
        let bytes = read_limited(body, sale.max_body).await?;
        let json = parse_object(&bytes)?;
        (Some(json), body::full(bytes))
    } else {
        (None, body)
    };
    let get = |source: &Source| lookup(source, parts, path_params, json.as_ref());

    let sku = get(&sale.sku)?.ok_or_else(|| Reject::BadRequest("no SKU on the request".into()))?;
    validate_sku(&sku)?;
    let quantity = match &sale.quantity {
        Quantity::Fixed(n) => *n,
        Quantity::From(source) => {
            let raw = get(source)?
                .ok_or_else(|| Reject::BadRequest("no quantity on the request".into()))?;
            parse_quantity(&raw, sale.per_user_limit)?
        }
    };
    Ok((Order { sku, quantity }, body))
}

/// Reads a whole body of at most `max` bytes (413 past that). Trailers are not kept: a buy
/// request whose body flashgate must read is a small JSON document.
async fn read_limited(mut body: Body, max: usize) -> Result<Bytes, Reject> {
    if body.size_hint().lower() > max as u64 {
        return Err(Reject::PayloadTooLarge);
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| Reject::BadRequest("could not read the request body".into()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(Reject::PayloadTooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn parse_object(bytes: &Bytes) -> Result<serde_json::Map<String, serde_json::Value>, Reject> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Reject::BadRequest(
            "the request body must be a JSON object".into(),
        )),
        Err(e) => Err(Reject::BadRequest(format!("invalid JSON body: {e}"))),
    }
}

fn lookup(
    source: &Source,
    parts: &Parts,
    path_params: &matchit::Params<'_, '_>,
    json: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<Option<String>, Reject> {
    Ok(match source {
        Source::PathParam(name) => path_params.get(name).map(percent_decode).transpose()?,
        Source::Query(name) => parts.uri.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        }),
        Source::Header(name) => match parts.headers.get(name) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Reject::BadRequest(format!("header {name} is not text")))?
                    .trim()
                    .to_owned(),
            ),
        },
        Source::Json(field) => match json.and_then(|j| j.get(field)) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(_) => {
                return Err(Reject::BadRequest(format!(
                    "JSON field `{field}` must be a string or a number"
                )));
            }
        },
    })
}

fn percent_decode(s: &str) -> Result<String, Reject> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| Reject::BadRequest("path parameter is not valid UTF-8".into()))
}

/// SKUs become part of store keys: letters, digits, `.`, `_`, `-`, at most 128 bytes.
pub fn validate_sku(sku: &str) -> Result<(), Reject> {
    let ok = !sku.is_empty()
        && sku.len() <= MAX_SKU_LEN
        && sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Reject::BadRequest(format!(
            "invalid SKU: use 1 to {MAX_SKU_LEN} letters, digits, '.', '_' or '-'"
        )))
    }
}

/// A quantity is a whole number from 1 to the per-user limit.
pub fn parse_quantity(raw: &str, per_user_limit: u32) -> Result<u32, Reject> {
    let n: i64 = raw
        .trim()
        .parse()
        .map_err(|_| Reject::BadRequest(format!("quantity `{raw}` is not a whole number")))?;
    if n < 1 || n > i64::from(per_user_limit) {
        return Err(Reject::BadRequest(format!(
            "quantity must be between 1 and {per_user_limit}, got {n}"
        )));
    }
    Ok(n as u32)
}

/// Before `start` → 403 not_started; at or after `end` → 403 ended.
pub fn check_window(sale: &Sale, now: SystemTime) -> Result<(), Reject> {
    if sale.start.is_some_and(|s| now < s) {
        return Err(Reject::NotStarted);
    }
    if sale.end.is_some_and(|e| now >= e) {
        return Err(Reject::Ended);
    }
    Ok(())
}

/// SKUs this instance knows are sold out, each until a re-check time. While a SKU is here,
/// requests for it are answered 410 without a store round trip: after a sell-out, store load
/// stays flat however hard buyers keep pressing "buy". The entry expires after the route's
/// `sold_out_recheck`, so stock raised through another instance is seen here too.
#[derive(Default)]
pub struct SoldOut {
    until: DashMap<String, Instant>,
}

impl SoldOut {
    pub fn mark(&self, sku: &str, recheck: Duration) {
        self.until.insert(sku.to_owned(), Instant::now() + recheck);
    }

    pub fn is_sold_out(&self, sku: &str) -> bool {
        match self.until.get(sku).map(|t| *t) {
            None => false,
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.until.remove(sku);
                false
            }
        }
    }

    /// Stock was raised: ask the store again at once.
    pub fn clear(&self, sku: &str) {
        self.until.remove(sku);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("2", 3).unwrap(), 2);
        for bad in ["0", "-1", "4", "two", "", "1.5", "99999999999999999999"] {
            assert_eq!(
                parse_quantity(bad, 3).unwrap_err().reason(),
                "bad_request",
                "{bad}"
            );
        }
    }

    #[test]
    fn skus() {
        assert!(validate_sku("sku-1.A_b").is_ok());
        for bad in ["", "a{b}", "a b", "a\n", &"x".repeat(MAX_SKU_LEN + 1)] {
            assert!(validate_sku(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sold_out_expires_and_clears() {
        let s = SoldOut::default();
        s.mark("a", Duration::from_secs(60));
        assert!(s.is_sold_out("a"));
        s.clear("a");
        assert!(!s.is_sold_out("a"));
        s.mark("b", Duration::ZERO);
        assert!(!s.is_sold_out("b"));
    }
}
