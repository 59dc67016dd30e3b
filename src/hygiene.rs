//! Header hygiene: what a client may not send through flashgate, applied to every request
//! before routing.
//!
//! - Only flashgate may speak as flashgate: the backend trusts `X-Flashgate-*`, so any client
//!   header of that name is removed — in any case, and with `_` for `-` too, because CGI/WSGI-
//!   style servers (and nginx with `underscores_in_headers`) read `X_Flashgate_Sku` as
//!   `X-Flashgate-Sku`. Nor may a client have them dropped through `Connection`.
//! - The same `_` spelling of a header flashgate reads a value from (user id, SKU, quantity)
//!   is removed, so the backend cannot read a second value under the same name.
//! - `Host` as RFC 9112 §3.2 has it: more than one, or none on an HTTP/1.1 request, is a
//!   400 ([`check_host`]); an absolute-form target's authority wins over `Host` (forward.rs).
//! - Method-override headers (`X-HTTP-Method-Override`…) are removed unless the config lets
//!   them pass: no framework can turn a request flashgate did not gate into a buy. Their
//!   presence is reported, so a sale route refuses the request instead.

use http::header::{CONNECTION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Version};

use crate::fence::METHOD_OVERRIDE_HEADERS;

/// What the cleaning found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// The request carried a method-override header (in any spelling).
    pub method_override: bool,
}

/// The header names a config makes sensitive, built once per snapshot.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Headers flashgate reads values from (identity, SKU, quantity sources).
    pub value_headers: Vec<HeaderName>,
    /// Method-override headers the backend is allowed to see on non-sale requests.
    pub pass_method_override: Vec<HeaderName>,
}

/// Cleans `headers` in place (see the module docs).
pub fn clean(headers: &mut HeaderMap, rules: &Rules) -> Found {
    let mut found = Found::default();
    let mut remove: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let s = name.as_str();
        let underscored = s.contains('_');
        if !underscored && !s.starts_with("x-") {
            continue;
        }
        // Header names are lower case already; only `_` needs folding.
        let dashed = if underscored {
            std::borrow::Cow::Owned(s.replace('_', "-"))
        } else {
            std::borrow::Cow::Borrowed(s)
        };
        if dashed.starts_with("x-flashgate-") {
            remove.push(name.clone());
            continue;
        }
        if METHOD_OVERRIDE_HEADERS.iter().any(|h| h.as_str() == dashed) {
            found.method_override = true;
            let passes = !underscored && rules.pass_method_override.contains(name);
            if !passes {
                remove.push(name.clone());
            }
            continue;
        }
        if underscored
            && rules
                .value_headers
                .iter()
                .any(|h| h.as_str() == dashed.as_ref())
        {
            remove.push(name.clone());
        }
    }
    for name in remove {
        headers.remove(name);
    }
    keep_ours_out_of_connection(headers);
    found
}

/// A client may not remove flashgate's headers either: the forwarder strips every header
/// named in `Connection`, which would drop the ones set on a winner
/// (`Connection: x-flashgate-user`).
fn keep_ours_out_of_connection(headers: &mut HeaderMap) {
    let ours = |token: &str| {
        token
            .trim()
            .replace('_', "-")
            .get(..12)
            .is_some_and(|p| p.eq_ignore_ascii_case("x-flashgate-"))
    };
    let nominates_ours = headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(ours)));
    if !nominates_ours {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
    headers.remove(CONNECTION);
    for value in values {
        let kept = match value.to_str() {
            Ok(v) => v
                .split(',')
                .filter(|t| !ours(t))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => {
                headers.append(CONNECTION, value);
                continue;
            }
        };
        if !kept.trim().is_empty()
            && let Ok(v) = HeaderValue::from_str(kept.trim())
        {
            headers.append(CONNECTION, v);
        }
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with more than one, is
/// refused — backends disagree on which of two to believe (and a virtual-hosting backend on
/// which shop the request is for). The message is the client's answer.
pub fn check_host(version: Version, headers: &HeaderMap) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("more than one Host header"),
        // Even with an absolute-form target, whose authority then wins (RFC 9112 §3.2.2).
        (None, None) if version == Version::HTTP_11 => {
            Err("an HTTP/1.1 request needs a Host header")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn spoofed_flashgate_headers_go_in_every_spelling() {
        let mut h = headers(&[
            ("X-Flashgate-Sku", "a"),
            ("x_flashgate_reservation", "r"),
            ("X-Flashgate_User", "u"),
            ("x-flashgatex", "kept"),
            ("accept", "*/*"),
            ("connection", "X_Flashgate_User, keep-alive"),
        ]);
        clean(&mut h, &Rules::default());
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-flashgatex", "accept", "connection"]);
        assert_eq!(h["connection"], "keep-alive");
    }

    #[test]
    fn underscore_twins_of_value_headers_go() {
        let rules = Rules {
            value_headers: vec![HeaderName::from_static("x-user-id")],
            ..Rules::default()
        };
        let mut h = headers(&[("x-user-id", "alice"), ("x_user_id", "mallory")]);
        clean(&mut h, &rules);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-user-id"], "alice");
    }

    #[test]
    fn method_overrides_are_found_and_stripped_unless_passed() {
        for name in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x_http_method_override",
        ] {
            let mut h = headers(&[(name, "PUT")]);
            assert!(clean(&mut h, &Rules::default()).method_override, "{name}");
            assert!(h.is_empty(), "{name}");
        }
        let rules = Rules {
            pass_method_override: vec![HeaderName::from_static("x-http-method-override")],
            ..Rules::default()
        };
        let mut h = headers(&[("x-http-method-override", "PUT")]);
        assert!(clean(&mut h, &rules).method_override);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn host_must_be_there_once_on_http_1_1() {
        let origin: http::Uri = "/buy".parse().unwrap();
        let absolute: http::Uri = "http://shop/buy".parse().unwrap();
        let mut one = HeaderMap::new();
        one.insert(HOST, HeaderValue::from_static("shop"));
        let mut two = one.clone();
        two.append(HOST, HeaderValue::from_static("evil"));
        let none = HeaderMap::new();
        for (version, uri, headers, ok) in [
            (Version::HTTP_11, &origin, &one, true),
            (Version::HTTP_11, &origin, &two, false),
            (Version::HTTP_11, &origin, &none, false),
            (Version::HTTP_11, &absolute, &none, false),
            (Version::HTTP_10, &origin, &none, true),
            (Version::HTTP_10, &origin, &two, false),
            (Version::HTTP_2, &absolute, &none, true),
        ] {
            assert_eq!(
                check_host(version, headers).is_ok(),
                ok,
                "{version:?} {uri} {headers:?}"
            );
        }
    }
}
