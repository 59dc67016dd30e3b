//! The JWT identity: find the bearer token, verify it, and read the user claim.
//!
//! In order, each step refusing with its own reason (`reject::TokenError`):
//! 1. the token, from `Authorization: Bearer`, another header or a cookie; capped in size
//!    before anything else reads it;
//! 2. the cache: a token verified before, with the same keys and not yet expired, is done;
//! 3. the token's header, read without trusting it: its `alg` must be one the route lists
//!    (`none` never is), and its `kid` picks the key (an unknown `kid` may fetch the route's
//!    `jwks_url` again, see `jwks.rs`);
//! 4. `jsonwebtoken` checks the signature, then `exp` (required), `nbf`, `iss` and `aud`
//!    (each required when the route sets it), with the route's leeway;
//! 5. the user claim: a string, or a whole number written in decimal.
//!
//! The claim then goes through the same rules as every other identity (`super::finish`).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::cache::TokenCache;
use super::jwks::{Loaded, RemoteKeys};
use super::keys::Miss;
use crate::config::{Jwt, JwtKeys, TokenFrom};
use crate::ids::UserId;
use crate::reject::{Reject, TokenError};

type Claims = Map<String, Value>;

/// One route's verifier: its keys, one `Validation` per listed algorithm, its cache.
pub struct Verifier {
    cfg: Arc<Jwt>,
    keys: Keys,
    validations: Vec<(Algorithm, Validation)>,
    cache: Option<TokenCache>,
    /// The key generation the cache was filled with; a new one empties it.
    cache_generation: AtomicU64,
}

enum Keys {
    /// `jwks_file` or `secret_env`: read at load; a reload builds a new verifier.
    Fixed(Arc<Loaded>),
    Remote(Arc<RemoteKeys>),
}

impl Verifier {
    /// Builds the verifier; a `jwks_url` starts being fetched at once (needs a tokio runtime).
    pub fn new(cfg: &Arc<Jwt>) -> Verifier {
        let keys = match &cfg.keys {
            JwtKeys::File { keys, .. } | JwtKeys::Secret { keys, .. } => {
                Keys::Fixed(Arc::new(Loaded {
                    set: keys.clone(),
                    generation: 0,
                }))
            }
            JwtKeys::Url {
                url,
                refresh,
                min_refresh,
            } => Keys::Remote(RemoteKeys::start(
                url.clone(),
                cfg.algorithms.clone(),
                *refresh,
                *min_refresh,
            )),
        };
        let validations = cfg
            .algorithms
            .iter()
            .map(|&alg| (alg, validation(cfg, alg)))
            .collect();
        Verifier {
            cfg: cfg.clone(),
            keys,
            validations,
            cache: TokenCache::new(cfg.cache_entries),
            cache_generation: AtomicU64::new(0),
        }
    }

    /// The request's user, from a verified token; `finish` applies the route's id rules.
    pub async fn user_id(
        &self,
        headers: &HeaderMap,
        finish: impl Fn(&str) -> Result<UserId, Reject>,
    ) -> Result<UserId, Reject> {
        let token = self.token(headers)?;
        let mut loaded = self.loaded().await?;
        let now = unix_now();
        let cache_key = self
            .cache
            .as_ref()
            .map(|_| TokenCache::key(token.as_bytes()));
        if let (Some(cache), Some(key)) = (&self.cache, &cache_key) {
            // Read first: a write on every request would bounce the line between cores.
            let generation = loaded.generation;
            if self.cache_generation.load(Ordering::Relaxed) != generation
                && self.cache_generation.swap(generation, Ordering::Relaxed) != generation
            {
                cache.clear();
            }
            if let Some(user) = cache.get(key, loaded.generation, now) {
                return Ok(user);
            }
        }

        let (alg, kid) = peek(token)?;
        let Some(validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
        else {
            return Err(Reject::Token(TokenError::AlgorithmNotAllowed));
        };
        let kid = kid.as_deref();
        if let (Err(Miss::UnknownKid), Keys::Remote(remote)) =
            (loaded.set.find(kid, alg), &self.keys)
        {
            // Perhaps a rotation: fetch again (at most once per `min_refresh`).
            if remote.refetch().await
                && let Some(fresh) = remote.current()
            {
                loaded = Cow::Owned(fresh);
            }
        }
        let key = loaded
            .set
            .find(kid, alg)
            .map_err(|_| Reject::Token(TokenError::UnknownKey))?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| Reject::Token(refusal(e.kind())))?
            .claims;

        let user = finish(&user_claim(&claims, &self.cfg.claim)?)?;
        if let (Some(cache), Some(key)) = (&self.cache, cache_key) {
            let exp = claims.get("exp").and_then(unix_seconds).unwrap_or(0);
            cache.insert(key, user.clone(), exp, loaded.generation, now);
        }
        Ok(user)
    }

