//! The visitor's place, in a signed cookie: `q.<id>.<entered_ms>.<mac>` while queued,
//! `a.<id>.<expires_ms>.<mac>` once admitted. `id` is 128 random bits (32 lowercase hex
//! digits), the times are Unix milliseconds from the store's clock, and `mac` is the
//! HMAC-SHA256 (64 lowercase hex digits) of
//!
//! ```text
//! flashgate-room-v1 \n <room> \n <q|a> \n <id> \n <ms>
//! ```
//!
//! under the room's key (`key_env`, the same on every instance). The room's name is signed,
//! so a cookie of another room does not verify here; any change to the kind, id or time
//! breaks the MAC, compared in constant time (`Mac::verify_slice`). A cookie that does not
//! verify is treated as no cookie at all: its bearer starts at the back of the queue.
//!
//! A queued cookie is only a claim to a place the store holds; the store admits a place once
//! (see `store/room.rs`). An active cookie carries its own expiry, so an admitted visitor
//! passes with no store call until it runs out.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a verified cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Holds a place in the queue since `entered_ms`.
    Queued { id: String, entered_ms: u64 },
    /// Admitted until `expires_ms`.
    Active { id: String, expires_ms: u64 },
}

impl Pass {
    fn parts(&self) -> (&'static str, &str, u64) {
        match self {
            Pass::Queued { id, entered_ms } => ("q", id, *entered_ms),
            Pass::Active { id, expires_ms } => ("a", id, *expires_ms),
        }
    }
}

fn mac(key: &[u8], room: &str, kind: &str, id: &str, ms: u64) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(format!("flashgate-room-v1\n{room}\n{kind}\n{id}\n{ms}").as_bytes());
    mac
}

/// The cookie value for `pass` in room `room`.
pub fn sign(key: &[u8], room: &str, pass: &Pass) -> String {
    let (kind, id, ms) = pass.parts();
    let tag = mac(key, room, kind, id, ms).finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}.{id}.{ms}.{hex}")
}

/// Reads and verifies one cookie value; `None` for anything not signed by `key` for `room`.
pub fn verify(key: &[u8], room: &str, value: &str) -> Option<Pass> {
    let mut parts = value.split('.');
    let (kind, id, ms, tag) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_id(id) || tag.len() != 64 || ms.len() > 15 {
        return None;
    }
    if !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    let tag = decode_hex(tag)?;
    mac(key, room, kind, id, ms).verify_slice(&tag).ok()?;
    let id = id.to_owned();
    match kind {
        "q" => Some(Pass::Queued { id, entered_ms: ms }),
        "a" => Some(Pass::Active { id, expires_ms: ms }),
        _ => None,
    }
}

/// The first verified cookie named `name` in a request's `Cookie` headers.
pub fn read(headers: &http::HeaderMap, name: &str, key: &[u8], room: &str) -> Option<Pass> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .find_map(|(_, v)| verify(key, room, v.trim().trim_matches('"')))
}

/// A new place's id: 128 random bits as 32 lowercase hex digits.
pub fn new_id() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| match p {
            [h, l] => Some(digit(*h)? << 4 | digit(*l)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_cookie_verifies_and_any_change_does_not() {
        let pass = Pass::Queued {
            id: new_id(),
            entered_ms: 1_800_000_000_000,
        };
        let v = sign(KEY, "pages", &pass);
        assert_eq!(verify(KEY, "pages", &v), Some(pass.clone()));
        // Another room, another key, another kind, time or id: not this room's cookie.
        assert_eq!(verify(KEY, "other", &v), None);
        assert_eq!(
            verify(b"another key of at least 32 bytes!!", "pages", &v),
            None
        );
        let parts: Vec<&str> = v.split('.').collect();
        let swap = |i: usize, to: &str| {
            let mut p = parts.clone();
            p[i] = to;
            p.join(".")
        };
        assert_eq!(
            verify(KEY, "pages", &swap(0, "a")),
            None,
            "queued made active"
        );
        assert_eq!(
            verify(KEY, "pages", &swap(2, "1700000000000")),
            None,
            "earlier entry"
        );
        assert_eq!(
            verify(KEY, "pages", &swap(1, &new_id())),
            None,
            "another id"
        );
        assert_eq!(verify(KEY, "pages", &swap(3, &"0".repeat(64))), None);
        for junk in ["", "q", "q.x.1.y", &format!("{v}.x"), &v.to_uppercase()] {
            assert_eq!(verify(KEY, "pages", junk), None, "{junk}");
        }
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let pass = Pass::Active {
            id: new_id(),
            expires_ms: 5,
        };
        let v = sign(KEY, "r", &pass);
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; fg_room=forged".parse().unwrap());
        h.append(
            http::header::COOKIE,
            format!("x=2; fg_room={v}").parse().unwrap(),
        );
        assert_eq!(read(&h, "fg_room", KEY, "r"), Some(pass));
        assert_eq!(read(&h, "fg_other", KEY, "r"), None);
    }
}
