//! Configuration: parse the YAML once, validate it, and compile it into the typed [`Config`] the
//! request path reads. Nothing here runs per request.
//!
//! Errors always name the file, line, column and key (`flashgate.yaml:12:18: routes[0].limits…`),
//! like `nginx -t`, because an operator fixing a config minutes before a sale needs exactly that.

mod describe;
mod jwt;
mod limits;
mod raw;
mod room;
mod route;
mod shadow;
mod stock_stream;
mod store;
pub mod values;

use std::cell::RefCell;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde_saphyr::Location;

pub use describe::{describe, mask_password};
pub use jwt::{Jwt, JwtKeys, TokenFrom};
pub use raw::Unmatched;
pub use room::{Queueing, Room, RoomKey};

use crate::canonical::PathPolicy;
use raw::RawConfig;
use route::compile_route;
pub use shadow::templates_overlap;
pub use store::{RedisTarget, RedisTls};
pub use values::{PathTemplate, UpstreamUrl};

/// hyper refuses header buffers below this size.
const MIN_HEADER_BYTES: u64 = 8192;
/// Keys a per-IP / per-user limiter remembers unless `max_keys` says otherwise.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub file: String,
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub server: Server,
    pub trusted_proxies: Vec<IpNet>,
    pub unmatched: Unmatched,
    /// Which ambiguous path spellings are let through (see `canonical.rs`).
    pub paths: PathPolicy,
    /// Method-override headers kept on non-sale requests (stripped otherwise).
    pub pass_method_override: Vec<HeaderName>,
    pub health_path: Option<String>,
    pub admin: Option<Admin>,
    /// `None`: the embedded in-memory store.
    pub store: Option<StoreConfig>,
    /// Sign forwarded winners: the key's id and the variable holding it.
    pub signing: Option<Signing>,
    /// One JSON line per request (sampled), when enabled.
    pub access_log: Option<AccessLog>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// The share of requests logged, 0.0 to 1.0 (by trace id, so one trace is logged
    /// on every instance or on none).
    pub sample: f64,
    /// Log user ids as they are; otherwise a hash of each.
    pub log_user_ids: bool,
    /// Append here; stdout when `None`.
    pub path: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token_env: String,
    /// The read-only token's variable: status and stock reads, no writes.
    pub read_token_env: Option<String>,
    /// `GET /metrics` answers without a token.
    pub metrics_open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signing {
    pub key_env: String,
    pub key_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub redis: RedisTarget,
    pub connections: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub key_prefix: String,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// With `rediss://`: the CA and client certificate files' contents.
    pub tls: Option<RedisTls>,
    /// `store.wait_replicas`: replicas that must hold a reservation, and how long to wait.
    pub wait_replicas: Option<(u32, Duration)>,
}

/// A flash-sale route's admission rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub sku: Source,
    pub quantity: Quantity,
    pub per_user_limit: u32,
    pub release_on_status: Vec<u16>,
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
    pub max_body: usize,
    pub sold_out_recheck: Duration,
    /// The path template (with `{sku}`) of the SKU's stock stream, checked by
    /// `config/stock_stream.rs`; served by `stock_events.rs`.
    pub stock_events: Option<String>,
}