    /// The keys to verify with; waits for the first fetch of a `jwks_url` if none came yet.
    /// Fixed keys are borrowed: a reference count touched by every request on every core
    /// would bounce between them.
    async fn loaded(&self) -> Result<Cow<'_, Arc<Loaded>>, Reject> {
        match &self.keys {
            Keys::Fixed(l) => Ok(Cow::Borrowed(l)),
            Keys::Remote(remote) => match remote.current() {
                Some(l) => Ok(Cow::Owned(l)),
                None => {
                    remote.refetch().await;
                    remote
                        .current()
                        .map(Cow::Owned)
                        .ok_or(Reject::KeysUnavailable)
                }
            },
        }
    }

    /// The raw token, at most `max_token_bytes` long.
    fn token<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, Reject> {
        let raw: &[u8] = match &self.cfg.from {
            TokenFrom::Bearer => {
                let v = one_header(headers, &AUTHORIZATION)?;
                // Another scheme (Basic, …) is no bearer token: answered like none at all.
                match v.get(..7) {
                    Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &v[7..],
                    _ => return Err(Reject::Token(TokenError::MissingToken)),
                }
            }
            TokenFrom::Header(name) => one_header(headers, name)?,
            TokenFrom::Cookie(name) => {
                super::cookie(headers, name)?.ok_or(Reject::Token(TokenError::MissingToken))?
            }
        };
        let raw = raw.trim_ascii();
        if raw.len() > self.cfg.max_token_bytes {
            return Err(Reject::Token(TokenError::TooLarge));
        }
        if raw.is_empty() {
            return Err(Reject::Token(TokenError::Malformed));
        }
        std::str::from_utf8(raw).map_err(|_| Reject::Token(TokenError::Malformed))
    }
}

/// The value of a header that must occur once; absent → no token, repeated → malformed.
fn one_header<'h>(headers: &'h HeaderMap, name: &http::HeaderName) -> Result<&'h [u8], Reject> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(Reject::Token(TokenError::MissingToken)),
        (Some(v), None) => Ok(v.as_bytes()),
        (Some(_), Some(_)) => Err(Reject::Token(TokenError::Malformed)),
    }
}

/// The `alg` and `kid` of a token's header, read before any key is chosen. `alg` values the
/// library does not know (`none` among them) are refused here as not allowed.
fn peek(token: &str) -> Result<(Algorithm, Option<String>), Reject> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        alg: Cow<'a, str>,
        #[serde(default)]
        kid: Option<String>,
    }
    let malformed = Reject::Token(TokenError::Malformed);
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| malformed.clone())?;
    let head: Head<'_> = serde_json::from_slice(&json).map_err(|_| malformed)?;
    let alg = head
        .alg
        .parse()
        .map_err(|_| Reject::Token(TokenError::AlgorithmNotAllowed))?;
    Ok((alg, head.kid))
}

/// The checks `jsonwebtoken` runs after the signature, for one algorithm.
fn validation(cfg: &Jwt, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    // The library checks `iss` and `aud` only when the token has them: when the route sets
    // one, a token without it must fail too, so it is required.
    let mut required = vec!["exp"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    match &cfg.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        // Not checked when not set (the library would otherwise refuse any token with `aud`).
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

/// The library's error as a refusal reason.
fn refusal(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) => TokenError::ClaimMissing,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => TokenError::AlgorithmNotAllowed,
        _ => TokenError::Malformed,
    }
}

