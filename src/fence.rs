//! The fence around sale paths. A request that does not match a sale route exactly, but that
//! a backend framework could still route to the buy handler, is refused — never forwarded.
//!
//! Frameworks fold paths and methods in ways flashgate cannot know: Express and ASP.NET ignore
//! case, servlet containers strip `;params` and resolve `..;`, Werkzeug upper-cases a
//! lower-case method, Rack and Express turn `POST` + `X-HTTP-Method-Override: PUT` into a
//! `PUT`, and a handler that never checks the method buys on `GET`. So each sale route also
//! gets a folded template ([`canonical::fold`]), and a request whose folded path lands on one
//! is refused unless it matched that sale route itself:
//!
//! | request | answer |
//! |---|---|
//! | the sale route's exact path, another method (`GET`, `post`) | 405 `method_not_allowed` + `Allow` |
//! | a folded spelling of a sale path (case, `;x`, `buy.`, `buy%20`, `%2F`…) | 400 `bad_request` |
//! | a sale route's request carrying a method override (header, `_method`) | 400 `bad_request` |
//!
//! The one exception: a route the operator declared for the same path template and that
//! method (for example `OPTIONS /api/flash/{sku}/buy` for CORS preflights).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method};

use crate::canonical;
use crate::config::{PathTemplate, Route};
use crate::reject::Reject;

/// Headers with which frameworks let a request pick another method.
pub const METHOD_OVERRIDE_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// The sale routes' paths, folded, compiled once per config.
pub struct Fence {
    sales: Vec<FencedSale>,
}

struct FencedSale {
    name: String,
    exact: PathTemplate,
    methods: Vec<Method>,
    folded: PathTemplate,
}

impl Fence {
    pub fn new(routes: &[Route]) -> Fence {
        let sales = routes
            .iter()
            .filter(|r| r.sale.is_some())
            .filter_map(|r| {
                // A template that folds into something matchit refuses (two parameters that
                // differ only in case) is still fenced through its exact form.
                let folded = PathTemplate::compile(&fold_template(&r.path.source))
                    .or_else(|_| PathTemplate::compile(&r.path.source))
                    .ok()?;
                Some(FencedSale {
                    name: r.name.clone(),
                    exact: r.path.clone(),
                    methods: r.methods.clone(),
                    folded,
                })
            })
            .collect();
        Fence { sales }
    }

    /// Checks a request whose first matching route (`matched`, if any) is not a sale route.
    /// `canonical` is its canonical path.
    pub fn check(
        &self,
        method: &Method,
        canonical: &str,
        matched: Option<&Route>,
    ) -> Result<(), Reject> {
        if self.sales.is_empty() {
            return Ok(());
        }
        let exact = canonical::match_form(canonical);
        let folded: Cow<'_, str> = if canonical::folds_to_itself(canonical) {
            Cow::Borrowed(exact)
        } else {
            Cow::Owned(canonical::fold(canonical))
        };
        for sale in &self.sales {
            if sale.folded.router.at(&folded).is_err() {
                continue;
            }
            if sale.exact.router.at(exact).is_ok() {
                // Declared by the operator for this very path template and method: theirs.
                if matched.is_some_and(|r| {
                    r.path.source == sale.exact.source && r.methods.contains(method)
                }) {
                    return Ok(());
                }
                return Err(Reject::MethodNotAllowed {
                    allow: allow_header(&sale.methods),
                });
            }
            return Err(Reject::BadRequest(format!(
                "this path is another spelling of the sale route `{}` ({}); send it as written there",
                sale.name, sale.exact.source
            )));
        }
        Ok(())
    }
}

/// Whether a request on a sale route asks for another method: an override header, or a
/// `_method` query parameter (any percent-encoded or case spelling of the key).
pub fn overrides_method(headers: &HeaderMap, query: Option<&str>) -> bool {
    METHOD_OVERRIDE_HEADERS
        .iter()
        .any(|h| headers.contains_key(h))
        || query.is_some_and(|q| {
            form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k.eq_ignore_ascii_case("_method"))
        })
}

