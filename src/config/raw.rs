//! The YAML schema as serde types. Every struct rejects unknown keys, and every value type that
//! can be checked on its own (durations, sizes, rates, path templates, methods, URLs) validates
//! while it is parsed, so its error carries the line and column of the offending value.
//! Rules that span several keys live in `compile.rs`, with the location kept by `Spanned`.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use super::values::{
    Bytes, Dur, HeaderNameValue, JwksUrl, JwtAlgorithm, MethodValue, PathTemplate, Timestamp,
    TrustedNet, UpstreamUrl,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub upstream: RawUpstream,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub trusted_proxies: Vec<TrustedNet>,
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Ambiguous path spellings that are refused unless allowed here.
    #[serde(default)]
    pub paths: RawPaths,
    /// Method-override headers (`X-HTTP-Method-Override`…) forwarded on non-sale requests.
    #[serde(default)]
    pub pass_method_override: Vec<HeaderNameValue>,
    #[serde(default = "default_health_path")]
    pub health_path: Option<Spanned<String>>,
    pub admin: Option<RawAdmin>,
    pub store: Option<Spanned<RawStore>>,
    #[serde(default)]
    pub signing: Option<RawSigning>,
    #[serde(default)]
    pub access_log: Option<RawAccessLog>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

/// `access_log: { enabled, sample, log_user_ids, path }` (see `access_log.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_sample")]
    pub sample: Spanned<f64>,
    #[serde(default)]
    pub log_user_ids: bool,
    /// A file to append to; stdout when absent.
    #[serde(default)]
    pub path: Option<std::path::PathBuf>,
}

fn default_sample() -> Spanned<f64> {
    Spanned::new(1.0, Location::UNKNOWN, Location::UNKNOWN)
}

/// The admin API listener (stock, sale status). Omit to disable it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: SocketAddr,
    /// Name of the environment variable that holds the bearer token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// Name of the environment variable that holds the read-only token (optional).
    #[serde(default)]
    pub read_token_env: Option<String>,
    /// `GET /metrics` without a token (for a scrape job on a private network).
    #[serde(default)]
    pub metrics_open: bool,
}

fn default_token_env() -> String {
    "FLASHGATE_ADMIN_TOKEN".to_owned()
}

/// `signing: { key_env, key_id }`: sign every forwarded winner (see `signing.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSigning {
    /// Name of the environment variable holding the HMAC key (at least 32 bytes).
    pub key_env: String,
    /// Sent as `kid=`, so a backend can hold two keys while rotating.
    pub key_id: String,
}

/// Where stock lives. Omit `store` for the embedded in-memory store (one instance only).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `redis://host:port/db`, or `redis+unix:///path/to/redis.sock`.
    #[serde(default)]
    pub redis: Option<Spanned<String>>,
    /// A Redis Cluster's seed nodes (`redis://` or `rediss://` URLs), instead of `redis`.
    #[serde(default)]
    pub cluster: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default = "default_store_connections")]
    pub connections: NonZeroUsize,
    #[serde(default = "d_500ms")]
    pub connect_timeout: Dur,
    #[serde(default = "d_250ms")]
    pub response_timeout: Dur,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: Spanned<String>,
    /// Consecutive store failures that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: NonZeroU32,
    /// How long an open breaker fails calls at once before probing.
    #[serde(default = "d_1s")]
    pub breaker_cooldown: Dur,
    /// With `rediss://`: the CA to trust (instead of the system's) and a client certificate.
    #[serde(default)]
    pub tls: Option<Spanned<RawRedisTls>>,
    /// Replicas that must hold a reservation before its buyer is forwarded.
    #[serde(default)]
    pub wait_replicas: Option<RawWaitReplicas>,
}

/// `store.wait_replicas: { replicas, timeout }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWaitReplicas {
    pub replicas: NonZeroU32,
    #[serde(default = "d_100ms")]
    pub timeout: Dur,
}

