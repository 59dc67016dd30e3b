//! The keys a JWT identity verifies with: a JSON Web Key Set (from `jwks_file` or
//! `jwks_url`) or one HMAC secret (`secret_env`), parsed once into ready [`DecodingKey`]s, and
//! the rule that picks the key for a token ([`KeySet::find`]).
//!
//! What a key set never holds: a symmetric (`oct`) key from a JWKS (a published key set is
//! public, so an HMAC key in it would let anyone sign), a key marked `"use": "enc"`, or a key
//! no configured algorithm can use. Keeping the families apart here is one of the three walls
//! against algorithm confusion (an `HS256` token "signed" with the RSA public key): the config
//! refuses to mix HMAC with public-key algorithms, the token's `alg` must be listed, and the
//! key picked must be of the `alg`'s family.

use std::fmt::Write;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use sha2::{Digest, Sha256};

/// Verification keys, immutable; a rotation builds a new set.
pub struct KeySet {
    keys: Vec<Key>,
    /// A secret has no `kid`: it is the route's one key, whatever `kid` a token names.
    any_kid: bool,
    /// SHA-256 of what the set was parsed from: two sets are equal when their sources are.
    fingerprint: [u8; 32],
}

struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one: then only that algorithm may use it.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    decoding: DecodingKey,
}

/// Why no key was found for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No key has the token's `kid`: after a rotation, a fetch may bring it.
    UnknownKid,
    /// Keys with that `kid` exist but none fits the `alg`, or the token has no `kid` and not
    /// exactly one key fits.
    NoneFits,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`), keeping the keys some algorithm of
    /// `algorithms` can use. Keys of other kinds are skipped, not refused, since a provider's
    /// set often carries encryption keys too; a set left with no key at all is an error.
    pub fn from_jwks(json: &[u8], algorithms: &[Algorithm]) -> Result<KeySet, String> {
        let doc: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| format!("not a JSON Web Key Set (not JSON: {e})"))?;
        let Some(entries) = doc.get("keys").and_then(|k| k.as_array()) else {
            return Err("not a JSON Web Key Set (no `keys` array)".into());
        };
        let mut keys = Vec::new();
        for entry in entries {
            let Ok(jwk) = serde_json::from_value::<Jwk>(entry.clone()) else {
                continue;
            };
            if let Some(key) = Key::from_jwk(&jwk)
                && algorithms.iter().any(|&a| key.fits(a))
            {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            let algs: Vec<String> = algorithms.iter().map(|a| format!("{a:?}")).collect();
            return Err(format!(
                "no usable key for algorithms [{}] among its {} keys (symmetric `oct` keys and \
                 `\"use\": \"enc\"` keys are never used)",
                algs.join(", "),
                entries.len()
            ));
        }
        Ok(KeySet {
            keys,
            any_kid: false,
            fingerprint: Sha256::digest(json).into(),
        })
    }

    /// One HMAC secret (the caller checks its length).
    pub fn from_secret(secret: &[u8]) -> Result<KeySet, String> {
        let decoding = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        Ok(KeySet {
            keys: vec![Key {
                kid: None,
                alg: None,
                family: AlgorithmFamily::Hmac,
                curve: None,
                decoding,
            }],
            any_kid: true,
            fingerprint: Sha256::digest(secret).into(),
        })
    }

    /// The key for a token with this `kid` and `alg`. With a `kid`, the key with that id
    /// that fits `alg`; without one, the only key that fits `alg` (two candidates would make
    /// the choice a guess, so that is a miss).
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<&DecodingKey, Miss> {
        if let (Some(kid), false) = (kid, self.any_kid) {
            let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
            let mut any = false;
            for key in named.by_ref() {
                any = true;
                if key.fits(alg) {
                    return Ok(&key.decoding);
                }
            }
            return Err(if any {
                Miss::NoneFits
            } else {
                Miss::UnknownKid
            });
        }
        let mut fitting = self.keys.iter().filter(|k| k.fits(alg));
        match (fitting.next(), fitting.next()) {
            (Some(key), None) => Ok(&key.decoding),
            _ => Err(Miss::NoneFits),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `kid family` for each key, for `flashgate check` and logs (never key material).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (i, k) in self.keys.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(
                out,
                "{} {:?}",
                k.kid.as_deref().unwrap_or("(no kid)"),
                k.family
            );
            if let Some(alg) = k.alg {
                let _ = write!(out, " {alg:?}");
            }
        }
        out
    }
}

impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint && self.any_kid == other.any_kid
    }
}

impl Eq for KeySet {}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySet[{}]", self.summary())
    }
}

