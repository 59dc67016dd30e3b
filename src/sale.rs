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
use crate::ids::Sku;
use crate::reject::Reject;

/// What the buyer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Parsed here, at the edge, by the one SKU rule ([`Sku::parse`]).
    pub sku: Sku,
    pub quantity: u32,
}

/// Reads the SKU and quantity, each from exactly one place: a source that occurs twice (a
/// repeated query key or header, a JSON key repeated or present in another case) is refused,
/// because the backend's parser may pick the other one. When a value is a JSON body field,
/// or the body is a form (which may carry `_method`), the body is read (at most `max_body`
/// bytes) and handed back intact for forwarding.
pub async fn read_order(
    sale: &Sale,
    parts: &Parts,
    path_params: &matchit::Params<'_, '_>,
    body: Body,
) -> Result<(Order, Body), Reject> {
    let form = form_kind(parts);
    if sale.reads_body() && !is_json(parts) {
        // A backend that parses only `application/json` would not find the order flashgate
        // reserved for (Express, Flask, FastAPI refuse or ignore a `text/plain` body).
        return Err(Reject::BadRequest(
            "the body must be sent as Content-Type: application/json".into(),
        ));
    }
    let (json, body) = if sale.reads_body() || form.is_some() {
        let bytes = read_limited(body, sale.max_body).await?;
        if let Some(kind) = form {
            refuse_form_fields(kind, &bytes, &query_names(sale))?;
        }
        let json = if sale.reads_body() {
            Some(JsonFields::parse(&bytes)?)
        } else {
            None
        };
        (json, body::full(bytes))
    } else {
        (None, body)
    };
    let get = |source: &Source| lookup(source, parts, path_params, json.as_ref());

    let sku = match get(&sale.sku)? {
        None => return Err(Reject::BadRequest("no SKU on the request".into())),
        Some(Value::Text(s)) => s,
        Some(Value::Integer(_)) => {
            return Err(Reject::BadRequest("the SKU must be a JSON string".into()));
        }
    };
    let sku = Sku::parse(&sku)?;
    let quantity = match &sale.quantity {
        Quantity::Fixed(n) => *n,
        Quantity::From(source) => match get(source)? {
            None => return Err(Reject::BadRequest("no quantity on the request".into())),
            Some(Value::Text(raw)) if matches!(source, Source::Json(_)) => {
                return Err(Reject::BadRequest(format!(
                    "quantity `{raw}` must be a JSON integer, not a string"
                )));
            }
            Some(Value::Text(raw)) => parse_quantity(&raw, sale.per_user_limit)?,
            Some(Value::Integer(n)) => check_quantity(n, sale.per_user_limit)?,
        },
    };
    Ok((Order { sku, quantity }, body))
}

/// A value read from the request.
enum Value {
    Text(String),
    /// A JSON integer.
    Integer(i64),
}

#[derive(Clone, Copy)]
enum FormKind {
    UrlEncoded,
    Multipart,
}

/// The request's media type (`Content-Type` without its parameters).
fn media_type(parts: &Parts) -> Option<&str> {
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?;
    Some(ct.split(';').next().unwrap_or("").trim())
}

fn form_kind(parts: &Parts) -> Option<FormKind> {
    let essence = media_type(parts)?;
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Some(FormKind::UrlEncoded)
    } else if essence.eq_ignore_ascii_case("multipart/form-data") {
        Some(FormKind::Multipart)
    } else {
        None
    }
}

fn is_json(parts: &Parts) -> bool {
    media_type(parts).is_some_and(|essence| essence.eq_ignore_ascii_case("application/json"))
}

/// The query keys the sale reads its values from.
fn query_names(sale: &Sale) -> Vec<&str> {
    let quantity = match &sale.quantity {
        Quantity::From(source) => Some(source),
        Quantity::Fixed(_) => None,
    };
    [Some(&sale.sku), quantity]
        .into_iter()
        .flatten()
        .filter_map(|source| match source {
            Source::Query(name) => Some(name.as_str()),
            _ => None,
        })
        .collect()
}