/// Where a request value (SKU, quantity) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    PathParam(String),
    Query(String),
    Header(HeaderName),
    /// A top-level field of a JSON object body.
    Json(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quantity {
    Fixed(u32),
    From(Source),
}

impl Sale {
    /// Whether reading the SKU or quantity needs the request body.
    pub fn reads_body(&self) -> bool {
        matches!(self.sku, Source::Json(_))
            || matches!(self.quantity, Quantity::From(Source::Json(_)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub url: UpstreamUrl,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// After a bare `100`/`102` from the backend, how long its final response may take to
    /// start before the client gets 502 `bad_upstream_response` (see `interim.rs`).
    pub interim_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// Orders (a flash route's winners) ride their own keep-alive connections, closed after
    /// this long idle (or `pool_idle_timeout`, if shorter): a backend's keep-alive timeout
    /// closing a connection as an order is sent on it loses that order to `uncertain`, and
    /// backends' timeouts start at 2 s (gunicorn) and 5 s (Node, Apache, uvicorn).
    pub order_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Header lines a backend response may carry; over it: 502 `bad_upstream_response`.
    pub max_response_headers: usize,
    /// Bytes a backend response head may take; over it: 502 `bad_upstream_response` (hyper
    /// checks it between reads, so a head arriving in large reads may pass up to ~2× this).
    pub max_response_head_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub drain_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub max_body: Option<u64>,
    /// 0 = one per core.
    pub threads: usize,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Empty means any method.
    pub methods: Vec<Method>,
    pub path: PathTemplate,
    pub identity: Option<Identity>,
    pub limits: Limits,
    pub max_body: Option<u64>,
    pub sale: Option<Sale>,
    /// The route's waiting room (`room/`), checked before its limits.
    pub waiting_room: Option<Room>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// Set by a trusted auth layer in front of flashgate.
    Header(HeaderName),
    Cookie(String),
    /// A claim of a verified JSON Web Token (see `config/jwt.rs`).
    Jwt(std::sync::Arc<Jwt>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub source: IdentitySource,
    pub max_length: usize,
    pub normalize: Normalize,
}

/// How a user id is made canonical before it is counted (and forwarded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Counted as sent: `Alice` and `alice` are two buyers.
    #[default]
    None,
    /// Unicode NFC: a composed and a decomposed `é` are one buyer.
    Nfc,
    /// NFC, then lower case: `Alice`, `ALICE` and `alice` are one buyer (for shops whose
    /// ids are case-insensitive).
    Lowercase,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub route: Option<Rate>,
    pub per_ip: Option<Rate>,
    pub per_user: Option<Rate>,
    pub in_flight: Option<u32>,
}

/// A token bucket: one token every `period`, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub period: Duration,
    pub burst: NonZeroU32,
    /// Only used by keyed (per-IP, per-user) buckets.
    pub max_keys: usize,
    /// `scope: global`: the bucket is also enforced across every instance sharing the store
    /// (`limit/global.rs`), behind its local bucket; what to do when the store cannot answer.
    /// `None`: this instance only.
    pub global: Option<OnStoreError>,
}

/// What a global bucket does when the store cannot answer (down, timed out, breaker open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Refuse: 503 `unavailable` (the default on sale routes).
    Closed,
    /// Admit, as if the global bucket had room (the default on other routes).
    Open,
}

impl OnStoreError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Closed => "closed",
            OnStoreError::Open => "open",
        }
    }
}

impl Rate {
    /// Seconds the bucket needs to refill from empty: the window `w` of `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        let nanos = self.period.as_nanos() * u128::from(self.burst.get());
        (nanos.div_ceil(1_000_000_000) as u64).max(1)
    }
}

impl Route {
    pub fn matches_method(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// A config error with the place it was found: `file:line:col: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column; 0 when the error has no place (an unreadable file).
    pub line: u64,
    pub column: u64,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and compiles a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read config: {e}"),
    })?;
    parse(&text, &file)
}

/// Parses and compiles config text; `file` is only used in messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    // serde_path_to_error tracks the key path; serde-saphyr adds the location. The path is
    // smuggled out through a cell because saphyr's closure must return saphyr's own error.
    let key_path = RefCell::new(String::new());
    let raw: RawConfig = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            *key_path.borrow_mut() = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        // `Spanned` wrappers show up as `.value` in the path; `?` is a segment serde could not
        // name (e.g. a syntax error inside a mapping), so `routes[0].match.?` is `routes[0].match`.
        let key = key_path.borrow().replace(".value", "");
        let key = key.trim_end_matches(".?");
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            key: if key == "?" || key == "." {
                String::new()
            } else {
                key.to_owned()
            },
            message: first_line(&e.without_snippet().to_string()),
        }
    })?;
    compile(raw, file)
}

/// saphyr's message may end with its own location and a snippet; we print our own location.
fn first_line(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or(msg).trim();
    // A hint meant for programmers embedding saphyr, not for operators.
    let line = line
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(line);
    match line.rfind(" at line ") {
        Some(i) => line[..i].to_owned(),
        None => line.to_owned(),
    }
}

