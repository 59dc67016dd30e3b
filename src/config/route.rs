//! One route's compilation: match, identity, limits and sale settings, checked with the
//! file, line and key of anything wrong (the caller supplies `err` to build that error).

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use serde_saphyr::{Location, Spanned};

use super::jwt;
use super::limits::compile_rate;
use super::raw::{RawIdentity, RawQuantity, RawRate, RawRoute, RawSale, RawSource, ReleaseOn};
use super::*;

pub(super) type ErrFn<'a> = dyn Fn(&Location, String, String) -> ConfigError + 'a;

/// Compiles route `i`; `base` is the config file's directory (for relative `jwks_file`s).
pub(super) fn compile_route(
    raw: RawRoute,
    i: usize,
    base: &Path,
    err: &ErrFn<'_>,
    at: &Location,
) -> Result<Route, ConfigError> {
    let key = |k: &str| format!("routes[{i}].{k}");
    let name = raw.name.trim().to_owned();
    if name.is_empty() {
        return Err(err(at, key("name"), "must not be empty".into()));
    }
    if name == crate::metrics::UNMATCHED {
        return Err(err(
            at,
            key("name"),
            format!("`{name}` is the metrics' label for requests no route matched"),
        ));
    }
    let identity = raw
        .identity
        .map(|s| compile_identity(s.value, &s.referenced, base, &|at, k, m| err(at, key(k), m)))
        .transpose()?;
    // A global bucket fails closed on a sale route unless it says otherwise, open elsewhere.
    let on_sale = raw.sale.is_some();
    let rate = |r: Option<Spanned<RawRate>>, k: &str| -> Result<Option<Rate>, ConfigError> {
        r.map(|s| {
            compile_rate(s, on_sale, &|at, sub, m| {
                err(at, key(&format!("{k}{sub}")), m)
            })
        })
        .transpose()
    };
    let per_user_at = raw.limits.per_user.as_ref().map(|s| s.referenced);
    let limits = Limits {
        route: rate(raw.limits.route, "limits.route")?,
        per_ip: rate(raw.limits.per_ip, "limits.per_ip")?,
        per_user: rate(raw.limits.per_user, "limits.per_user")?,
        in_flight: raw.limits.in_flight.map(NonZeroU32::get),
    };
    if let Some(per_user_at) = per_user_at
        && identity.is_none()
    {
        return Err(err(
            &per_user_at,
            key("limits.per_user"),
            "needs an `identity` on the route to know who the user is".into(),
        ));
    }
    let sale_at = raw.sale.as_ref().map(|s| s.value.start.map(|t| t.0));
    let sale = match raw.sale {
        None => None,
        Some(s) => {
            if identity.is_none() {
                return Err(err(
                    &s.referenced,
                    key("sale"),
                    "a sale route needs an `identity`: stock is limited per user".into(),
                ));
            }
            Some(compile_sale(
                s.value,
                &raw.matcher.path,
                &|at, k, m| err(at, key(&format!("sale.{k}")), m),
                &s.referenced,
            )?)
        }
    };
    let waiting_room = raw
        .waiting_room
        .map(|r| {
            super::room::compile_room(r.value, &name, sale_at.flatten(), base, &|at, k, m| {
                err(at, key(&format!("waiting_room.{k}")), m)
            })
        })
        .transpose()?;
    Ok(Route {
        name,
        methods: raw
            .matcher
            .method
            .map(|m| m.into_vec().into_iter().map(|m| m.0).collect())
            .unwrap_or_default(),
        path: raw.matcher.path,
        identity,
        limits,
        max_body: raw.max_body.map(|b| b.0),
        sale,
        waiting_room,
    })
}

