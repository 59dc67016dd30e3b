//! The values a sale is keyed by — [`Sku`], [`UserId`], [`ReservationId`] — each checked by
//! ONE function, once, where the request (or the admin call) is read. Past the edge, holding
//! one of these types is the proof that the value is valid: the store and the key builder
//! take them and check nothing again.
//!
//! Each is a shared `Arc<str>` inside, so cloning one (into a reservation batch, a
//! background bookkeeping task, a log field) copies a pointer, not the bytes.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest SKU accepted, in bytes. Keeps Redis keys (and logs) bounded.
pub const MAX_SKU_LEN: usize = 128;

/// A value refused by one of the `parse` functions. The message says what the rule is; the
/// edge turns it into `400 bad_request` (see `impl From<InvalidId> for Reject`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(String);

impl InvalidId {
    /// What was wrong, for a response or a log.
    pub fn message(&self) -> &str {
        &self.0
    }
}

/// Shared plumbing of the three newtypes: reading, comparing, hashing like the string itself
/// (so a `HashMap<Sku, _>` can be looked up with a `&str`), printing, serializing.
macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                $name::parse(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

/// A SKU: 1 to [`MAX_SKU_LEN`] bytes of ASCII letters, digits, `.`, `_` and `-`.
///
/// It becomes part of every Redis key of its sale (`fg:{sku}:stock`, see
/// [`crate::store::key`]): the alphabet leaves out `{`/`}` (which would break the Redis
/// Cluster hash tag), spaces, `/` and control characters (which would make logs and admin
/// paths ambiguous).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sku(Arc<str>);
string_newtype!(Sku);

impl Sku {
    /// The one SKU rule.
    pub fn parse(s: &str) -> Result<Sku, InvalidId> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SKU_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Sku(s.into()))
        } else {
            Err(InvalidId(format!(
                "invalid SKU: use 1 to {MAX_SKU_LEN} letters, digits, '.', '_' or '-'"
            )))
        }
    }
}

/// A buyer's id: not empty, no control characters.
///
/// The configurable `identity.max_length` is a per-route policy and stays in the identity
/// step (`identity::finish`, which every source — header, cookie, JWT claim — ends with),
/// which also refuses whitespace around the raw value and tells a missing id (401) from a
/// malformed one (400) before it asks this type.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);
string_newtype!(UserId);

impl UserId {
    /// The one user-id invariant.
    pub fn parse(s: &str) -> Result<UserId, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId("empty user id".into()));
        }
        if s.chars().any(char::is_control) {
            return Err(InvalidId("user id contains control characters".into()));
        }
        Ok(UserId(s.into()))
    }
}

/// A reservation id: exactly 32 lowercase hex digits (128 random bits), as
/// [`ReservationId::random`] makes them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(Arc<str>);
string_newtype!(ReservationId);

impl ReservationId {
    /// Length of an id, in hex digits.
    pub const LEN: usize = 32;

    /// The one reservation-id rule: what [`ReservationId::random`] makes, nothing else.
    pub fn parse(s: &str) -> Result<ReservationId, InvalidId> {
        let ok = s.len() == Self::LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(ReservationId(s.into()))
        } else {
            Err(InvalidId(format!(
                "invalid reservation id: expected {} lowercase hex digits",
                Self::LEN
            )))
        }
    }

    /// The id whose 128 bits are `n` (a valid id, for tests that need known ones).
    #[cfg(test)]
    pub(crate) fn from_number(n: u128) -> ReservationId {
        ReservationId(format!("{n:032x}").into())
    }

    /// A fresh id: 128 random bits. Made by the caller (not the Redis script) so Lua stays
    /// deterministic apart from `TIME`.
    pub fn random() -> ReservationId {
        ReservationId(format!("{:032x}", rand::random::<u128>()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn skus() {
        for good in ["sku-1.A_b", "a", &"x".repeat(MAX_SKU_LEN)] {
            assert_eq!(Sku::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "a{b}",
            "a{b",
            "a}b",
            "a b",
            "a/b",
            "a\n",
            "a\u{7f}b",
            "é",
            &"x".repeat(MAX_SKU_LEN + 1),
        ] {
            assert!(Sku::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_ids() {
        assert_eq!(UserId::parse("alice").unwrap(), "alice");
        assert_eq!(UserId::parse("a|b c/é").unwrap(), "a|b c/é");
        for bad in ["", "a\tb", "a\nb", "\u{7f}", "a\u{85}"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reservation_ids() {
        let a = ReservationId::random();
        assert_eq!(a.as_str().len(), ReservationId::LEN);
        assert_eq!(ReservationId::parse(a.as_str()).unwrap(), a);
        assert_ne!(a, ReservationId::random());
        for bad in [
            "",
            "x",
            &"0".repeat(31),
            &"0".repeat(33),
            &"A".repeat(32),
            &"g".repeat(32),
            &format!(" {}", "0".repeat(31)),
        ] {
            assert!(ReservationId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn behave_like_their_text() {
        let sku = Sku::parse("tee").unwrap();
        assert_eq!(sku.to_string(), "tee");
        assert_eq!(format!("{sku:?}"), "\"tee\"");
        assert_eq!(serde_json::to_string(&sku).unwrap(), "\"tee\"");
        let map = HashMap::from([(sku.clone(), 1)]);
        assert_eq!(map.get("tee"), Some(&1));
        assert_eq!("tee".parse::<Sku>().unwrap(), sku);
    }
}