fn compile(raw: RawConfig, file: &str) -> Result<Config, ConfigError> {
    let err = |at: &Location, key: String, message: String| ConfigError {
        file: file.to_owned(),
        line: at.line(),
        column: at.column(),
        key,
        message,
    };

    let server = raw.server;
    if server.max_header_bytes.value.0 < MIN_HEADER_BYTES {
        return Err(err(
            &server.max_header_bytes.referenced,
            "server.max_header_bytes".into(),
            format!("must be at least {MIN_HEADER_BYTES} bytes"),
        ));
    }
    let store = raw
        .store
        .map(|s| store::compile_store(s, &err))
        .transpose()?;
    if let Some(sample) = raw.access_log.as_ref().map(|a| &a.sample)
        && !(0.0..=1.0).contains(&sample.value)
    {
        return Err(err(
            &sample.referenced,
            "access_log.sample".into(),
            "must be between 0.0 and 1.0".into(),
        ));
    }
    let head = &raw.upstream.max_response_head_bytes;
    if head.value.0 < MIN_HEADER_BYTES {
        return Err(err(
            &head.referenced,
            "upstream.max_response_head_bytes".into(),
            format!("must be at least {MIN_HEADER_BYTES} bytes"),
        ));
    }
    if let Some(p) = &raw.health_path
        && !p.value.starts_with('/')
    {
        return Err(err(
            &p.referenced,
            "health_path".into(),
            format!("`{}` must start with `/`", p.value),
        ));
    }

    // Relative paths in the file (a `jwks_file`) are read from the file's own directory.
    let base = Path::new(file)
        .parent()
        .unwrap_or(Path::new(""))
        .to_path_buf();
    let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
    let mut route_at: Vec<Location> = Vec::with_capacity(raw.routes.len());
    for (i, spanned) in raw.routes.into_iter().enumerate() {
        let at = spanned.referenced;
        route_at.push(at);
        let route = compile_route(spanned.value, i, &base, &err, &at)?;
        if routes.iter().any(|r| r.name == route.name) {
            return Err(err(
                &at,
                format!("routes[{i}].name"),
                format!("duplicate route name `{}`", route.name),
            ));
        }
        routes.push(route);
    }
    // First match wins: a route above a sale route must not take its buys.
    shadow::refuse_shadowed_sales(&routes, &route_at, &err)?;
    // Stock streams are answered before routing: no route but a catch-all may share a path.
    let health = raw.health_path.as_ref().map(|p| p.value.as_str());
    stock_stream::refuse_collisions(&routes, &route_at, health, &err)?;

    Ok(Config {
        file: file.to_owned(),
        listen: raw.listen,
        upstream: Upstream {
            url: raw.upstream.url,
            connect_timeout: raw.upstream.connect_timeout.0,
            request_timeout: raw.upstream.request_timeout.0,
            interim_timeout: raw.upstream.interim_timeout.0,
            pool_idle_timeout: raw.upstream.pool_idle_timeout.0,
            order_idle_timeout: raw.upstream.order_idle_timeout.0,
            pool_max_idle: raw.upstream.pool_max_idle,
            max_response_headers: raw.upstream.max_response_headers.get(),
            max_response_head_bytes: usize::try_from(raw.upstream.max_response_head_bytes.value.0)
                .unwrap_or(usize::MAX),
        },
        server: Server {
            max_connections: server.max_connections.get(),
            header_read_timeout: server.header_read_timeout.0,
            keep_alive_timeout: server.keep_alive_timeout.0,
            max_header_bytes: usize::try_from(server.max_header_bytes.value.0)
                .unwrap_or(usize::MAX),
            max_headers: server.max_headers.get(),
            max_uri_bytes: usize::try_from(server.max_uri_bytes.0).unwrap_or(usize::MAX),
            drain_timeout: server.drain_timeout.0,
            h2_max_concurrent_streams: server.h2_max_concurrent_streams.get(),
            max_body: server.max_body.map(|b| b.0),
            threads: server.threads,
        },
        trusted_proxies: raw.trusted_proxies.into_iter().map(|t| t.0).collect(),
        unmatched: raw.unmatched,
        paths: PathPolicy {
            allow_encoded_slash: raw.paths.allow_encoded_slash,
            allow_backslash: raw.paths.allow_backslash,
            allow_semicolon: raw.paths.allow_semicolon,
        },
        pass_method_override: raw.pass_method_override.into_iter().map(|h| h.0).collect(),
        health_path: raw.health_path.map(|p| p.value),
        admin: raw.admin.map(|a| Admin {
            listen: a.listen,
            token_env: a.token_env,
            read_token_env: a.read_token_env,
            metrics_open: a.metrics_open,
        }),
        store,
        signing: raw.signing.map(|s| Signing {
            key_env: s.key_env,
            key_id: s.key_id,
        }),
        access_log: raw.access_log.filter(|a| a.enabled).map(|a| AccessLog {
            sample: a.sample.value,
            log_user_ids: a.log_user_ids,
            path: a.path,
        }),
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "upstream: { url: \"http://127.0.0.1:3000\" }\n";

    #[test]
    fn minimal_config_has_defaults() {
        let c = parse(BASE, "t.yaml").unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.unmatched, Unmatched::Proxy);
        assert_eq!(c.server.max_header_bytes, 16 * 1024);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn unknown_key_is_located() {
        let text =
            format!("{BASE}routes:\n  - name: a\n    match: {{ path: /a }}\n    limitz: {{}}\n");
        let e = parse(&text, "t.yaml").unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("limitz"), "{e}");
        assert!(e.to_string().starts_with("t.yaml:5:"), "{e}");
    }
}
