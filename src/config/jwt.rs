//! `identity.jwt` compiled: where the token is, which keys verify it and which claims must
//! hold. Checked once at load with the file, line and key of anything wrong; a `jwks_file` is
//! read here too (and so again on every reload: rotating keys needs no restart).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use http::header::AUTHORIZATION;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde_saphyr::Location;

use super::ConfigError;
use super::raw::{RawJwt, RawTokenFrom};
use crate::identity::keys::KeySet;

/// Most clock skew `leeway` may allow: more would keep expired tokens alive.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Least `min_refresh`: the floor that keeps a flood of unknown `kid`s off the key server.
pub const MIN_REFRESH_FLOOR: Duration = Duration::from_secs(1);
/// Shortest HMAC secret (RFC 7518 §3.2: a key at least as long as the hash output).
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwt {
    pub from: TokenFrom,
    pub keys: JwtKeys,
    /// Never empty, never HMAC mixed with public-key families.
    pub algorithms: Vec<Algorithm>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim holding the user id (`sub` by default).
    pub claim: String,
    pub leeway: Duration,
    pub max_token_bytes: usize,
    /// 0: no cache.
    pub cache_entries: usize,
}

/// Where the token is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFrom {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// Another header whose whole value is the token.
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeys {
    /// Read at load (and reload).
    File { path: PathBuf, keys: Arc<KeySet> },
    /// Fetched by the running server: at start, every `refresh`, and on an unknown `kid`
    /// at most once per `min_refresh`.
    Url {
        url: http::Uri,
        refresh: Duration,
        min_refresh: Duration,
    },
    /// Read from the environment at load.
    Secret { env: String, keys: Arc<KeySet> },
}

/// Compiles `raw`; `err(at, key, message)` names the key under `…identity.jwt.`; relative
/// `jwks_file` paths are read from `base` (the config file's directory).
pub(super) fn compile_jwt(
    raw: RawJwt,
    at: &Location,
    base: &Path,
    err: &dyn Fn(&Location, &str, String) -> ConfigError,
) -> Result<Jwt, ConfigError> {
    let from = match raw.from {
        None => TokenFrom::Bearer,
        Some(s) => compile_from(s.value).map_err(|m| err(&s.referenced, "from", m))?,
    };
    let algorithms: Vec<Algorithm> = raw.algorithms.value.iter().map(|a| a.0).collect();
    let algs_at = &raw.algorithms.referenced;
    if algorithms.is_empty() {
        return Err(err(
            algs_at,
            "algorithms",
            "list at least one algorithm".into(),
        ));
    }
    let hmac = algorithms
        .iter()
        .filter(|a| a.family() == AlgorithmFamily::Hmac)
        .count();
    if hmac != 0 && hmac != algorithms.len() {
        return Err(err(
            algs_at,
            "algorithms",
            "do not mix HMAC (HS*) with public-key algorithms: a token could then be \"signed\" \
             with the public key as its HMAC secret"
                .into(),
        ));
    }
    let symmetric = hmac != 0;

    if raw.jwks_url.is_none() {
        for (name, value) in [("refresh", &raw.refresh), ("min_refresh", &raw.min_refresh)] {
            if let Some(v) = value {
                return Err(err(
                    &v.referenced,
                    name,
                    "applies to `jwks_url` only".into(),
                ));
            }
        }
    }
    let keys = match (raw.jwks_file, raw.jwks_url, raw.secret_env) {
        (Some(_), None, None) | (None, Some(_), None) if symmetric => {
            return Err(err(
                algs_at,
                "algorithms",
                "a key set holds public keys: list RS*, PS*, ES* or EdDSA (HS* takes `secret_env`)"
                    .into(),
            ));
        }
        (Some(file), None, None) => {
            let path = base.join(file.value.trim());
            let bytes = std::fs::read(&path).map_err(|e| {
                err(
                    &file.referenced,
                    "jwks_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let keys = KeySet::from_jwks(&bytes, &algorithms).map_err(|m| {
                err(
                    &file.referenced,
                    "jwks_file",
                    format!("{}: {m}", path.display()),
                )
            })?;
            JwtKeys::File {
                path,
                keys: Arc::new(keys),
            }
        }
        (None, Some(url), None) => {
            let refresh = raw.refresh.map_or(Duration::from_secs(300), |r| r.value.0);
            let min_refresh = match raw.min_refresh {
                None => Duration::from_secs(30).min(refresh),
                Some(m) if m.value.0 < MIN_REFRESH_FLOOR => {
                    return Err(err(
                        &m.referenced,
                        "min_refresh",
                        format!("must be at least {MIN_REFRESH_FLOOR:?}"),
                    ));
                }
                Some(m) if m.value.0 > refresh => {
                    return Err(err(
                        &m.referenced,
                        "min_refresh",
                        "must not be longer than `refresh`".into(),
                    ));
                }
                Some(m) => m.value.0,
            };
            JwtKeys::Url {
                url: url.value.0,
                refresh,
                min_refresh,
            }
        }
        (None, None, Some(env)) => {
            if !symmetric {
                return Err(err(
                    algs_at,
                    "algorithms",
                    "a secret verifies HS256, HS384 or HS512 only".into(),
                ));
            }
            let name = env.value.trim().to_owned();
            let secret = std::env::var(&name).map_err(|_| {
                err(
                    &env.referenced,
                    "secret_env",
                    format!("environment variable {name} is not set (or not UTF-8)"),
                )
            })?;
            if secret.len() < MIN_SECRET_BYTES {
                return Err(err(
                    &env.referenced,
                    "secret_env",
                    format!("the secret in {name} must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
            let keys = KeySet::from_secret(secret.as_bytes())
                .map_err(|m| err(&env.referenced, "secret_env", m))?;
            JwtKeys::Secret {
                env: name,
                keys: Arc::new(keys),
            }
        }
        _ => {
            return Err(err(
                at,
                "",
                "set exactly one of `jwks_file`, `jwks_url` or `secret_env`".into(),
            ));
        }
    };
    if raw.leeway.value.0 > MAX_LEEWAY {
        return Err(err(
            &raw.leeway.referenced,
            "leeway",
            format!("at most {MAX_LEEWAY:?}: a longer one keeps expired tokens alive"),
        ));
    }
    let claim = raw.claim.value.trim().to_owned();
    if claim.is_empty() {
        return Err(err(
            &raw.claim.referenced,
            "claim",
            "must not be empty".into(),
        ));
    }
    let max_token_bytes = usize::try_from(raw.max_token_bytes.value.0).unwrap_or(usize::MAX);
    if max_token_bytes == 0 {
        return Err(err(
            &raw.max_token_bytes.referenced,
            "max_token_bytes",
            "must be at least 1".into(),
        ));
    }
    Ok(Jwt {
        from,
        keys,
        algorithms,
        issuer: raw.issuer,
        audience: raw.audience,
        claim,
        leeway: raw.leeway.value.0,
        max_token_bytes,
        cache_entries: raw.cache_entries,
    })
}

fn compile_from(raw: RawTokenFrom) -> Result<TokenFrom, String> {
    match (raw.header, raw.cookie) {
        (Some(h), None) if h.0 == AUTHORIZATION => Ok(TokenFrom::Bearer),
        (Some(h), None) => Ok(TokenFrom::Header(h.0)),
        (None, Some(c)) if !c.trim().is_empty() => Ok(TokenFrom::Cookie(c.trim().to_owned())),
        _ => Err("set exactly one of `header` or `cookie`".into()),
    }
}
