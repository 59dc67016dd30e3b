//! Who the buyer is: a user id from a header set by a trusted auth layer, or from a cookie.
//! Kept as a step of its own so a JWT source can slot in beside these.

use http::HeaderMap;
use http::header::COOKIE;

use crate::config::{Identity, IdentitySource};
use crate::reject::Reject;

/// Extracts and validates the user id. Missing or empty → 401; malformed → 400.
pub fn user_id<'h>(identity: &Identity, headers: &'h HeaderMap) -> Result<&'h str, Reject> {
    let raw = match &identity.source {
        IdentitySource::Header(name) => headers.get(name).map(|v| v.as_bytes()),
        IdentitySource::Cookie(name) => cookie(headers, name),
    };
    let raw =
        raw.ok_or_else(|| Reject::Unauthenticated("no user identity on the request".into()))?;
    let user = std::str::from_utf8(raw)
        .map_err(|_| Reject::BadRequest("user id is not valid UTF-8".into()))?
        .trim();
    if user.is_empty() {
        return Err(Reject::Unauthenticated("empty user identity".into()));
    }
    if user.len() > identity.max_length {
        return Err(Reject::BadRequest(format!(
            "user id longer than {} bytes",
            identity.max_length
        )));
    }
    if user.chars().any(char::is_control) {
        return Err(Reject::BadRequest(
            "user id contains control characters".into(),
        ));
    }
    Ok(user)
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn header_identity() -> Identity {
        Identity {
            source: IdentitySource::Header(HeaderName::from_static("x-user-id")),
            max_length: 8,
        }
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
    }

    #[test]
    fn cookie_source() {
        let id = Identity {
            source: IdentitySource::Cookie("uid".into()),
            max_length: 64,
        };
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("theme=dark; uid=bob ; x=1"),
        );
        assert_eq!(user_id(&id, &h).unwrap(), "bob");
        h.insert(COOKIE, HeaderValue::from_static("uidx=bob"));
        assert!(user_id(&id, &h).is_err());
    }
}