fn d_100ms() -> Dur {
    Dur(Duration::from_millis(100))
}

/// `store.tls: { ca_file, cert_file, key_file }` (PEM files).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisTls {
    #[serde(default)]
    pub ca_file: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    pub cert_file: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    pub key_file: Option<Spanned<std::path::PathBuf>>,
}

fn default_breaker_failures() -> NonZeroU32 {
    NonZeroU32::new(5).expect("non-zero literal")
}

fn default_store_connections() -> NonZeroUsize {
    NonZeroUsize::new(4).expect("non-zero literal")
}
fn default_key_prefix() -> Spanned<String> {
    Spanned::new("fg".to_owned(), Location::UNKNOWN, Location::UNKNOWN)
}
fn d_250ms() -> Dur {
    Dur(Duration::from_millis(250))
}
fn d_500ms() -> Dur {
    Dur(Duration::from_millis(500))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

fn default_health_path() -> Option<Spanned<String>> {
    Some(Spanned::new(
        "/healthz".to_owned(),
        Location::UNKNOWN,
        Location::UNKNOWN,
    ))
}

/// Spellings of a path that backends read differently; each refused with 400 unless allowed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    #[serde(default)]
    pub allow_encoded_slash: bool,
    #[serde(default)]
    pub allow_backslash: bool,
    #[serde(default)]
    pub allow_semicolon: bool,
}

/// What a request that matches no route gets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Forwarded to the upstream untouched (a transparent sidecar).
    #[default]
    Proxy,
    /// Answered 404 by flashgate (an allow-list of routes).
    NotFound,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: UpstreamUrl,
    #[serde(default = "d_1s")]
    pub connect_timeout: Dur,
    #[serde(default = "d_30s")]
    pub request_timeout: Dur,
    #[serde(default = "d_1s")]
    pub interim_timeout: Dur,
    #[serde(default = "d_90s")]
    pub pool_idle_timeout: Dur,
    #[serde(default = "d_1s")]
    pub order_idle_timeout: Dur,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    #[serde(default = "default_max_response_headers")]
    pub max_response_headers: NonZeroUsize,
    #[serde(default = "default_max_response_head_bytes")]
    pub max_response_head_bytes: Spanned<Bytes>,
}

fn default_max_response_headers() -> NonZeroUsize {
    NonZeroUsize::new(1000).expect("non-zero literal")
}
fn default_max_response_head_bytes() -> Spanned<Bytes> {
    Spanned::new(Bytes(256 * 1024), Location::UNKNOWN, Location::UNKNOWN)
}

fn d_1s() -> Dur {
    Dur(Duration::from_secs(1))
}
fn d_10s() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_30s() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_60s() -> Dur {
    Dur(Duration::from_secs(60))
}
fn d_90s() -> Dur {
    Dur(Duration::from_secs(90))
}
fn default_pool_max_idle() -> usize {
    1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_max_connections")]
    pub max_connections: NonZeroUsize,
    #[serde(default = "d_10s")]
    pub header_read_timeout: Dur,
    #[serde(default = "d_60s")]
    pub keep_alive_timeout: Dur,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Spanned<Bytes>,
    #[serde(default = "default_max_headers")]
    pub max_headers: NonZeroUsize,
    #[serde(default = "default_max_uri_bytes")]
    pub max_uri_bytes: Bytes,
    #[serde(default = "d_30s")]
    pub drain_timeout: Dur,
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: NonZeroU32,
    /// Request body limit for every route without its own `max_body`; none by default.
    pub max_body: Option<Bytes>,
    /// Serving threads (one runtime and listener each); 0 = one per core.
    #[serde(default)]
    pub threads: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            max_connections: default_max_connections(),
            header_read_timeout: d_10s(),
            keep_alive_timeout: d_60s(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_uri_bytes: default_max_uri_bytes(),
            drain_timeout: d_30s(),
            h2_max_concurrent_streams: default_h2_streams(),
            max_body: None,
            threads: 0,
        }
    }
}