/// Form fields a sale route refuses. `_method`: Rack, Laravel, Express `method-override` and
/// Spring's hidden-method filter read it as the request's method. And a key the sale reads
/// from the query: Go's `r.FormValue`, PHP's `$_REQUEST`, Flask's `request.values` and a
/// servlet's `getParameter` merge query and form, some preferring the body — the backend
/// would sell what the body names while flashgate reserved what the query named.
fn refuse_form_fields(kind: FormKind, body: &[u8], query_names: &[&str]) -> Result<(), Reject> {
    let names = std::iter::once("_method").chain(query_names.iter().copied());
    for name in names {
        let present = match kind {
            FormKind::UrlEncoded => form_urlencoded::parse(body).any(|(k, _)| same_key(&k, name)),
            FormKind::Multipart => multipart_has_field(body, name),
        };
        if present && name == "_method" {
            return Err(Reject::BadRequest(
                "a method override (`_method`) is not accepted on a sale route".into(),
            ));
        }
        if present {
            return Err(Reject::BadRequest(format!(
                "`{name}` is read from the query: the form body must not carry it too"
            )));
        }
    }
    Ok(())
}

/// A multipart part named `name` (quoted or not, any case, or `name[...]`), found by every
/// `name=` parameter in the body (a part's `Content-Disposition`).
fn multipart_has_field(body: &[u8], name: &str) -> bool {
    const PARAM: &[u8] = b"name=";
    let mut rest = body;
    while let Some(at) = rest
        .windows(PARAM.len())
        .position(|w| w.eq_ignore_ascii_case(PARAM))
    {
        // A parameter of its own, not the tail of `filename=`.
        let own = at == 0 || matches!(rest[at - 1], b';' | b' ' | b'\t');
        rest = &rest[at + PARAM.len()..];
        if !own {
            continue;
        }
        let value = rest.strip_prefix(b"\"").unwrap_or(rest);
        let end = value
            .iter()
            .position(|b| matches!(b, b'"' | b';' | b'\r' | b'\n'))
            .unwrap_or(value.len());
        if std::str::from_utf8(&value[..end]).is_ok_and(|key| same_key(key.trim(), name)) {
            return true;
        }
    }
    false
}

/// Whether query or form key `key` names `name`: in any case, or as `name[...]` (qs and PHP
/// read that as an array).
fn same_key(key: &str, name: &str) -> bool {
    key.eq_ignore_ascii_case(name)
        || key
            .get(..name.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(name))
            && key[name.len()..].starts_with('[')
}

/// Reads a whole body of at most `max` bytes (413 past that). Trailers are not kept: a buy
/// request whose body flashgate must read is a small JSON document or form.
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

/// The top-level fields of a JSON object body, duplicates kept: serde_json's map would keep
/// only the last of `{"sku":"a","sku":"b"}`, hiding the ambiguity.
struct JsonFields(Vec<(String, serde_json::Value)>);

impl JsonFields {
    fn parse(bytes: &[u8]) -> Result<JsonFields, Reject> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let fields = match serde::de::Deserializer::deserialize_any(&mut de, FieldsVisitor) {
            Ok(Some(fields)) => fields,
            Ok(None) => {
                return Err(Reject::BadRequest(
                    "the request body must be a JSON object".into(),
                ));
            }
            Err(e) => return Err(Reject::BadRequest(format!("invalid JSON body: {e}"))),
        };
        de.end()
            .map_err(|e| Reject::BadRequest(format!("invalid JSON body: {e}")))?;
        Ok(JsonFields(fields))
    }

    /// The one field named `name`. A key equal to it under Unicode case folding (`SKU`,
    /// `ſku` — Go's decoder matches those) counts as a second occurrence.
    fn get(&self, name: &str) -> Result<Option<&serde_json::Value>, Reject> {
        let want = case_fold(name);
        let mut hits = self.0.iter().filter(|(k, _)| case_fold(k) == want);
        let first = hits.next();
        if first.is_some() && hits.next().is_some() {
            return Err(Reject::BadRequest(format!(
                "JSON key `{name}` occurs more than once (counting other letter cases)"
            )));
        }
        Ok(first.filter(|(k, _)| k == name).map(|(_, v)| v))
    }
}

struct FieldsVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    /// `None`: valid JSON, but not an object.
    type Value = Option<Vec<(String, serde_json::Value)>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::new();
        while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
            fields.push(entry);
        }
        Ok(Some(fields))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Simple Unicode case folding as Go's `EqualFold` applies it: `ſ` → `s`, `K` (Kelvin) → `k`.
