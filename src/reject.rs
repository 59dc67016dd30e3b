//! Every answer flashgate gives by itself, in one enum, turned into a response in one place.
//! Bodies are JSON: `{"error": "<reason>", "message": "...", ...}`.

use std::borrow::Cow;
use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::config::Rate;
use crate::limit::{Denied, Scope};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    RateLimited {
        scope: Scope,
        rate: Rate,
        retry_after: Duration,
    },
    /// Too many requests in flight on the route.
    Overloaded,
    Unauthenticated(String),
    /// A route with a JWT identity got no usable bearer token (see [`TokenError`]).
    Token(TokenError),
    /// A route with a JWT identity has no keys yet (its `jwks_url` could not be fetched):
    /// nothing can be verified, so nothing is admitted.
    KeysUnavailable,
    BadRequest(String),
    /// A sale path asked with another method; `allow` is the `Allow` header's value.
    MethodNotAllowed {
        allow: String,
    },
    NotStarted,
    Ended,
    AlreadyPurchased {
        held: u32,
    },
    SoldOut {
        remaining: u64,
    },
    /// The operator closed the sale (`flashgate sale close`).
    Closed,
    NotConfigured {
        sku: String,
    },
    /// The stock store cannot be reached: fail closed.
    Unavailable,
    /// No route matched and `unmatched: not_found`.
    NoRoute,
    UriTooLong,
    PayloadTooLarge,
    /// The upstream could not be reached.
    BadGateway,
    /// The backend's answer could not be passed on (too many or too large headers, malformed).
    BadUpstreamResponse,
    /// The upstream did not answer in time.
    GatewayTimeout,
}

/// Why a bearer token was refused. Each answers `401 unauthenticated` with this `reason` in
/// the body and a `WWW-Authenticate` challenge (RFC 6750 §3): `Bearer` alone when no token
/// was sent, else `Bearer error="invalid_token"` with the description. Descriptions are fixed
/// text: nothing from the request is ever echoed into a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No token where the route reads it (no `Authorization: Bearer …`, no cookie).
    MissingToken,
    /// Not three base64url parts of JSON, or a header or claim of the wrong type.
    Malformed,
    /// Longer than the route's `max_token_bytes`.
    TooLarge,
    Expired,
    NotYetValid,
    BadSignature,
    /// No key fits the token's `kid` and `alg` (or it has no `kid` and several keys fit).
    UnknownKey,
    WrongIssuer,
    WrongAudience,
    /// `alg` is not in the route's `algorithms` (`none` never is).
    AlgorithmNotAllowed,
    /// `exp`, or the route's user claim, is absent (or the user claim is empty).
    ClaimMissing,
    /// The user claim is neither a string nor a whole number.
    ClaimInvalid,
}

impl TokenError {
    /// Every variant, for tests and the README's table.
    pub const ALL: [TokenError; 12] = [
        TokenError::MissingToken,
        TokenError::Malformed,
        TokenError::TooLarge,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::BadSignature,
        TokenError::UnknownKey,
        TokenError::WrongIssuer,
        TokenError::WrongAudience,
        TokenError::AlgorithmNotAllowed,
        TokenError::ClaimMissing,
        TokenError::ClaimInvalid,
    ];

    /// The `reason` field of the 401 body, stable across releases.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::MissingToken => "missing_token",
            TokenError::Malformed => "malformed",
            TokenError::TooLarge => "token_too_large",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::BadSignature => "bad_signature",
            TokenError::UnknownKey => "unknown_key",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::AlgorithmNotAllowed => "algorithm_not_allowed",
            TokenError::ClaimMissing => "claim_missing",
            TokenError::ClaimInvalid => "claim_invalid",
        }
    }

    /// The body's `message` and the challenge's `error_description` (plain ASCII, no quotes).
    pub fn description(self) -> &'static str {
        match self {
            TokenError::MissingToken => "no bearer token on the request",
            TokenError::Malformed => "the token is not a well-formed JWT",
            TokenError::TooLarge => "the token is too large",
            TokenError::Expired => "the token has expired",
            TokenError::NotYetValid => "the token is not valid yet (nbf)",
            TokenError::BadSignature => "the token signature does not verify",
            TokenError::UnknownKey => "no key matches the token kid and alg",
            TokenError::WrongIssuer => "the token issuer (iss) is not accepted",
            TokenError::WrongAudience => "the token audience (aud) is not accepted",
            TokenError::AlgorithmNotAllowed => "the token alg is not accepted",
            TokenError::ClaimMissing => "the token lacks exp or the user claim",
            TokenError::ClaimInvalid => "the user claim is not a string or a whole number",
        }
    }

    /// The `WWW-Authenticate` value.
    fn challenge(self) -> HeaderValue {
        if self == TokenError::MissingToken {
            return HeaderValue::from_static("Bearer");
        }
        let v = format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            self.description()
        );
        HeaderValue::from_str(&v)
            .unwrap_or(HeaderValue::from_static("Bearer error=\"invalid_token\""))
    }
}

