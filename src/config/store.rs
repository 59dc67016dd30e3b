//! The `store` section compiled: the Redis URL's scheme checked, and with `rediss://` the TLS
//! files read (so a missing or unreadable file is a config error naming its key, not a store
//! that never connects).

use std::path::Path;

use serde_saphyr::Location;

use super::raw::{RawRedisTls, RawStore};
use super::{ConfigError, StoreConfig, describe};

/// PEM bytes for a `rediss://` connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// The CA to trust instead of the system's roots.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and its key (for a server with `tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

pub(super) fn compile_store(
    s: RawStore,
    err: &impl Fn(&Location, String, String) -> ConfigError,
) -> Result<StoreConfig, ConfigError> {
    let url = &s.redis;
    let scheme = url.value.split("://").next().unwrap_or("");
    match scheme {
        "redis" | "rediss" | "redis+unix" | "unix" if url.value.contains("://") => {}
        _ => {
            return Err(err(
                &url.referenced,
                "store.redis".into(),
                format!(
                    "`{}` is not a Redis URL: use redis://host:port/db, rediss://host:port/db \
                     (TLS) or redis+unix:///path",
                    describe::mask_password(&url.value)
                ),
            ));
        }
    }
    let tls = match s.tls {
        None => None,
        Some(t) if scheme != "rediss" => {
            return Err(err(
                &t.referenced,
                "store.tls".into(),
                "needs a `rediss://` URL in `store.redis`".into(),
            ));
        }
        Some(t) => Some(compile_tls(t.value, &t.referenced, err)?),
    };
    Ok(StoreConfig {
        redis: s.redis.value,
        connections: s.connections.get(),
        connect_timeout: s.connect_timeout.0,
        response_timeout: s.response_timeout.0,
        key_prefix: s.key_prefix,
        breaker_failures: s.breaker_failures.get(),
        breaker_cooldown: s.breaker_cooldown.0,
        tls,
    })
}

fn compile_tls(
    t: RawRedisTls,
    at: &Location,
    err: &impl Fn(&Location, String, String) -> ConfigError,
) -> Result<RedisTls, ConfigError> {
    let read = |f: &serde_saphyr::Spanned<std::path::PathBuf>, key: &str| {
        read_pem(&f.value).map_err(|m| err(&f.referenced, format!("store.tls.{key}"), m))
    };
    let ca = t.ca_file.as_ref().map(|f| read(f, "ca_file")).transpose()?;
    let client = match (&t.cert_file, &t.key_file) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((read(c, "cert_file")?, read(k, "key_file")?)),
        _ => {
            return Err(err(
                at,
                "store.tls".into(),
                "`cert_file` and `key_file` go together (a client certificate and its key)".into(),
            ));
        }
    };
    Ok(RedisTls { ca, client })
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{} is not a PEM file", path.display()));
    }
    Ok(bytes)
}