impl Key {
    /// A public verification key, or `None` for anything else.
    fn from_jwk(jwk: &Jwk) -> Option<Key> {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return None;
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => Some(Algorithm::try_from(a).ok()?),
        };
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                (AlgorithmFamily::Ed, Some(p.curve.clone()))
            }
            // `oct` (a shared secret has no place in a public key set) and the rest.
            _ => return None,
        };
        let decoding = DecodingKey::from_jwk(jwk).ok()?;
        Some(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            curve,
            decoding,
        })
    }

    /// Whether a token signed with `alg` may be checked with this key.
    fn fits(&self, alg: Algorithm) -> bool {
        let curve_ok = match alg {
            Algorithm::ES256 => self.curve == Some(EllipticCurve::P256),
            Algorithm::ES384 => self.curve == Some(EllipticCurve::P384),
            _ => true,
        };
        self.family == alg.family() && self.alg.is_none_or(|a| a == alg) && curve_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A 2048-bit RSA modulus and a P-256 point are not needed to test the selection rules:
    // any base64url bytes parse into a key (they are only used when verifying).
    const N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";
    const X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";

    fn jwks(keys: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }
    fn rsa(kid: Option<&str>) -> serde_json::Value {
        let mut k = serde_json::json!({"kty": "RSA", "n": N, "e": "AQAB"});
        if let Some(kid) = kid {
            k["kid"] = kid.into();
        }
        k
    }
    fn ec(kid: &str) -> serde_json::Value {
        serde_json::json!({"kty": "EC", "crv": "P-256", "x": X, "y": Y, "kid": kid})
    }

    #[test]
    fn keys_are_picked_by_kid_and_alg_family() {
        use Algorithm::*;
        let set = KeySet::from_jwks(&jwks(&[rsa(Some("r1")), ec("e1")]), &[RS256, ES256]).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.find(Some("r1"), RS256).is_ok());
        assert!(set.find(Some("e1"), ES256).is_ok());
        assert_eq!(set.find(Some("r1"), ES256).err(), Some(Miss::NoneFits));
        assert_eq!(
            set.find(Some("e1"), ES384).err(),
            Some(Miss::NoneFits),
            "curve"
        );
        assert_eq!(set.find(Some("zz"), RS256).err(), Some(Miss::UnknownKid));
        // No kid: exactly one key of the family fits.
        assert!(set.find(None, RS256).is_ok());
        assert!(set.find(None, ES256).is_ok());
        // An HMAC alg never finds a public key, whatever the kid.
        assert_eq!(set.find(Some("r1"), HS256).err(), Some(Miss::NoneFits));
        assert_eq!(set.find(None, HS256).err(), Some(Miss::NoneFits));

        let two = KeySet::from_jwks(&jwks(&[rsa(Some("a")), rsa(Some("b"))]), &[RS256]).unwrap();
        assert_eq!(
            two.find(None, RS256).err(),
            Some(Miss::NoneFits),
            "two fit: no guess"
        );
    }

    #[test]
    fn unusable_keys_are_skipped_and_an_empty_set_refused() {
        use Algorithm::*;
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "s"});
        let enc = {
            let mut k = rsa(Some("enc"));
            k["use"] = "enc".into();
            k
        };
        let pinned = {
            let mut k = rsa(Some("ps"));
            k["alg"] = "PS256".into();
            k
        };
        let set = KeySet::from_jwks(
            &jwks(&[oct.clone(), enc, pinned, rsa(None)]),
            &[RS256, PS256, HS256],
        )
        .unwrap();
        assert_eq!(set.len(), 2, "{set:?}");
        assert_eq!(set.find(Some("s"), HS256).err(), Some(Miss::UnknownKid));
        assert_eq!(
            set.find(Some("ps"), RS256).err(),
            Some(Miss::NoneFits),
            "alg pinned"
        );
        assert!(set.find(Some("ps"), PS256).is_ok());
        assert!(KeySet::from_jwks(&jwks(&[oct]), &[HS256]).is_err());
        assert!(KeySet::from_jwks(&jwks(&[ec("e")]), &[RS256]).is_err());
        assert!(KeySet::from_jwks(b"[]", &[RS256]).is_err());
        assert!(KeySet::from_jwks(b"{nope", &[RS256]).is_err());
    }

    #[test]
    fn a_secret_is_the_one_key_whatever_the_kid() {
        let set = KeySet::from_secret(&[7; 32]).unwrap();
        assert!(set.find(Some("anything"), Algorithm::HS256).is_ok());
        assert!(set.find(None, Algorithm::HS512).is_ok());
        assert_eq!(set.find(None, Algorithm::RS256).err(), Some(Miss::NoneFits));
        assert_eq!(set, KeySet::from_secret(&[7; 32]).unwrap());
        assert_ne!(set, KeySet::from_secret(&[8; 32]).unwrap());
        assert!(
            !format!("{set:?}").contains("7"),
            "no key material in Debug"
        );
    }
}
