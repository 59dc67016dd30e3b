//! The audit and reconciliation calls of the admin API (see the table in `admin/mod.rs`):
//! list the sales, audit them, list a sale's reservations that need attention, and resolve
//! one once the shop has checked its orders.
//!
//! Every listing is bounded (`limit`), and says when there was more (`"truncated": true`).

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tracing::info;

use super::{BadField, error, fields, read_json, reply, sku_segment, store_error};
use crate::audit;
use crate::body::Body;
use crate::ids::{ReservationId, Sku};
use crate::reject::Reject;
use crate::state::App;
use crate::store::{OpenState, ReservationQuery, Resolution, ResolveOutcome, StoreError};

/// Sales listed or audited at once, unless `limit` says otherwise…
const DEFAULT_SALES: usize = 1000;
/// …and at most (one status read per sale).
const MAX_SALES: usize = 10_000;
/// Reservations listed at once, unless `limit` says otherwise…
const DEFAULT_RESERVATIONS: usize = 100;
/// …and at most.
const MAX_RESERVATIONS: usize = 1000;
/// The lowest default for "held too long" (see [`stale_after`]).
const MIN_STALE_AFTER: Duration = Duration::from_secs(60);

/// An audit or reconciliation call, its path parsed.
#[derive(Debug)]
pub(super) enum Call {
    /// `GET /v1/audit`
    Audit,
    /// `GET /v1/sales`
    Sales,
    /// `GET /v1/sales/{sku}/reservations`
    Reservations(Sku),
    /// `POST /v1/sales/{sku}/reservations/{id}/resolve`
    Resolve(Sku, ReservationId),
}