fn case_fold(s: &str) -> String {
    s.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

fn lookup(
    source: &Source,
    parts: &Parts,
    path_params: &matchit::Params<'_, '_>,
    json: Option<&JsonFields>,
) -> Result<Option<Value>, Reject> {
    Ok(match source {
        Source::PathParam(name) => path_params
            .get(name)
            .map(percent_decode)
            .transpose()?
            .map(Value::Text),
        Source::Query(name) => query_value(parts.uri.query(), name)?.map(Value::Text),
        Source::Header(name) => {
            let mut values = parts.headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => None,
                (Some(_), Some(_)) => {
                    return Err(Reject::BadRequest(format!(
                        "header {name} occurs more than once"
                    )));
                }
                (Some(v), None) => Some(Value::Text(
                    v.to_str()
                        .map_err(|_| Reject::BadRequest(format!("header {name} is not text")))?
                        .trim()
                        .to_owned(),
                )),
            }
        }
        Source::Json(field) => match json.map(|j| j.get(field)).transpose()?.flatten() {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(Value::Text(s.clone())),
            Some(serde_json::Value::Number(n)) => match n.as_i64() {
                Some(i) => Some(Value::Integer(i)),
                None => {
                    return Err(Reject::BadRequest(format!(
                        "JSON field `{field}` must be an integer"
                    )));
                }
            },
            Some(_) => {
                return Err(Reject::BadRequest(format!(
                    "JSON field `{field}` must be a string or an integer"
                )));
            }
        },
    })
}

/// The value of query key `name`, which must occur once. Counted as occurrences: any
/// percent-encoded or case spelling of the key and `name[...]`. A query with a `;` is refused
/// outright: Go drops a pair containing one, older parsers split on it, Tomcat, Werkzeug,
/// Express and Starlette keep it in the value — no reading of it is the backend's for sure.
fn query_value(query: Option<&str>, name: &str) -> Result<Option<String>, Reject> {
    let Some(q) = query else { return Ok(None) };
    if q.contains(';') {
        return Err(Reject::BadRequest(
            "a `;` in the query of a sale request is read differently by backends".into(),
        ));
    }
    let mut value = None;
    let mut seen = 0;
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        if same_key(&k, name) {
            seen += 1;
            if k == name {
                value = Some(v.into_owned());
            }
        }
    }
    if seen > 1 {
        return Err(Reject::BadRequest(format!(
            "query parameter `{name}` occurs more than once"
        )));
    }
    Ok(value)
}

fn percent_decode(s: &str) -> Result<String, Reject> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| Reject::BadRequest("path parameter is not valid UTF-8".into()))
}

/// The most units one request may ask for: Lua numbers are doubles, exact up to 2^53 − 1.
pub const MAX_QUANTITY: i64 = (1 << 53) - 1;

/// A quantity written as text (query or header): plain decimal digits only — no sign, no
/// spaces, no decimal point — so every backend parser reads the same number.
pub fn parse_quantity(raw: &str, per_user_limit: u32) -> Result<u32, Reject> {
    let digits = !raw.is_empty() && raw.len() <= 16 && raw.bytes().all(|b| b.is_ascii_digit());
    let n: i64 = raw
        .parse()
        .ok()
        .filter(|_| digits)
        .ok_or_else(|| Reject::BadRequest(format!("quantity `{raw}` is not a whole number")))?;
    check_quantity(n, per_user_limit)
}

/// A quantity is a whole number from 1 to the per-user limit.
fn check_quantity(n: i64, per_user_limit: u32) -> Result<u32, Reject> {
    if n < 1 || n > i64::from(per_user_limit) || n > MAX_QUANTITY {
        return Err(Reject::BadRequest(format!(
            "quantity must be between 1 and {per_user_limit}, got {n}"
        )));
    }
    u32::try_from(n).map_err(|_| Reject::BadRequest(format!("quantity {n} is too large")))
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
    until: DashMap<Sku, Instant>,
}

impl SoldOut {
    pub fn mark(&self, sku: &Sku, recheck: Duration) {
        self.until.insert(sku.clone(), Instant::now() + recheck);
    }

    pub fn is_sold_out(&self, sku: &Sku) -> bool {
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
    pub fn clear(&self, sku: &Sku) {
        self.until.remove(sku);
    }

    /// Forget every flag (news of the store may have been missed: ask it again).
    pub fn clear_all(&self) {
        self.until.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("2", 3).unwrap(), 2);
        for bad in [
            "0",
            "-1",
            "4",
            "two",
            "",
            "1.5",
            "99999999999999999999",
            "+1",
            " 1",
            "1 ",
            "1e0",
        ] {
            assert_eq!(
                parse_quantity(bad, 3).unwrap_err().reason(),
                "bad_request",
                "{bad}"
            );
        }
    }

