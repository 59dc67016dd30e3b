//! Who the buyer is: a user id from a header set by a trusted auth layer, from a cookie, or
//! from a claim of a verified JSON Web Token (`jwt.rs`, with its keys in `keys.rs` and
//! `jwks.rs` and its cache in `cache.rs`).
//!
//! Whatever the source, the raw id then meets the same rules, in [`finish`]: no whitespace
//! around it, the route's `normalize`, its `max_length`, and [`UserId::parse`].

mod cache;
mod jwks;
mod jwt;
pub mod keys;

use std::borrow::Cow;

use http::HeaderMap;
use http::header::COOKIE;
use unicode_normalization::UnicodeNormalization;

use crate::config::{Identity, IdentitySource, Normalize};
use crate::ids::UserId;
use crate::reject::{Reject, TokenError};

/// A route's identity at run time: the config, plus a JWT route's verifier (keys, cache and,
/// with a `jwks_url`, the task that keeps the keys fresh). Built with the snapshot; kept
/// across a reload that leaves the route's identity unchanged (keys and cache stay warm).
pub struct Reader {
    identity: Identity,
    jwt: Option<jwt::Verifier>,
}

impl Reader {
    /// Needs a tokio runtime for a `jwks_url` (its first fetch starts at once).
    pub fn new(identity: &Identity) -> Reader {
        let jwt = match &identity.source {
            IdentitySource::Jwt(cfg) => Some(jwt::Verifier::new(cfg)),
            IdentitySource::Header(_) | IdentitySource::Cookie(_) => None,
        };
        Reader {
            identity: identity.clone(),
            jwt,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The request's user. Awaits only when a JWT route must wait for a key fetch (its first,
    /// or one an unknown `kid` asked for); otherwise it is ready at once.
    pub async fn user_id(&self, headers: &HeaderMap) -> Result<UserId, Reject> {
        match &self.jwt {
            None => user_id(&self.identity, headers),
            Some(verifier) => {
                verifier
                    .user_id(headers, |claim| finish(&self.identity, claim))
                    .await
            }
        }
    }
}

/// Extracts the user id from a header or cookie and parses it into a [`UserId`] (see
/// [`finish`]). Missing or empty → 401; malformed → 400. A JWT source is read by
/// [`Reader::user_id`] (it needs the route's keys), never here.
pub fn user_id(identity: &Identity, headers: &HeaderMap) -> Result<UserId, Reject> {
    let raw = match &identity.source {
        IdentitySource::Header(name) => {
            let mut values = headers.get_all(name).iter();
            let first = values.next();
            if values.next().is_some() {
                return Err(Reject::BadRequest(format!(
                    "header {name} occurs more than once"
                )));
            }
            first.map(|v| v.as_bytes())
        }
        IdentitySource::Cookie(name) => cookie(headers, name)?,
        IdentitySource::Jwt(_) => return Err(Reject::Token(TokenError::MissingToken)),
    };
    let raw =
        raw.ok_or_else(|| Reject::Unauthenticated("no user identity on the request".into()))?;
    let user = std::str::from_utf8(raw)
        .map_err(|_| Reject::BadRequest("user id is not valid UTF-8".into()))?;
    finish(identity, user)
}

/// The rules every identity source ends with: an id that is empty → 401; one with whitespace
/// around it, or longer than `max_length` once normalized → 400; then [`UserId::parse`].
fn finish(identity: &Identity, user: &str) -> Result<UserId, Reject> {
    if user.trim().is_empty() {
        return Err(Reject::Unauthenticated("empty user identity".into()));
    }
    // ` alice` and `alice` would count apart here and maybe not in the backend: refused.
    if user.trim() != user {
        return Err(Reject::BadRequest(
            "user id has leading or trailing whitespace".into(),
        ));
    }
    let normalized: Cow<'_, str> = match identity.normalize {
        Normalize::None => Cow::Borrowed(user),
        Normalize::Nfc => Cow::Owned(user.nfc().collect()),
        Normalize::Lowercase => Cow::Owned(user.nfc().flat_map(char::to_lowercase).nfc().collect()),
    };
    let user = normalized.as_ref();
    if user.len() > identity.max_length {
        return Err(Reject::BadRequest(format!(
            "user id longer than {} bytes",
            identity.max_length
        )));
    }
    Ok(UserId::parse(user)?)
}

/// The value of cookie `name`. Cookie parsers disagree on a quoted value (Go and Python strip
/// the quotes), a percent-encoded one (Node and Python decode it) and a repeated name (first
/// or last wins): each of those would let one buyer count as several, so each is refused.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h [u8]>, Reject> {
    let mut found = None;
    let pairs = headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'));
    for pair in pairs {
        let pair = pair.trim_ascii();
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            continue;
        };
        if pair[..eq].trim_ascii() != name.as_bytes() {
            continue;
        }
        if found.is_some() {
            return Err(Reject::BadRequest(format!(
                "cookie `{name}` occurs more than once"
            )));
        }
        let value = pair[eq + 1..].trim_ascii();
        if value.first() == Some(&b'"') || value.contains(&b'%') {
            return Err(Reject::BadRequest(format!(
                "cookie `{name}` must be a plain value (not quoted or percent-encoded)"
            )));
        }
        found = Some(value);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn header_identity() -> Identity {
        Identity {
            source: IdentitySource::Header(HeaderName::from_static("x-user-id")),
            max_length: 8,
            normalize: Normalize::None,
        }
    }