impl Call {
    /// The call a path names, if it is one of these (`Err`: it is, but a segment is invalid).
    pub(super) fn from_path(segments: &[&str]) -> Option<Result<Call, Box<Response<Body>>>> {
        let id = |raw: &str| {
            ReservationId::parse(raw).map_err(|e| Box::new(Reject::from(e).into_response()))
        };
        Some(match segments {
            ["v1", "audit"] => Ok(Call::Audit),
            ["v1", "sales"] => Ok(Call::Sales),
            ["v1", "sales", sku, "reservations"] => sku_segment(sku).map(Call::Reservations),
            ["v1", "sales", sku, "reservations", raw_id, "resolve"] => {
                match (sku_segment(sku), id(raw_id)) {
                    (Ok(sku), Ok(id)) => Ok(Call::Resolve(sku, id)),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            _ => return None,
        })
    }

    fn method(&self) -> Method {
        match self {
            Call::Resolve(..) => Method::POST,
            _ => Method::GET,
        }
    }
}

pub(super) async fn handle(
    app: &App,
    who: &str,
    call: Call,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != call.method() {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method for this call",
        );
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let result = match call {
        Call::Audit => audit(app, &query).await,
        Call::Sales => sales(app, &query).await,
        Call::Reservations(sku) => reservations(app, &sku, &query).await,
        Call::Resolve(sku, id) => match read_json(req).await {
            Ok(body) => resolve(app, who, &sku, &id, &body).await,
            Err(resp) => return resp,
        },
    };
    result.unwrap_or_else(|refusal| *refusal.0)
}

/// An answer other than the call's success: a refused parameter, a store failure. (Boxed: a
/// `Response` is large to carry in every `Result`.)
struct Refusal(Box<Response<Body>>);

impl From<BadField> for Refusal {
    fn from(e: BadField) -> Self {
        Refusal(Box::new(e.response()))
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal(Box::new(store_error(e)))
    }
}

/// Past this age a `held` reservation counts as left behind: no flashgate is still waiting
/// for its backend (that takes at most `upstream.request_timeout`), so its outcome will not be
/// recorded by itself. Twice the timeout, at least a minute.
pub(super) fn stale_after(app: &App) -> Duration {
    (app.snapshot().config.upstream.request_timeout * 2).max(MIN_STALE_AFTER)
}

type Answer = Result<Response<Body>, Refusal>;

async fn audit(app: &App, query: &str) -> Answer {
    let params = Params::parse(query, &["sku", "held_older_than"])?;
    let held_older_than = params
        .duration("held_older_than")?
        .unwrap_or_else(|| stale_after(app));
    let mut skus = Vec::new();
    for raw in params.all("sku") {
        let sku = Sku::parse(raw).map_err(|e| BadField::new("sku", format!("{raw:?}: {e}")))?;
        if !skus.contains(&sku) {
            skus.push(sku);
        }
    }
    if skus.len() > MAX_SALES {
        return Err(BadField::new("sku", format!("at most {MAX_SALES} SKUs per audit")).into());
    }
    let truncated = if skus.is_empty() {
        let list = app.store.list_skus(MAX_SALES).await?;
        skus = list.skus;
        list.truncated
    } else {
        false
    };
    let mut sales = Vec::with_capacity(skus.len());
    for sku in &skus {
        let one = audit::audit_sale(&*app.store, sku, held_older_than).await?;
        sales.push(one);
    }
    let ok = !truncated && sales.iter().all(|s| s.ok);
    Ok(reply(
        StatusCode::OK,
        json!({
            "ok": ok,
            "held_older_than_ms": millis(held_older_than),
            "sales": sales,
            "truncated": truncated,
        }),
    ))
}

async fn sales(app: &App, query: &str) -> Answer {
    let params = Params::parse(query, &["limit"])?;
    let limit = params.limit(DEFAULT_SALES, MAX_SALES)?;
    let list = app.store.list_skus(limit).await?;
    let mut sales = Vec::with_capacity(list.skus.len());
    for sku in &list.skus {
        sales.push(app.store.status(sku).await?);
    }
    Ok(reply(
        StatusCode::OK,
        json!({ "sales": sales, "truncated": list.truncated }),
    ))
}

async fn reservations(app: &App, sku: &Sku, query: &str) -> Answer {
    let params = Params::parse(query, &["state", "older_than", "limit"])?;
    let state = match params.one("state")? {
        None => OpenState::Uncertain,
        Some(s) => OpenState::parse(s).ok_or_else(|| {
            BadField::new(
                "state",
                format!("state must be uncertain or held, not {s:?}"),
            )
        })?,
    };
    let query = ReservationQuery {
        state,
        older_than: params.duration("older_than")?.unwrap_or(Duration::ZERO),
        limit: params.limit(DEFAULT_RESERVATIONS, MAX_RESERVATIONS)?,
    };
    let page = app.store.reservations(sku, &query).await?;
    Ok(reply(
        StatusCode::OK,
        json!({
            "sku": sku,
            "state": state,
            "older_than_ms": millis(query.older_than),
            "reservations": page.reservations,
            "truncated": page.truncated,
        }),
    ))
}

async fn resolve(app: &App, who: &str, sku: &Sku, id: &ReservationId, body: &Value) -> Answer {
    let fields = fields(body, &["to"])?;
    let to = fields
        .get("to")
        .and_then(Value::as_str)
        .and_then(Resolution::parse)
        .ok_or_else(|| {
            BadField::new(
                "to",
                "body must be {\"to\": \"sold\"} or {\"to\": \"released\"}".to_owned(),
            )
        })?;
    let held_min_age = stale_after(app);
    let outcome = app.store.resolve(sku, id, to, held_min_age).await?;
    match outcome {
        ResolveOutcome::Resolved {
            from,
            quantity,
            remaining,
        } => {
            if to == Resolution::Released {
                // Units are back: ask the store again rather than answer sold out locally.
                app.sold_out.clear(sku);
            }
            info!(token = who, %sku, reservation = %id, from = from.as_str(), to = to.as_str(), quantity, stock = ?remaining, "admin write: reservation resolved");
            Ok(reply(
                StatusCode::OK,
                json!({
                    "sku": sku, "id": id, "from": from, "to": to,
                    "quantity": quantity, "stock": remaining,
                }),
            ))
        }
        ResolveOutcome::NotResolvable { state, age_ms } => {
            info!(token = who, %sku, reservation = %id, state = %state, to = to.as_str(), "admin write refused: reservation not resolvable");
            let why = match state.as_str() {
                "held" => format!(
                    "it is held, reserved {}s ago: its order may still be in flight (a held \
                     reservation is resolvable after {})",
                    age_ms / 1000,
                    humantime::format_duration(held_min_age)
                ),
                "sold" | "released" => format!("it is already {state}: nothing changed"),
                _ => format!("it is {state}: only uncertain (or long-held) reservations resolve"),
            };
            Ok(reply(
                StatusCode::CONFLICT,
                json!({
                    "error": "not_resolvable",
                    "message": why,
                    "sku": sku, "id": id, "state": state, "age_ms": age_ms,
                }),
            ))
        }
        ResolveOutcome::Unknown => Ok(error(
            StatusCode::NOT_FOUND,
            "unknown_reservation",
            &format!("sale {sku} has no reservation {id}"),
        )),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A query string, refusing names not in `allowed`.
struct Params<'q> {
    pairs: Vec<(std::borrow::Cow<'q, str>, std::borrow::Cow<'q, str>)>,
}

impl<'q> Params<'q> {
    fn parse(query: &'q str, allowed: &[&str]) -> Result<Params<'q>, BadField> {
        let pairs: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
        if let Some((unknown, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_ref())) {
            return Err(BadField::new(
                unknown,
                format!(
                    "unknown parameter `{unknown}` (this call takes {})",
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Params { pairs })
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// A parameter given at most once.
    fn one<'a>(&'a self, name: &'a str) -> Result<Option<&'a str>, BadField> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(BadField::new(name, format!("`{name}` given twice")));
        }
        Ok(first)
    }

    /// A duration like `60s`, `500ms`, `2m`.
    fn duration(&self, name: &str) -> Result<Option<Duration>, BadField> {
        self.one(name)?
            .map(|raw| {
                humantime::parse_duration(raw).map_err(|e| {
                    BadField::new(
                        name,
                        format!("`{name}` must be a duration like 60s, 500ms or 2m: {raw:?}: {e}"),
                    )
                })
            })
            .transpose()
    }

    /// `limit`: 1 to `max`, `default` when absent.
    fn limit(&self, default: usize, max: usize) -> Result<usize, BadField> {
        match self.one("limit")? {
            None => Ok(default),
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    BadField::new(
                        "limit",
                        format!("`limit` must be an integer from 1 to {max}, not {raw:?}"),
                    )
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_calls() {
        let id = "0123456789abcdef0123456789abcdef";
        let call = |p: &str| {
            let segments: Vec<&str> = p.trim_matches('/').split('/').collect();
            Call::from_path(&segments).map(|r| r.map_err(|resp| resp.status()))
        };
        assert!(matches!(call("/v1/audit"), Some(Ok(Call::Audit))));
        assert!(matches!(call("/v1/sales/"), Some(Ok(Call::Sales))));
        assert!(matches!(
            call("/v1/sales/tee/reservations"),
            Some(Ok(Call::Reservations(s))) if s == "tee"
        ));
        assert!(matches!(
            call(&format!("/v1/sales/tee/reservations/{id}/resolve")),
            Some(Ok(Call::Resolve(s, r))) if s == "tee" && r == id
        ));
        for bad in [
            "/v1/sales/a%20b/reservations".to_owned(),
            format!("/v1/sales/tee/reservations/{}/resolve", id.to_uppercase()),
            "/v1/sales/tee/reservations/x/resolve".to_owned(),
        ] {
            assert!(
                matches!(call(&bad), Some(Err(StatusCode::BAD_REQUEST))),
                "{bad}"
            );
        }
        for other in ["/v1/sales/tee", "/v1/stock/tee", "/v1/audit/tee"] {
            assert!(call(other).is_none(), "{other}");
        }
    }

    #[test]
    fn query_parameters() {
        let p = Params::parse(
            "sku=a&sku=b&held_older_than=90s",
            &["sku", "held_older_than"],
        )
        .unwrap();
        assert_eq!(p.all("sku").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            p.duration("held_older_than").unwrap(),
            Some(Duration::from_secs(90))
        );
        assert!(p.one("sku").is_err(), "sku given twice");
        assert_eq!(p.limit(7, 10).unwrap(), 7);
        assert!(Params::parse("skus=a", &["sku"]).is_err());
        let bad = Params::parse(
            "held_older_than=soon&limit=0",
            &["held_older_than", "limit"],
        )
        .unwrap();
        assert!(bad.duration("held_older_than").is_err());
        assert!(bad.limit(7, 10).is_err());
        let big = Params::parse("limit=11", &["limit"]).unwrap();
        assert!(big.limit(7, 10).is_err());
        assert_eq!(
            Params::parse("limit=10", &["limit"])
                .unwrap()
                .limit(7, 10)
                .unwrap(),
            10
        );
    }
}