fn default_max_connections() -> NonZeroUsize {
    NonZeroUsize::new(10_000).expect("non-zero literal")
}
fn default_max_header_bytes() -> Spanned<Bytes> {
    Spanned::new(Bytes(16 * 1024), Location::UNKNOWN, Location::UNKNOWN)
}
fn default_max_headers() -> NonZeroUsize {
    NonZeroUsize::new(100).expect("non-zero literal")
}
fn default_max_uri_bytes() -> Bytes {
    Bytes(8 * 1024)
}
fn default_h2_streams() -> NonZeroU32 {
    NonZeroU32::new(256).expect("non-zero literal")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RawMatch,
    pub identity: Option<Spanned<RawIdentity>>,
    #[serde(default)]
    pub limits: RawLimits,
    /// Request body limit on this route (413 past it).
    pub max_body: Option<Bytes>,
    pub sale: Option<Spanned<RawSale>>,
    pub waiting_room: Option<Spanned<super::room::RawRoom>>,
}

/// Marks a route as a flash-sale route: a request reaches the backend only if it wins stock.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSale {
    pub sku: Spanned<RawSource>,
    #[serde(default)]
    pub quantity: Option<Spanned<RawQuantity>>,
    #[serde(
        default = "default_per_user_limit",
        deserialize_with = "per_user_limit"
    )]
    pub per_user_limit: NonZeroU32,
    #[serde(default)]
    pub release_on: Vec<ReleaseOn>,
    /// RFC 3339 times, e.g. `2026-11-27T09:00:00Z`.
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
    /// Most body bytes read to find a JSON field.
    #[serde(default = "default_sale_max_body")]
    pub max_body: Bytes,
    /// How long this instance answers `sold_out` without asking the store again.
    #[serde(default = "d_1s")]
    pub sold_out_recheck: Dur,
    /// Where shoppers read the SKU's stock as a server-sent event stream: a path template
    /// with `{sku}` (see `stock_events.rs`).
    #[serde(default)]
    pub stock_events: Option<Spanned<String>>,
}

fn default_per_user_limit() -> NonZeroU32 {
    NonZeroU32::MIN
}

/// Units per user, 1 to `u32::MAX` (well within the 2^53 − 1 the stores count exactly), with
/// an error that says so rather than "invalid u32".
fn per_user_limit<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroU32, D::Error> {
    let n = u64::deserialize(d)?;
    u32::try_from(n)
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| {
            de::Error::custom(format!(
                "must be a whole number from 1 to {}, got {n}",
                u32::MAX
            ))
        })
}
fn default_sale_max_body() -> Bytes {
    Bytes(16 * 1024)
}

/// Where a value is read from. Exactly one key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub path_param: Option<String>,
    pub query: Option<String>,
    pub header: Option<HeaderNameValue>,
    pub json: Option<String>,
}

/// A fixed quantity, or where to read it from.
///
/// Not `#[serde(untagged)]`, whose error ("data did not match any variant") would hide why a
/// number was refused.
#[derive(Debug)]
pub enum RawQuantity {
    Fixed(u32),
    From(RawSource),
}

impl<'de> Deserialize<'de> for RawQuantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawQuantity;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number of units, or a source such as `{ json: qty }`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v).map(RawQuantity::Fixed).map_err(|_| {
                    E::custom(format!(
                        "{v} is too large: a quantity is at most per_user_limit (at most {})",
                        u32::MAX
                    ))
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("must be at least 1, got {v}"))),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                RawSource::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawQuantity::From)
            }
        }
        d.deserialize_any(V)
    }
}

/// A backend outcome that means "the order was certainly not taken": release the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ReleaseOn {
    Status(u16),
    Named(ReleaseNamed),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseNamed {
    ConnectError,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default)]
    pub method: Option<OneOrMany<MethodValue>>,
    pub path: PathTemplate,
}