/// How long a client should wait before retrying when the cause is not a token bucket.
const RETRY_AFTER_BUSY: u64 = 1;

impl Reject {
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Reject::Overloaded | Reject::Unavailable | Reject::KeysUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reject::Unauthenticated(_) | Reject::Token(_) => StatusCode::UNAUTHORIZED,
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Reject::NotStarted | Reject::Ended => StatusCode::FORBIDDEN,
            Reject::AlreadyPurchased { .. } => StatusCode::CONFLICT,
            Reject::SoldOut { .. } | Reject::Closed => StatusCode::GONE,
            Reject::NotConfigured { .. } | Reject::NoRoute => StatusCode::NOT_FOUND,
            Reject::UriTooLong => StatusCode::URI_TOO_LONG,
            Reject::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::BadGateway | Reject::BadUpstreamResponse => StatusCode::BAD_GATEWAY,
            Reject::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable reason, stable across releases.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::RateLimited { .. } => "rate_limited",
            Reject::Overloaded => "overloaded",
            Reject::Unauthenticated(_) | Reject::Token(_) => "unauthenticated",
            Reject::BadRequest(_) => "bad_request",
            Reject::MethodNotAllowed { .. } => "method_not_allowed",
            Reject::NotStarted => "not_started",
            Reject::Ended => "ended",
            Reject::AlreadyPurchased { .. } => "already_purchased",
            Reject::SoldOut { .. } => "sold_out",
            Reject::Closed => "closed",
            Reject::NotConfigured { .. } => "not_configured",
            Reject::Unavailable | Reject::KeysUnavailable => "unavailable",
            Reject::NoRoute => "not_found",
            Reject::UriTooLong => "uri_too_long",
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::BadGateway => "upstream_unavailable",
            Reject::BadUpstreamResponse => "bad_upstream_response",
            Reject::GatewayTimeout => "upstream_timeout",
        }
    }

    fn message(&self) -> Cow<'_, str> {
        match self {
            Reject::RateLimited { scope, .. } => {
                Cow::Owned(format!("too many requests ({} limit)", scope.policy_name()))
            }
            Reject::Overloaded => Cow::Borrowed("too many requests in flight, retry shortly"),
            Reject::Unauthenticated(m) | Reject::BadRequest(m) => Cow::Borrowed(m),
            Reject::Token(e) => Cow::Borrowed(e.description()),
            Reject::KeysUnavailable => {
                Cow::Borrowed("the keys that verify tokens are not available yet, retry shortly")
            }
            Reject::MethodNotAllowed { allow } => {
                Cow::Owned(format!("this sale path accepts only {allow}"))
            }
            Reject::NotStarted => Cow::Borrowed("the sale has not started yet"),
            Reject::Ended => Cow::Borrowed("the sale has ended"),
            Reject::AlreadyPurchased { .. } => {
                Cow::Borrowed("you already hold the most units allowed")
            }
            Reject::SoldOut { .. } => Cow::Borrowed("sold out"),
            Reject::Closed => Cow::Borrowed("the sale is closed"),
            Reject::NotConfigured { sku } => {
                Cow::Owned(format!("no stock is configured for `{sku}`"))
            }
            Reject::Unavailable => Cow::Borrowed("stock service unavailable, retry shortly"),
            Reject::NoRoute => Cow::Borrowed("no route matches this request"),
            Reject::UriTooLong => Cow::Borrowed("request URI too long"),
            Reject::PayloadTooLarge => Cow::Borrowed("request body too large"),
            Reject::BadGateway => Cow::Borrowed("the shop backend could not be reached"),
            Reject::BadUpstreamResponse => Cow::Borrowed(
                "the shop backend's answer could not be passed on (its head is too large or malformed, or it sent only an informational 1xx)",
            ),
            Reject::GatewayTimeout => Cow::Borrowed("the shop backend did not answer in time"),
        }
    }

    /// Whole seconds, rounded up and never 0 (a 105 ms wait is `Retry-After: 1`).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Reject::RateLimited { retry_after, .. } => Some(ceil_secs(*retry_after)),
            Reject::Overloaded | Reject::Unavailable | Reject::KeysUnavailable => {
                Some(RETRY_AFTER_BUSY)
            }
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        self.into_response_traced(None)
    }

    /// The answer, with the request's trace id in the body (`"trace_id"`) when known.
    pub fn into_response_traced(self, trace_id: Option<&str>) -> Response<Body> {
        // Written by hand rather than through a `serde_json::Map`: a busy sale answers most
        // buyers from here, and the map cost a dozen allocations per answer. Keys in
        // alphabetical order, as before.
        let retry = self.retry_after_secs();
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(b"{\"error\":\"");
        bytes.extend_from_slice(self.reason().as_bytes());
        bytes.extend_from_slice(b"\"");
        if let Reject::AlreadyPurchased { held } = &self {
            json_field(&mut bytes, "held", held);
        }
        json_field(&mut bytes, "message", &self.message());
        if let Reject::Token(e) = &self {
            json_field(&mut bytes, "reason", &e.reason());
        }
        if let Reject::SoldOut { remaining } = &self {
            json_field(&mut bytes, "remaining", remaining);
        }
        if let Some(secs) = retry {
            json_field(&mut bytes, "retry_after", &secs);
        }
        if let Reject::NotConfigured { sku } = &self {
            json_field(&mut bytes, "sku", sku);
        }
        if let Some(id) = trace_id {
            json_field(&mut bytes, "trace_id", &id);
        }
        bytes.extend_from_slice(b"}\n");

        // An exact-size buffer becomes `Bytes` without a second allocation.
        let mut resp = Response::new(body::full(bytes.into_boxed_slice()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = retry {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Reject::Token(e) = &self {
            h.insert(WWW_AUTHENTICATE, e.challenge());
        }
        if let Reject::MethodNotAllowed { allow } = &self
            && let Ok(v) = HeaderValue::from_str(allow)
        {
            h.insert(http::header::ALLOW, v);
        }
        if let Reject::RateLimited { scope, rate, .. } = &self {
            // IETF draft-ietf-httpapi-ratelimit-headers: quota `q` per window `w` seconds;
            // `r` units remaining, `t` seconds until a unit is back.
            let name = scope.policy_name();
            let policy = format!("\"{name}\";q={};w={}", rate.burst, rate.window_secs());
            let state = format!("\"{name}\";r=0;t={}", retry.unwrap_or(1));
            if let Ok(v) = HeaderValue::from_str(&policy) {
                h.insert("ratelimit-policy", v);
            }
            if let Ok(v) = HeaderValue::from_str(&state) {
                h.insert("ratelimit", v);
            }
        }
        resp
    }
}

/// Appends `,"name":value` with `value` JSON-encoded (strings escaped).
fn json_field(out: &mut Vec<u8>, name: &str, value: &impl serde::Serialize) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    // Writing JSON into a Vec cannot fail for these plain values.
    let _ = serde_json::to_writer(&mut *out, value);
}

fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// A value refused at the edge (SKU, user id): `400 bad_request` with the rule as message.
impl From<crate::ids::InvalidId> for Reject {
    fn from(e: crate::ids::InvalidId) -> Self {
        Reject::BadRequest(e.message().to_owned())
    }
}

impl From<Denied> for Reject {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Overloaded => Reject::Overloaded,
            Denied::StoreUnavailable => Reject::Unavailable,
            Denied::RateLimited {
                scope,
                rate,
                retry_after,
            } => Reject::RateLimited {
                scope,
                rate,
                retry_after,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(ceil_secs(Duration::from_millis(105)), 1);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
    }

    #[test]
    fn every_reject_maps_to_its_status_and_reason() {
        let rate = Rate {
            period: Duration::from_millis(500),
            burst: NonZeroU32::new(4).unwrap(),
            max_keys: 10,
            global: None,
        };
        let cases = [
            (
                Reject::RateLimited {
                    scope: Scope::PerUser,
                    rate,
                    retry_after: Duration::from_millis(1200),
                },
                429,
                "rate_limited",
            ),
            (Reject::Overloaded, 503, "overloaded"),
            (Reject::Unauthenticated("x".into()), 401, "unauthenticated"),
            (Reject::BadRequest("x".into()), 400, "bad_request"),
            (Reject::NotStarted, 403, "not_started"),
            (Reject::Ended, 403, "ended"),
            (
                Reject::AlreadyPurchased { held: 1 },
                409,
                "already_purchased",
            ),
            (Reject::SoldOut { remaining: 0 }, 410, "sold_out"),
            (Reject::Closed, 410, "closed"),
            (
                Reject::NotConfigured { sku: "a".into() },
                404,
                "not_configured",
            ),
            (Reject::Unavailable, 503, "unavailable"),
            (Reject::KeysUnavailable, 503, "unavailable"),
            (Reject::Token(TokenError::Expired), 401, "unauthenticated"),
            (Reject::NoRoute, 404, "not_found"),
            (Reject::UriTooLong, 414, "uri_too_long"),
            (Reject::PayloadTooLarge, 413, "payload_too_large"),
            (Reject::BadGateway, 502, "upstream_unavailable"),
            (Reject::BadUpstreamResponse, 502, "bad_upstream_response"),
            (Reject::GatewayTimeout, 504, "upstream_timeout"),
        ];
        for (reject, status, reason) in cases {
            assert_eq!(reject.reason(), reason);
            let resp = reject.clone().into_response();
            assert_eq!(resp.status().as_u16(), status, "{reason}");
            assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
            let has_retry = resp.headers().contains_key(RETRY_AFTER);
            assert_eq!(has_retry, matches!(status, 429 | 503), "{reason}");
        }
        let resp = Reject::RateLimited {
            scope: Scope::PerUser,
            rate,
            retry_after: Duration::from_millis(1200),
        }
        .into_response();
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        assert_eq!(resp.headers()["ratelimit-policy"], "\"per_user\";q=4;w=2");
        assert_eq!(resp.headers()["ratelimit"], "\"per_user\";r=0;t=2");
    }

    async fn body_json(reject: Reject) -> serde_json::Value {
        use http_body_util::BodyExt;
        let bytes = reject
            .into_response()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert!(bytes.ends_with(b"}\n"), "{bytes:?}");
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn bodies_are_json_with_their_fields() {
        assert_eq!(
            body_json(Reject::SoldOut { remaining: 0 }).await,
            serde_json::json!({"error": "sold_out", "message": "sold out", "remaining": 0})
        );
        assert_eq!(
            body_json(Reject::AlreadyPurchased { held: 2 }).await["held"],
            2
        );
        assert_eq!(body_json(Reject::Unavailable).await["retry_after"], 1);
        let tricky = "bad \"quote\" \\ and\nnewline \u{1}";
        assert_eq!(
            body_json(Reject::BadRequest(tricky.into())).await["message"],
            tricky
        );
        let sku = body_json(Reject::NotConfigured { sku: "a\"b".into() }).await;
        assert_eq!(sku["sku"], "a\"b");
        assert_eq!(sku["error"], "not_configured");
    }

    #[tokio::test]
    async fn token_refusals_carry_a_reason_and_a_bearer_challenge() {
        for e in TokenError::ALL {
            let resp = Reject::Token(e).into_response();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            let challenge = resp.headers()[WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .to_owned();
            if e == TokenError::MissingToken {
                // RFC 6750 §3.1: no error attribute when the request had no credentials.
                assert_eq!(challenge, "Bearer");
            } else {
                assert_eq!(
                    challenge,
                    format!(
                        "Bearer error=\"invalid_token\", error_description=\"{}\"",
                        e.description()
                    )
                );
            }
            let body = body_json(Reject::Token(e)).await;
            assert_eq!(body["error"], "unauthenticated");
            assert_eq!(body["reason"], e.reason());
            assert_eq!(body["message"], e.description());
        }
        let reasons: std::collections::BTreeSet<_> =
            TokenError::ALL.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), TokenError::ALL.len(), "reasons are distinct");
        // Other answers carry no challenge and no reason field.
        let resp = Reject::Unauthenticated("x".into()).into_response();
        assert!(!resp.headers().contains_key(WWW_AUTHENTICATE));
        assert!(
            body_json(Reject::Unauthenticated("x".into()))
                .await
                .get("reason")
                .is_none()
        );
    }
}
