//! `sale.stock_events`: the path where flashgate serves a SKU's stock stream to shoppers
//! (server-sent events, `stock_events.rs`). Checked twice: the template on its own, when its
//! route is compiled ([`check_template`]), then against every route ([`refuse_collisions`]).
//!
//! The stream is answered *before* routing (it never reaches the backend), so a stream path
//! takes its requests away from any route that also matches them. The rule:
//!
//! - no **sale** route may match a stream path (including the stream's own sale route): a
//!   buy would be answered with a stream, or a stream request admitted as a buy;
//! - no **ordinary** route may match a stream path either, unless its template ends in a
//!   catch-all (`/{*rest}`, `/api/{*path}`): a catch-all is a fallback, and the stream paths
//!   are carved out of it; any other route names paths it means to reach the backend;
//! - two different stream templates may not share a path (which `{sku}` would it be?); the
//!   same template on several sale routes is one stream;
//! - the `health_path` may not be a stream path (it is answered first).
//!
//! Whether two templates share a path is decided exactly by [`super::templates_overlap`],
//! the check that also refuses shadowed sale routes.

use serde_saphyr::Location;

use super::route::ErrFn;
use super::{ConfigError, PathTemplate, Route, templates_overlap};

/// A stream template: a valid path template (starts with `/`, no trailing `/`) whose one
/// parameter is `{sku}`.
pub(super) fn check_template(s: &str) -> Result<(), String> {
    PathTemplate::compile(s)?;
    let params = params(s);
    if params.iter().any(|p| p.starts_with('*')) {
        return Err(format!(
            "`{s}`: a stream path cannot have a catch-all; name the SKU with `{{sku}}`"
        ));
    }
    match params.as_slice() {
        ["sku"] => Ok(()),
        [] => Err(format!(
            "`{s}` has no `{{sku}}`: the stream is per SKU, e.g. \"/api/flash/{{sku}}/events\""
        )),
        _ => Err(format!(
            "`{s}`: the only parameter of a stream path is `{{sku}}`, once"
        )),
    }
}

/// The `{name}` parameters of a template, in order (`{{` and `}}` are literal braces).
fn params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'}' if bytes.get(i + 1) == Some(&bytes[i]) => i += 2,
            b'{' => {
                let end = s[i..].find('}').map_or(s.len(), |e| i + e);
                out.push(&s[(i + 1).min(end)..end]);
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// A template ending in a catch-all parameter (`/{*rest}`): a fallback route.
fn is_catch_all(template: &str) -> bool {
    template.ends_with('}')
        && template
            .rsplit('/')
            .next()
            .is_some_and(|last| last.starts_with("{*"))
}

/// Refuses the first stream path that a route, another stream path or the health path
/// shares (see the module doc for the rule). `at[i]` is where route `i` is defined.
pub(super) fn refuse_collisions(
    routes: &[Route],
    at: &[Location],
    health_path: Option<&str>,
    err: &ErrFn<'_>,
) -> Result<(), ConfigError> {
    let line = |i: usize| at.get(i).map_or(0, Location::line);
    let place = |i: usize| at.get(i).copied().unwrap_or(Location::UNKNOWN);
    let key = |j: usize| format!("routes[{j}].sale.stock_events");
    let streams = routes
        .iter()
        .enumerate()
        .filter_map(|(j, r)| Some((j, r.sale.as_ref()?.stock_events.as_deref()?)));
    for (j, stream) in streams.clone() {
        for (i, route) in routes.iter().enumerate() {
            let Some(example) = templates_overlap(&route.path.source, stream) else {
                continue;
            };
            let why = if route.sale.is_some() {
                "a stream path must not match any sale route's path"
            } else if is_catch_all(&route.path.source) {
                continue;
            } else {
                "flashgate answers stream paths before routing, so that route would never \
                 get them; only a catch-all route (`/{*rest}`) may share a stream's paths"
            };
            return Err(err(
                &place(j),
                key(j),
                format!(
                    "stock stream `{stream}` (line {}) and route \"{}\" (line {}) both match \
                     e.g. {example}: {why}",
                    line(j),
                    route.name,
                    line(i),
                ),
            ));
        }
        for (k, other) in streams.clone().take_while(|(k, _)| *k < j) {
            if other == stream {
                continue;
            }
            if let Some(example) = templates_overlap(other, stream) {
                return Err(err(
                    &place(j),
                    key(j),
                    format!(
                        "stock streams `{other}` (line {}) and `{stream}` (line {}) both match \
                         e.g. {example}: which SKU would it be? Use one template or disjoint ones",
                        line(k),
                        line(j),
                    ),
                ));
            }
        }
        if let Some(health) = health_path
            && PathTemplate::compile(stream).is_ok_and(|t| t.router.at(health).is_ok())
        {
            return Err(err(
                &place(j),
                key(j),
                format!("stock stream `{stream}` matches the health path `{health}`"),
            ));
        }
    }
    // The one router the request path will match them with (`stock_events::Paths`).
    let mut router = matchit::Router::new();
    let mut inserted = std::collections::BTreeSet::new();
    for (j, stream) in streams {
        if inserted.insert(stream)
            && let Err(e) = router.insert(stream, ())
        {
            return Err(err(
                &place(j),
                key(j),
                format!("stock stream `{stream}` cannot be served beside the others: {e}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert!(check_template("/api/flash/{sku}/events").is_ok());
        assert!(check_template("/events/{sku}").is_ok());
        assert!(check_template("/events/sku-{sku}.json").is_ok());
        for bad in [
            "api/{sku}/events",
            "/api/{sku}/events/",
            "/api/events",
            "/api/{id}/events",
            "/api/{sku}/{sku}",
            "/api/{shop}/{sku}",
            "/api/{*sku}",
            "/api/{sku",
        ] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn params_and_catch_alls() {
        assert_eq!(params("/a/{x}/b{{c}}/{*rest}"), ["x", "*rest"]);
        assert!(is_catch_all("/{*rest}"));
        assert!(is_catch_all("/api/{*p}"));
        assert!(!is_catch_all("/api/{sku}"));
        assert!(!is_catch_all("/api/{*p}/x"));
    }
}