fn compile_identity(
    raw: RawIdentity,
    at: &Location,
    base: &Path,
    err: &dyn Fn(&Location, &str, String) -> ConfigError,
) -> Result<Identity, ConfigError> {
    let source = match (raw.header, raw.cookie, raw.jwt) {
        (Some(h), None, None) => IdentitySource::Header(h.0),
        (None, Some(c), None) if !c.trim().is_empty() => IdentitySource::Cookie(c.trim().into()),
        (None, Some(_), None) => {
            return Err(err(at, "identity.cookie", "must not be empty".into()));
        }
        (None, None, Some(jwt)) => {
            let jwt_err = |at: &Location, k: &str, m: String| {
                let k = if k.is_empty() {
                    "identity.jwt".to_owned()
                } else {
                    format!("identity.jwt.{k}")
                };
                err(at, &k, m)
            };
            let compiled = jwt::compile_jwt(jwt.value, &jwt.referenced, base, &jwt_err)?;
            IdentitySource::Jwt(Arc::new(compiled))
        }
        _ => {
            return Err(err(
                at,
                "identity",
                "set exactly one of `header`, `cookie` or `jwt`".into(),
            ));
        }
    };
    Ok(Identity {
        source,
        max_length: raw.max_length.get(),
        normalize: raw.normalize,
    })
}

fn compile_sale(
    raw: RawSale,
    path: &PathTemplate,
    err: &dyn Fn(&Location, &str, String) -> ConfigError,
    at: &Location,
) -> Result<Sale, ConfigError> {
    let sku =
        compile_source(raw.sku.value, path).map_err(|m| err(&raw.sku.referenced, "sku", m))?;
    let per_user_limit = raw.per_user_limit.get();
    let quantity = match raw.quantity {
        None => Quantity::Fixed(1),
        Some(Spanned {
            value: RawQuantity::Fixed(n),
            referenced,
            ..
        }) => {
            if n == 0 || n > per_user_limit {
                return Err(err(
                    &referenced,
                    "quantity",
                    format!("must be between 1 and per_user_limit ({per_user_limit}), got {n}"),
                ));
            }
            Quantity::Fixed(n)
        }
        Some(Spanned {
            value: RawQuantity::From(src),
            referenced,
            ..
        }) => {
            Quantity::From(compile_source(src, path).map_err(|m| err(&referenced, "quantity", m))?)
        }
    };
    let mut release_on_status = Vec::new();
    for r in raw.release_on {
        match r {
            // A refused connection always releases (the backend certainly never saw the
            // order): listing it is accepted, for configs that spell it out.
            ReleaseOn::Named(_) => {}
            ReleaseOn::Status(code) if (400..=599).contains(&code) => release_on_status.push(code),
            ReleaseOn::Status(code) => {
                return Err(err(
                    at,
                    "release_on",
                    format!("status {code}: only 4xx/5xx answers can mean the order was not taken"),
                ));
            }
        }
    }
    let (start, end) = (raw.start.map(|t| t.0), raw.end.map(|t| t.0));
    if let (Some(s), Some(e)) = (start, end)
        && s >= e
    {
        return Err(err(at, "end", "must be after `start`".into()));
    }
    let stock_events = raw
        .stock_events
        .map(|s| {
            super::stock_stream::check_template(&s.value)
                .map(|()| s.value)
                .map_err(|m| err(&s.referenced, "stock_events", m))
        })
        .transpose()?;
    Ok(Sale {
        sku,
        quantity,
        per_user_limit,
        release_on_status,
        start,
        end,
        max_body: usize::try_from(raw.max_body.0).unwrap_or(usize::MAX),
        sold_out_recheck: raw.sold_out_recheck.0,
        stock_events,
    })
}

fn compile_source(raw: RawSource, path: &PathTemplate) -> Result<Source, String> {
    let source = match (raw.path_param, raw.query, raw.header, raw.json) {
        (Some(p), None, None, None) => {
            if !path.source.contains(&format!("{{{p}}}")) {
                return Err(format!(
                    "path_param `{p}` is not a parameter of the route path `{}`",
                    path.source
                ));
            }
            Source::PathParam(p)
        }
        (None, Some(q), None, None) if !q.is_empty() => Source::Query(q),
        (None, None, Some(h), None) => Source::Header(h.0),
        (None, None, None, Some(j)) if !j.is_empty() => Source::Json(j),
        _ => return Err("set exactly one of `path_param`, `query`, `header` or `json`".into()),
    };
    Ok(source)
}