    #[test]
    fn whitespace_around_an_id_is_refused_and_normalization_is_opt_in() {
        let mut id = header_identity();
        id.max_length = 64;
        let read = |id: &Identity, v: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-user-id", HeaderValue::from_str(v).unwrap());
            user_id(id, &h).map(|u| u.as_str().to_owned())
        };
        for v in ["alice\u{a0}", "\u{3000}alice", "alice\u{2028}"] {
            assert_eq!(read(&id, v).unwrap_err().reason(), "bad_request", "{v:?}");
        }
        let composed = "jos\u{e9}";
        let decomposed = "jose\u{301}";
        assert_eq!(read(&id, "Alice").unwrap(), "Alice", "none: as sent");
        assert_eq!(read(&id, decomposed).unwrap(), decomposed);
        id.normalize = Normalize::Nfc;
        assert_eq!(read(&id, decomposed).unwrap(), composed);
        assert_eq!(read(&id, "Alice").unwrap(), "Alice");
        id.normalize = Normalize::Lowercase;
        assert_eq!(read(&id, "ALICE").unwrap(), "alice");
        assert_eq!(read(&id, "Jose\u{301}").unwrap(), composed);
        // The length limit applies to the id as counted.
        id.max_length = 5;
        assert!(read(&id, "ALICE").is_ok());
        assert!(read(&id, "ALICES").is_err());
    }

    #[test]
    fn header_source() {
        let id = header_identity();
        let mut h = HeaderMap::new();
        assert_eq!(user_id(&id, &h).unwrap_err().reason(), "unauthenticated");
        h.insert("x-user-id", HeaderValue::from_static(" "));
        assert_eq!(user_id(&id, &h).unwrap_err().reason(), "unauthenticated");
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        assert_eq!(user_id(&id, &h).unwrap(), "alice");
        h.insert("x-user-id", HeaderValue::from_static("much-too-long"));
        assert_eq!(user_id(&id, &h).unwrap_err().reason(), "bad_request");
        h.insert("x-user-id", HeaderValue::from_bytes(b"a\tb").unwrap());
        assert_eq!(user_id(&id, &h).unwrap_err().reason(), "bad_request");
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        h.append("x-user-id", HeaderValue::from_static("bob"));
        assert_eq!(user_id(&id, &h).unwrap_err().reason(), "bad_request");
    }

    #[test]
    fn cookie_source() {
        let id = Identity {
            source: IdentitySource::Cookie("uid".into()),
            max_length: 64,
            normalize: Normalize::None,
        };
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("theme=dark; uid=bob ; x=1"),
        );
        assert_eq!(user_id(&id, &h).unwrap(), "bob");
        h.insert(COOKIE, HeaderValue::from_static("uidx=bob"));
        assert!(user_id(&id, &h).is_err());
        for ambiguous in [
            "uid=\"carol\"",
            "uid=car%6Fl",
            "uid=zed; uid=carol",
            "uid=zed;uid=zed",
        ] {
            h.insert(COOKIE, HeaderValue::from_static(ambiguous));
            assert_eq!(
                user_id(&id, &h).unwrap_err().reason(),
                "bad_request",
                "{ambiguous}"
            );
        }
        // Split across two Cookie headers (as HTTP/2 sends them) still counts twice.
        h.insert(COOKIE, HeaderValue::from_static("uid=zed"));
        h.append(COOKIE, HeaderValue::from_static("uid=carol"));
        assert_eq!(user_id(&id, &h).unwrap_err().reason(), "bad_request");
    }
}