    #[test]
    fn query_keys_must_occur_once_in_every_spelling() {
        assert_eq!(
            query_value(Some("sku=a&x=1"), "sku").unwrap().as_deref(),
            Some("a")
        );
        assert_eq!(query_value(Some("x=1"), "sku").unwrap(), None);
        assert_eq!(query_value(None, "sku").unwrap(), None);
        for q in [
            "sku=a&sku=b",
            "sku=a&%73ku=b",
            "sku=a&SKU=b",
            "sku=a&sku[]=b",
            "sku=a&sku%5B0%5D=b",
            "x=1;sku=b&sku=a",
        ] {
            assert!(query_value(Some(q), "sku").is_err(), "{q}");
        }
        // Only another case: the backend may read it, flashgate does not.
        assert_eq!(query_value(Some("SKU=a"), "sku").unwrap(), None);
        assert_eq!(
            query_value(Some("skus=a&sku=b"), "sku").unwrap().as_deref(),
            Some("b")
        );
    }

    #[test]
    fn json_keys_must_occur_once_under_case_folding() {
        let one = JsonFields::parse(br#"{"sku":"a","quantity":2}"#).unwrap();
        assert_eq!(one.get("sku").unwrap(), Some(&serde_json::json!("a")));
        assert_eq!(one.get("missing").unwrap(), None);
        for body in [
            r#"{"sku":"a","sku":"b"}"#,
            r#"{"sku":"a","SKU":"b"}"#,
            r#"{"SKU":"b","sku":"a"}"#,
            "{\"sku\":\"a\",\"\\u017fku\":\"b\"}",
            "{\"sku\":\"a\",\"s\\u212au\":\"b\"}",
            "{\"sku\":\"a\",\"ſku\":\"b\"}",
        ] {
            let fields = JsonFields::parse(body.as_bytes()).unwrap();
            assert!(fields.get("sku").is_err(), "{body}");
        }
        for bad in ["[1]", "1", "\"x\"", "{", "{}x", r#"{"a":1} {"b":2}"#] {
            assert!(JsonFields::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn form_fields_a_backend_could_read_instead_are_refused() {
        let url = FormKind::UrlEncoded;
        let multi = FormKind::Multipart;
        let part =
            |name: &str| format!("--x\r\nContent-Disposition: form-data; {name}\r\n\r\nv\r\n--x--");
        for (kind, body, names, refused) in [
            (url, "a=1&b=2".to_owned(), &[][..], false),
            (url, "a=1&_method=PUT".to_owned(), &[], true),
            (url, "%5Fmethod=PUT".to_owned(), &[], true),
            (multi, part("name=\"_method\""), &[], true),
            (url, "sku=tee".to_owned(), &["sku"][..], true),
            (url, "note=1&SKU=tee".to_owned(), &["sku"], true),
            (url, "%73ku=tee".to_owned(), &["sku"], true),
            (url, "sku[]=tee".to_owned(), &["sku"], true),
            (url, "skus=tee".to_owned(), &["sku"], false),
            (url, "qty=2".to_owned(), &["sku", "qty"], true),
            (multi, part("name=\"sku\""), &["sku"], true),
            (multi, part("name=sku"), &["sku"], true),
            (multi, part("NAME=\"Sku[0]\""), &["sku"], true),
            (multi, part("name=\"skus\""), &["sku"], false),
            (
                multi,
                part("filename=\"sku\"; name=\"file\""),
                &["sku"],
                false,
            ),
        ] {
            assert_eq!(
                refuse_form_fields(kind, body.as_bytes(), names).is_err(),
                refused,
                "{body} {names:?}"
            );
        }
    }

    #[test]
    fn a_bad_sku_is_a_bad_request() {
        let e = Reject::from(Sku::parse("a b").unwrap_err());
        assert_eq!(e.reason(), "bad_request");
        assert!(
            matches!(&e, Reject::BadRequest(m) if m.contains("invalid SKU")),
            "{e:?}"
        );
    }

    #[test]
    fn sold_out_expires_and_clears() {
        let s = SoldOut::default();
        let (a, b) = (Sku::parse("a").unwrap(), Sku::parse("b").unwrap());
        s.mark(&a, Duration::from_secs(60));
        assert!(s.is_sold_out(&a));
        s.clear(&a);
        assert!(!s.is_sold_out(&a));
        s.mark(&b, Duration::ZERO);
        assert!(!s.is_sold_out(&b));
    }
}
