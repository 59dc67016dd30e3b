//! The `store` section compiled: the Redis URL's scheme checked, and with `rediss://` the TLS
//! files read (so a missing or unreadable file is a config error naming its key, not a store
//! that never connects).

use std::path::Path;

use serde_saphyr::{Location, Spanned};

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

/// Where Redis is: one server, or a Redis Cluster reached through its seed nodes (any of
/// them will do; the cluster tells flashgate the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Node(String),
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// The URLs, passwords masked, for logs and `check`.
    pub fn describe(&self) -> String {
        match self {
            RedisTarget::Node(url) => describe::mask_password(url),
            RedisTarget::Cluster(seeds) => format!(
                "cluster [{}]",
                seeds
                    .iter()
                    .map(|s| describe::mask_password(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn uses_tls(&self) -> bool {
        match self {
            RedisTarget::Node(url) => url.starts_with("rediss://"),
            RedisTarget::Cluster(seeds) => seeds.iter().all(|s| s.starts_with("rediss://")),
        }
    }
}

pub(super) fn compile_store(
    section: Spanned<RawStore>,
    err: &impl Fn(&Location, String, String) -> ConfigError,
) -> Result<StoreConfig, ConfigError> {
    let at = section.referenced;
    let s = section.value;
    let redis = match (s.redis, s.cluster) {
        (Some(url), None) => {
            let scheme = url.value.split("://").next().unwrap_or("");
            match scheme {
                "redis" | "rediss" | "redis+unix" | "unix" if url.value.contains("://") => {}
                _ => {
                    return Err(err(
                        &url.referenced,
                        "store.redis".into(),
                        format!(
                            "`{}` is not a Redis URL: use redis://host:port/db, \
                             rediss://host:port/db (TLS) or redis+unix:///path",
                            describe::mask_password(&url.value)
                        ),
                    ));
                }
            }
            RedisTarget::Node(url.value)
        }
        (None, Some(seeds)) => RedisTarget::Cluster(compile_seeds(seeds, err)?),
        (Some(_), Some(c)) => {
            return Err(err(
                &c.referenced,
                "store.cluster".into(),
                "give either `redis` (one server) or `cluster` (seed nodes), not both".into(),
            ));
        }
        (None, None) => {
            return Err(err(
                &at,
                "store".into(),
                "needs `redis: redis://host:port` (one server) or `cluster: [redis://host:port, \
                 ...]` (a Redis Cluster's seed nodes)"
                    .into(),
            ));
        }
    };
    if s.key_prefix.value.contains(['{', '}']) {
        return Err(err(
            &s.key_prefix.referenced,
            "store.key_prefix".into(),
            format!(
                "`{}` must not contain `{{` or `}}`: every key's hash tag is its SKU, so a \
                 sale's keys share one Redis Cluster slot",
                s.key_prefix.value
            ),
        ));
    }
    let tls = match s.tls {
        None => None,
        Some(t) if !redis.uses_tls() => {
            return Err(err(
                &t.referenced,
                "store.tls".into(),
                "needs a `rediss://` URL in `store.redis` (or every `store.cluster` seed)".into(),
            ));
        }
        Some(t) => Some(compile_tls(t.value, &t.referenced, err)?),
    };
    Ok(StoreConfig {
        redis,
        connections: s.connections.get(),
        connect_timeout: s.connect_timeout.0,
        response_timeout: s.response_timeout.0,
        key_prefix: s.key_prefix.value,
        breaker_failures: s.breaker_failures.get(),
        breaker_cooldown: s.breaker_cooldown.0,
        tls,
        wait_replicas: s.wait_replicas.map(|w| (w.replicas.get(), w.timeout.0)),
    })
}

/// `store.cluster`: at least one seed, every one `redis://host:port` or `rediss://host:port`,
/// all with the same scheme (a cluster speaks TLS on every node or on none).
fn compile_seeds(
    seeds: Spanned<Vec<Spanned<String>>>,
    err: &impl Fn(&Location, String, String) -> ConfigError,
) -> Result<Vec<String>, ConfigError> {
    if seeds.value.is_empty() {
        return Err(err(
            &seeds.referenced,
            "store.cluster".into(),
            "needs at least one seed node (redis://host:port)".into(),
        ));
    }
    let first_scheme = seeds.value[0]
        .value
        .split("://")
        .next()
        .unwrap_or("")
        .to_owned();
    let mut out = Vec::with_capacity(seeds.value.len());
    for (i, seed) in seeds.value.into_iter().enumerate() {
        let scheme = seed.value.split("://").next().unwrap_or("");
        let problem = if !seed.value.contains("://") || !matches!(scheme, "redis" | "rediss") {
            Some("is not a Redis Cluster node URL: use redis://host:port or rediss://host:port")
        } else if scheme != first_scheme {
            Some("mixes redis:// and rediss://: every node of a cluster speaks TLS, or none")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(err(
                &seed.referenced,
                format!("store.cluster[{i}]"),
                format!("`{}` {problem}", describe::mask_password(&seed.value)),
            ));
        }
        out.push(seed.value);
    }
    Ok(out)
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