/// The user claim as text: a non-empty string, or a whole number in decimal.
fn user_claim(claims: &Claims, name: &str) -> Result<String, Reject> {
    match claims.get(name) {
        None | Some(Value::Null) => Err(Reject::Token(TokenError::ClaimMissing)),
        Some(Value::String(s)) if s.is_empty() => Err(Reject::Token(TokenError::ClaimMissing)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        Some(_) => Err(Reject::Token(TokenError::ClaimInvalid)),
    }
}

/// A NumericDate claim as whole seconds.
fn unix_seconds(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn the_header_is_read_before_any_key_is_chosen() {
        let t = |head: &str| format!("{}.e30.c2ln", b64(head));
        assert_eq!(
            peek(&t(r#"{"alg":"RS256","kid":"k1"}"#)).unwrap(),
            (Algorithm::RS256, Some("k1".to_owned()))
        );
        assert_eq!(
            peek(&t(r#"{"alg":"ES256"}"#)).unwrap(),
            (Algorithm::ES256, None)
        );
        for (head, reason) in [
            (r#"{"alg":"none"}"#, "algorithm_not_allowed"),
            (r#"{"alg":"HS1024"}"#, "algorithm_not_allowed"),
            (r#"{"kid":"k1"}"#, "malformed"),
            (r#"{"alg":5}"#, "malformed"),
            ("not json", "malformed"),
        ] {
            let Err(Reject::Token(e)) = peek(&t(head)) else {
                panic!("{head} accepted");
            };
            assert_eq!(e.reason(), reason, "{head}");
        }
        for shape in ["", "a.b", "a.b.c.d", "!!!.e30.c2ln", "a..b.c"] {
            assert_eq!(
                peek(shape),
                Err(Reject::Token(TokenError::Malformed)),
                "{shape}"
            );
        }
    }

    #[test]
    fn the_user_claim_is_a_string_or_a_whole_number() {
        let claims: Claims = serde_json::from_str(
            r#"{"sub":"alice","n":42,"neg":-7,"f":4.5,"b":true,"e":"","z":null}"#,
        )
        .unwrap();
        assert_eq!(user_claim(&claims, "sub").unwrap(), "alice");
        assert_eq!(user_claim(&claims, "n").unwrap(), "42");
        assert_eq!(user_claim(&claims, "neg").unwrap(), "-7");
        for (name, e) in [
            ("f", TokenError::ClaimInvalid),
            ("b", TokenError::ClaimInvalid),
            ("e", TokenError::ClaimMissing),
            ("z", TokenError::ClaimMissing),
            ("absent", TokenError::ClaimMissing),
        ] {
            assert_eq!(user_claim(&claims, name), Err(Reject::Token(e)), "{name}");
        }
    }

    #[test]
    fn library_errors_map_to_reasons() {
        for (kind, reason) in [
            (ErrorKind::InvalidSignature, "bad_signature"),
            (ErrorKind::ExpiredSignature, "expired"),
            (ErrorKind::ImmatureSignature, "not_yet_valid"),
            (ErrorKind::InvalidIssuer, "wrong_issuer"),
            (
                ErrorKind::MissingRequiredClaim("iss".into()),
                "wrong_issuer",
            ),
            (ErrorKind::InvalidAudience, "wrong_audience"),
            (
                ErrorKind::MissingRequiredClaim("aud".into()),
                "wrong_audience",
            ),
            (
                ErrorKind::MissingRequiredClaim("exp".into()),
                "claim_missing",
            ),
            (ErrorKind::InvalidAlgorithm, "algorithm_not_allowed"),
            (ErrorKind::InvalidToken, "malformed"),
            (ErrorKind::InvalidClaimFormat("exp".into()), "malformed"),
        ] {
            assert_eq!(refusal(&kind).reason(), reason, "{kind:?}");
        }
    }
}
