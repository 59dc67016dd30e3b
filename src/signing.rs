//! Signed admissions: every forwarded winner carries `X-Flashgate-Signature`, an HMAC-SHA256
//! the backend can check, so a request that reached it by any other route (a second ingress,
//! a misconfigured load balancer) is told apart from one flashgate admitted.
//!
//! ```text
//! X-Flashgate-Signature: t=<unix seconds>,kid=<key id>,v1=<lowercase hex HMAC-SHA256>
//! signed string: t \n kid \n METHOD \n path-and-query as forwarded \n reservation \n sku \n user \n quantity
//! ```
//!
//! The key comes from an environment variable (`signing.key_env`), read at start; a backend
//! verifies with the same key (`examples/verify/` has tested Python and Go verifiers;
//! `flashgate verify` checks one by hand) and should refuse a `t` older than a minute or so.

use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Shortest signing key accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// What is signed for one forwarded winner.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    pub method: &'a str,
    /// The path and query exactly as the backend receives them.
    pub path_and_query: &'a str,
    pub reservation: &'a str,
    pub sku: &'a str,
    pub user: &'a str,
    pub quantity: u32,
}

/// One signing key.
#[derive(Clone)]
pub struct Key {
    pub id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A key from its id and secret; refuses a secret shorter than [`MIN_KEY_BYTES`] or an id
    /// that could not sit in the header.
    pub fn new(id: &str, secret: &[u8]) -> Result<Key, String> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the signing key is {} bytes; it must be at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "key id `{id}`: letters, digits, `-`, `_`, `.` only"
            ));
        }
        Ok(Key {
            id: id.to_owned(),
            secret: secret.to_vec(),
        })
    }

    /// The key named in the environment variable `var`.
    pub fn from_env(id: &str, var: &str) -> Result<Key, String> {
        let secret = std::env::var(var)
            .map_err(|_| format!("signing: environment variable {var} is not set"))?;
        Key::new(id, secret.trim().as_bytes()).map_err(|e| format!("signing ({var}): {e}"))
    }

    fn mac(&self, t: u64, kid: &str, a: &Admission<'_>) -> [u8; 32] {
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        mac.update(signed_string(t, kid, a).as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The `X-Flashgate-Signature` value for `a` at time `t`.
    pub fn sign(&self, t: u64, a: &Admission<'_>) -> HeaderValue {
        let hex = to_hex(&self.mac(t, &self.id, a));
        let value = format!("t={t},kid={},v1={hex}", self.id);
        HeaderValue::from_str(&value).expect("digits, a checked id and hex are a valid header")
    }
}

/// The string the MAC is computed over.
pub fn signed_string(t: u64, kid: &str, a: &Admission<'_>) -> String {
    format!(
        "{t}\n{kid}\n{}\n{}\n{}\n{}\n{}\n{}",
        a.method, a.path_and_query, a.reservation, a.sku, a.user, a.quantity
    )
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed signature header")]
    Malformed,
    #[error("unknown key id `{0}`")]
    UnknownKey(String),
    #[error("signature is {0} s old")]
    TooOld(u64),
    #[error("signature does not match")]
    Mismatch,
}

/// Checks `header` for admission `a` with any of `keys`, at `now`, accepting signatures at
/// most `max_age` seconds old (and at most that far in the future: clocks drift).
pub fn verify(
    header: &str,
    keys: &[Key],
    a: &Admission<'_>,
    now: u64,
    max_age: u64,
) -> Result<(), VerifyError> {
    let (mut t, mut kid, mut v1) = (None, None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) if t.is_none() => t = v.parse::<u64>().ok(),
            Some(("kid", v)) if kid.is_none() => kid = Some(v),
            Some(("v1", v)) if v1.is_none() => v1 = Some(v),
            _ => return Err(VerifyError::Malformed),
        }
    }
    let (Some(t), Some(kid), Some(v1)) = (t, kid, v1) else {
        return Err(VerifyError::Malformed);
    };
    let key = keys
        .iter()
        .find(|k| k.id == kid)
        .ok_or_else(|| VerifyError::UnknownKey(kid.to_owned()))?;
    let age = now.abs_diff(t);
    if age > max_age {
        return Err(VerifyError::TooOld(age));
    }
    let expected = to_hex(&key.mac(t, kid, a));
    if bool::from(expected.as_bytes().ct_eq(v1.as_bytes())) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMISSION: Admission<'static> = Admission {
        method: "POST",
        path_and_query: "/api/flash/tee/buy?x=1",
        reservation: "0123456789abcdef0123456789abcdef",
        sku: "tee",
        user: "alice",
        quantity: 1,
    };

    fn key(id: &str, fill: u8) -> Key {
        Key::new(id, &[fill; 32]).unwrap()
    }

    #[test]
    fn a_signature_verifies_with_its_key_only() {
        let (k1, k0) = (key("k1", 1), key("k0", 0));
        let header = k1.sign(1_000, &ADMISSION);
        let header = header.to_str().unwrap();
        assert!(header.starts_with("t=1000,kid=k1,v1="), "{header}");
        assert_eq!(header.len(), "t=1000,kid=k1,v1=".len() + 64);
        let both = [k0.clone(), k1.clone()];
        assert_eq!(verify(header, &both, &ADMISSION, 1_030, 60), Ok(()));
        assert_eq!(
            verify(header, std::slice::from_ref(&k0), &ADMISSION, 1_030, 60),
            Err(VerifyError::UnknownKey("k1".into()))
        );
        assert_eq!(
            verify(header, &both, &ADMISSION, 1_100, 60),
            Err(VerifyError::TooOld(100))
        );
        let forged = Key::new("k1", &[9; 32]).unwrap();
        assert_eq!(
            verify(header, &[forged], &ADMISSION, 1_000, 60),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn every_signed_field_matters() {
        let k = key("k1", 1);
        let header = k.sign(5, &ADMISSION);
        let header = header.to_str().unwrap();
        let changed = [
            Admission {
                method: "PUT",
                ..ADMISSION
            },
            Admission {
                path_and_query: "/api/flash/tee/buy",
                ..ADMISSION
            },
            Admission {
                reservation: "0123456789abcdef0123456789abcdee",
                ..ADMISSION
            },
            Admission {
                sku: "gold",
                ..ADMISSION
            },
            Admission {
                user: "mallory",
                ..ADMISSION
            },
            Admission {
                quantity: 2,
                ..ADMISSION
            },
        ];
        for a in &changed {
            assert_eq!(
                verify(header, std::slice::from_ref(&k), a, 5, 60),
                Err(VerifyError::Mismatch),
                "{a:?}"
            );
        }
        for bad in [
            "",
            "t=5",
            "t=5,kid=k1",
            "t=x,kid=k1,v1=00",
            "t=5,kid=k1,v1=00,t=6",
        ] {
            assert_eq!(
                verify(bad, std::slice::from_ref(&k), &ADMISSION, 5, 60),
                Err(VerifyError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn weak_keys_and_odd_ids_are_refused() {
        assert!(Key::new("k1", &[1; 31]).is_err());
        assert!(Key::new("k 1", &[1; 32]).is_err());
        assert!(Key::new("", &[1; 32]).is_err());
        assert!(Key::new("k1.2026-12", &[1; 32]).is_ok());
    }
}
