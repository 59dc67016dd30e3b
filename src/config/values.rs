//! Config value types that validate themselves while they are parsed, so that a bad value is
//! reported at its own line and column.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A duration written as `250ms`, `1s`, `2m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("invalid duration `{s}` ({e}); write e.g. 250ms, 1s, 2m"))
    }
}

/// A byte size: a plain integer, or a number with `B`, `KiB`, `MiB`, `GiB` (or `k`, `KB`, `M`, `MB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl Bytes {
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size `{s}`; write e.g. 8192, 16KiB, 1MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "k" | "K" | "KB" | "kB" | "KiB" => 1024,
            "M" | "MB" | "MiB" => 1024 * 1024,
            "G" | "GB" | "GiB" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}`; use B, KiB, MiB or GiB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Bytes)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 8192, 16KiB or 1MiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bytes, E> {
                u64::try_from(v)
                    .map(Bytes)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                Bytes::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A point in time written as RFC 3339 (`2026-11-27T09:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Timestamp(pub std::time::SystemTime);

impl TryFrom<String> for Timestamp {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_rfc3339_weak(s.trim())
            .map(Timestamp)
            .map_err(|e| {
                format!("invalid time `{s}` ({e}); write RFC 3339, e.g. 2026-11-27T09:00:00Z")
            })
    }
}

/// An HTTP method name (`GET`, `POST`, …), upper-cased.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MethodValue(pub Method);

impl TryFrom<String> for MethodValue {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Method::from_bytes(s.trim().to_ascii_uppercase().as_bytes())
            .map(MethodValue)
            .map_err(|_| format!("invalid HTTP method `{s}`"))
    }
}

/// A header name, checked and lower-cased once at load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HeaderNameValue(pub HeaderName);

impl TryFrom<String> for HeaderNameValue {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        HeaderName::from_bytes(s.trim().as_bytes())
            .map(HeaderNameValue)
            .map_err(|_| format!("invalid header name `{s}`"))
    }
}

/// A path template such as `/api/flash/{sku}/buy` or `/static/{*rest}`, compiled at load.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    pub source: String,
    pub router: matchit::Router<()>,
}

impl<'de> Deserialize<'de> for PathTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PathTemplate::compile(&s).map_err(de::Error::custom)
    }
}

impl PathTemplate {
    pub fn compile(s: &str) -> Result<PathTemplate, String> {
        if !s.starts_with('/') {
            return Err(format!("path template `{s}` must start with `/`"));
        }
        if s.len() > 1 && s.ends_with('/') {
            return Err(format!(
                "path template `{s}`: drop the trailing `/` (requests are matched without it)"
            ));
        }
        let mut router = matchit::Router::new();
        router
            .insert(s, ())
            .map_err(|e| format!("invalid path template `{s}`: {e}"))?;
        for extra in PathTemplate::forms(s).into_iter().skip(1) {
            let _ = router.insert(extra, ());
        }
        Ok(PathTemplate {
            source: s.to_owned(),
            router,
        })
    }

    /// The matchit routes one template is made of: the template itself, then, for a trailing
    /// catch-all, its prefix with and without the `/`. matchit's catch-all needs at least one
    /// byte, but `/static/{*rest}` should also match `/static/` and `/static` (and `/{*rest}`
    /// the root page). The shadowing check reads the same list, so both agree on what a
    /// template matches.
    pub fn forms(s: &str) -> Vec<&str> {
        let mut forms = vec![s];
        if let Some(i) = s.rfind("/{*")
            && s.ends_with('}')
        {
            forms.push(&s[..=i]);
            if i > 0 {
                forms.push(&s[..i]);
            }
        }
        forms
    }
}

/// A trusted proxy: a CIDR (`10.0.0.0/8`) or a single address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TrustedNet(pub IpNet);

impl TryFrom<String> for TrustedNet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(TrustedNet(net));
        }
        t.parse::<IpAddr>()
            .map(|ip| TrustedNet(IpNet::from(ip)))
            .map_err(|_| format!("invalid address or CIDR `{s}`"))
    }
}

/// The upstream base URL: `http://host:port`, optionally with a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to every forwarded path; empty or without a trailing `/`.
    pub path_prefix: String,
}