/// One value or a list of them (`method: POST` or `method: [GET, HEAD]`).
///
/// Not `#[serde(untagged)]`: an untagged enum replaces the inner error with "data did not match
/// any variant", which hides the one thing the operator needs (e.g. "invalid HTTP method").
#[derive(Debug)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(de::value::StrDeserializer::<E>::new(v)).map(OneOrMany::One)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Where the user id comes from. Exactly one source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub header: Option<HeaderNameValue>,
    pub cookie: Option<String>,
    pub jwt: Option<Spanned<RawJwt>>,
    #[serde(default = "default_max_user_len")]
    pub max_length: NonZeroUsize,
    #[serde(default)]
    pub normalize: super::Normalize,
}

/// `identity.jwt`: the user id is a claim of a verified JSON Web Token. Rules that span keys
/// (exactly one key source, algorithm families) are checked in `config/jwt.rs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// Where the token is; `Authorization: Bearer <token>` when omitted.
    pub from: Option<Spanned<RawTokenFrom>>,
    pub jwks_file: Option<Spanned<String>>,
    pub jwks_url: Option<Spanned<JwksUrl>>,
    /// Name of the environment variable holding an HMAC secret (HS256/384/512).
    pub secret_env: Option<Spanned<String>>,
    pub algorithms: Spanned<Vec<JwtAlgorithm>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim that holds the user id.
    #[serde(default = "default_claim")]
    pub claim: Spanned<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: Spanned<Dur>,
    /// How often `jwks_url` is fetched again (only with `jwks_url`).
    pub refresh: Option<Spanned<Dur>>,
    /// Least time between two fetches of `jwks_url`, however many unknown `kid`s arrive.
    pub min_refresh: Option<Spanned<Dur>>,
    /// Longest token accepted; a longer one is refused before it is parsed.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: Spanned<Bytes>,
    /// Verified tokens remembered (0 = check every signature every time).
    #[serde(default = "default_jwt_cache_entries")]
    pub cache_entries: usize,
}

/// Where a token is read: a header (`Authorization` means `Bearer <token>`) or a cookie.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenFrom {
    pub header: Option<HeaderNameValue>,
    pub cookie: Option<String>,
}

fn default_claim() -> Spanned<String> {
    Spanned::new("sub".to_owned(), Location::UNKNOWN, Location::UNKNOWN)
}
fn default_leeway() -> Spanned<Dur> {
    Spanned::new(d_30s(), Location::UNKNOWN, Location::UNKNOWN)
}
fn default_max_token_bytes() -> Spanned<Bytes> {
    Spanned::new(Bytes(8 * 1024), Location::UNKNOWN, Location::UNKNOWN)
}
fn default_jwt_cache_entries() -> usize {
    10_000
}

fn default_max_user_len() -> NonZeroUsize {
    NonZeroUsize::new(128).expect("non-zero literal")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub route: Option<Spanned<RawRate>>,
    pub per_ip: Option<Spanned<RawRate>>,
    pub per_user: Option<Spanned<RawRate>>,
    pub in_flight: Option<NonZeroU32>,
}

/// A token bucket: a refill rate (exactly one of `per_second` / `per_minute`) and a burst.
/// `max_keys` caps the keys a per-IP or per-user bucket remembers. `scope: global` also
/// enforces it across instances through the store; `on_store_error` says what a global
/// bucket does when the store cannot answer (checked in `config/limits.rs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: Option<NonZeroU32>,
    pub per_minute: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
    pub max_keys: Option<NonZeroUsize>,
    #[serde(default)]
    pub scope: Option<Spanned<RawScope>>,
    #[serde(default)]
    pub on_store_error: Option<Spanned<super::OnStoreError>>,
}

/// Where a bucket counts: in this instance only (the default), or across every instance
/// sharing the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawScope {
    Local,
    Global,
}