fn allow_header(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Folds a template's literal text like [`canonical::fold`] folds a path; parameter names
/// stay as written.
fn fold_template(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut depth = 0u32;
    for c in template.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > 0 || c == '}' {
            out.push(c);
        } else {
            out.extend(c.to_uppercase().flat_map(char::to_lowercase));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(yaml_routes: &str) -> Vec<Route> {
        let yaml = format!("upstream: {{ url: \"http://127.0.0.1:1\" }}\nroutes:\n{yaml_routes}");
        crate::config::parse(&yaml, "fence.yaml")
            .unwrap_or_else(|e| panic!("{e}"))
            .routes
    }

    const SALE: &str = r#"
  - name: flash-buy
    match: { method: POST, path: "/api/flash/{sku}/buy" }
    identity: { header: X-User-Id }
    sale: { sku: { path_param: sku } }
  - name: preflight
    match: { method: OPTIONS, path: "/api/flash/{sku}/buy" }
  - name: rest
    match: { path: "/{*rest}" }
"#;

    /// Every fenced spelling and its verdict (`None`: forwarded; `Some(status)`).
    const FENCED: &[(&str, &str, Option<u16>)] = &[
        ("GET", "/api/flash/tee/buy", Some(405)),
        ("PUT", "/api/flash/tee/buy", Some(405)),
        ("post", "/api/flash/tee/buy", Some(405)),
        ("Post", "/api/flash/tee/buy/", Some(405)),
        ("OPTIONS", "/api/flash/tee/buy", None),
        ("POST", "/API/flash/tee/buy", Some(400)),
        ("POST", "/api/flash/tee/BUY", Some(400)),
        ("post", "/Api/Flash/tee/Buy", Some(400)),
        ("POST", "/api/flash/tee/buy;x=1", Some(400)),
        ("POST", "/api/flash/tee/buy.", Some(400)),
        ("POST", "/api/flash/tee/buy%20", Some(400)),
        ("POST", "/api/flash/tee/buy..", Some(400)),
        ("POST", "/zz/..;/api/flash/tee/buy", Some(400)),
        ("POST", "/api/flash/tee%2fbuy", Some(400)),
        // Servers that decode twice read `%2562` as `b`.
        ("POST", "/api/flash/tee/%2562uy", Some(400)),
        ("POST", "/api/flash/tee%252fbuy", Some(400)),
        ("GET", "/api/flash/tee", None),
        ("GET", "/api/flash/tee/buy/more", None),
        ("GET", "/static/app.js", None),
        ("POST", "/api/flash/tee/buyer", None),
    ];

    #[test]
    fn fenced_spellings() {
        let routes = routes(SALE);
        let fence = Fence::new(&routes);
        for (method, path, want) in FENCED {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let matched = routes[1..].iter().find(|r| {
                r.matches_method(&method) && r.path.router.at(canonical::match_form(path)).is_ok()
            });
            let got = fence
                .check(&method, path, matched)
                .err()
                .map(|r| r.status().as_u16());
            assert_eq!(got, *want, "{method} {path}");
        }
    }

    #[test]
    fn method_not_allowed_names_the_sale_methods() {
        let routes = routes(SALE);
        let fence = Fence::new(&routes);
        let err = fence
            .check(&Method::GET, "/api/flash/tee/buy", routes.get(2))
            .unwrap_err();
        assert_eq!(
            err,
            Reject::MethodNotAllowed {
                allow: "POST".into()
            }
        );
    }

    #[test]
    fn overrides() {
        let mut h = HeaderMap::new();
        assert!(!overrides_method(&h, Some("a=1")));
        assert!(overrides_method(&h, Some("a=1&_method=PUT")));
        assert!(overrides_method(&h, Some("%5Fmethod=PUT")));
        assert!(overrides_method(&h, Some("_METHOD=PUT")));
        h.insert("x-http-method", "PUT".parse().unwrap());
        assert!(overrides_method(&h, None));
    }

    #[test]
    fn templates_fold_literals_only() {
        assert_eq!(fold_template("/API/{Sku}/Buy"), "/api/{Sku}/buy");
        assert_eq!(fold_template("/{*Rest}"), "/{*Rest}");
    }
}
