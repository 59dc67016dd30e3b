//! `GET /dashboard`: the live dashboard, one page embedded in the binary (HTML, script, style
//! and icon from `src/admin/dashboard/`, no CDN: it works offline). The page holds no data, so
//! it needs no token; its script reads the token from `#token=…` (a fragment never reaches a
//! server or its log), removes it from the address bar, keeps it in `sessionStorage`, or asks
//! for it, and then reads [`/v1/events`](super::events) with `fetch()` and an
//! `Authorization: Bearer` header, so the token is never in a URL.
//!
//! Every asset is served with a strict `Content-Security-Policy` (scripts, styles, images and
//! connections from this origin only; no inline script or style; no frames, forms or base
//! URL), `X-Frame-Options: DENY`, `nosniff` and no referrer. No CORS headers, as everywhere on
//! the admin API.

use http::{HeaderValue, Method, Response, StatusCode};

use crate::body::{self, Body};

const HTML: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");
const ICON: &str = include_str!("dashboard/icon.svg");

/// The policy of every dashboard asset: nothing but this origin's own files and its own
/// admin API (`connect-src` for the event stream).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The dashboard's paths and what each serves.
const ASSETS: [(&str, &str, &str); 4] = [
    ("/dashboard", "text/html; charset=utf-8", HTML),
    ("/dashboard.js", "text/javascript; charset=utf-8", SCRIPT),
    ("/dashboard.css", "text/css; charset=utf-8", STYLE),
    ("/dashboard.svg", "image/svg+xml", ICON),
];

/// The answer for `path` when it is one of the dashboard's (no token needed), else `None`.
pub fn serve(path: &str, method: &Method) -> Option<Response<Body>> {
    let (_, content_type, content) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    if method != Method::GET && method != Method::HEAD {
        let mut resp = super::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the dashboard is read with GET",
        );
        resp.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(resp);
    }
    let mut resp = Response::new(body::full(*content));
    let headers = resp.headers_mut();
    for (name, value) in [
        (http::header::CONTENT_TYPE, *content_type),
        (http::header::CONTENT_SECURITY_POLICY, CSP),
        (http::header::X_FRAME_OPTIONS, "DENY"),
        (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (http::header::REFERRER_POLICY, "no-referrer"),
        // Revalidated on each load: a new flashgate brings its own page.
        (http::header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        // No inline script or style (the policy would block them), no other origin.
        assert!(!HTML.contains("<script>") && !HTML.contains("style="));
        for (path, _, _) in &ASSETS[1..] {
            assert!(HTML.contains(&format!("\"{path}\"")), "{path} not linked");
        }
        for asset in [HTML, SCRIPT, STYLE, ICON] {
            assert!(!asset.contains("https://") && !asset.contains("//cdn"));
        }
        assert!(serve("/dashboard/", &Method::GET).is_none());
        let post = serve("/dashboard", &Method::POST).unwrap();
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