impl TryFrom<String> for UpstreamUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let uri: http::Uri = s
            .trim()
            .parse()
            .map_err(|e| format!("invalid upstream url `{s}`: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("upstream url `{s}` needs a scheme (http://)"))?;
        if scheme != Scheme::HTTP {
            return Err(format!(
                "upstream url `{s}`: only http:// is supported (terminate TLS in front of flashgate)"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream url `{s}` needs a host"))?;
        if uri.query().is_some() {
            return Err(format!("upstream url `{s}` must not have a query"));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(UpstreamUrl {
            scheme,
            authority,
            path_prefix,
        })
    }
}

/// A JWT signature algorithm (`RS256`, `ES256`, `HS256`, …), spelled as in a token's `alg`.
/// `none` is refused here, whatever its case: a token must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct JwtAlgorithm(pub jsonwebtoken::Algorithm);

/// Every algorithm name `algorithms` accepts, for messages.
pub const JWT_ALGORITHMS: &str =
    "HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA";

impl TryFrom<String> for JwtAlgorithm {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Err("`none` is never accepted: every token must be signed".into());
        }
        s.trim()
            .parse()
            .map(JwtAlgorithm)
            .map_err(|_| format!("unknown JWT algorithm `{s}`; use one of {JWT_ALGORITHMS}"))
    }
}

/// Where a route fetches its JSON Web Key Set: `http://host[:port]/path`. Plain HTTP only
/// (flashgate has no TLS client): an auth service on the private network, or a local sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct JwksUrl(pub http::Uri);

impl TryFrom<String> for JwksUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let uri: http::Uri = s
            .trim()
            .parse()
            .map_err(|e| format!("invalid jwks_url `{s}`: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "jwks_url `{s}`: only http:// is supported (use jwks_file for keys that arrive another way)"
            ));
        }
        if uri.authority().is_none_or(|a| a.host().is_empty()) {
            return Err(format!("jwks_url `{s}` needs a host"));
        }
        Ok(JwksUrl(uri))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Bytes::parse("8192"), Ok(Bytes(8192)));
        assert_eq!(Bytes::parse("16KiB"), Ok(Bytes(16 * 1024)));
        assert_eq!(Bytes::parse("1 MiB"), Ok(Bytes(1024 * 1024)));
        assert!(Bytes::parse("1 parsec").is_err());
        assert!(Bytes::parse("KiB").is_err());
        assert!(Bytes::parse("99999999999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            Dur::try_from("250ms".to_owned()),
            Ok(Dur(Duration::from_millis(250)))
        );
        assert_eq!(
            Dur::try_from("2m".to_owned()),
            Ok(Dur(Duration::from_secs(120)))
        );
        assert!(Dur::try_from("soon".to_owned()).is_err());
    }

    #[test]
    fn catch_all_matches_its_own_prefix() {
        let t = PathTemplate::compile("/{*rest}").unwrap();
        assert!(t.router.at("/").is_ok());
        assert!(t.router.at("/a/b").is_ok());
        let t = PathTemplate::compile("/static/{*rest}").unwrap();
        assert!(t.router.at("/static/").is_ok());
        assert!(t.router.at("/static").is_ok());
        assert!(t.router.at("/static/x.css").is_ok());
        assert!(t.router.at("/other").is_err());
    }

    #[test]
    fn jwt_algorithms_and_jwks_urls() {
        let alg = |s: &str| JwtAlgorithm::try_from(s.to_owned()).map(|a| a.0);
        assert_eq!(alg("RS256"), Ok(jsonwebtoken::Algorithm::RS256));
        assert_eq!(alg("EdDSA"), Ok(jsonwebtoken::Algorithm::EdDSA));
        for none in ["none", "None", "NONE"] {
            assert!(alg(none).unwrap_err().contains("never accepted"), "{none}");
        }
        assert!(alg("rs256").unwrap_err().contains("unknown JWT algorithm"));
        let url = |s: &str| JwksUrl::try_from(s.to_owned());
        assert!(url("http://127.0.0.1:9/.well-known/jwks.json").is_ok());
        assert!(url("https://auth.example.com/jwks").is_err());
        assert!(url("/jwks.json").is_err());
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::try_from("http://127.0.0.1:3000/shop/".to_owned()).unwrap();
        assert_eq!(u.authority.as_str(), "127.0.0.1:3000");
        assert_eq!(u.path_prefix, "/shop");
        assert!(UpstreamUrl::try_from("https://x".to_owned()).is_err());
        assert!(UpstreamUrl::try_from("127.0.0.1:3000".to_owned()).is_err());
    }
}
