//! Who may call the admin API, and how hard it is to guess.
//!
//! - Two bearer tokens: the write token (`admin.token_env`) may do everything; the optional
//!   read-only token (`admin.read_token_env`) may read stock and status but change nothing.
//!   Both are compared in constant time (`subtle`), so response timing leaks no prefix.
//! - On an address other than loopback, a token shorter than [`MIN_TOKEN_BYTES`] is refused at
//!   start: a short token on a reachable port is a guessable one.
//! - Failed attempts are counted per client IP: past [`MAX_FAILURES`] in [`FAILURE_WINDOW`],
//!   that IP gets `429` until the window ends, whatever token it sends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;
use subtle::ConstantTimeEq;

/// Shortest token accepted on a non-loopback listener.
pub const MIN_TOKEN_BYTES: usize = 32;
/// Failed attempts one IP may make per [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// IPs remembered at once (an admin API sees few clients; a flood of addresses is bounded).
const MAX_TRACKED: usize = 10_000;

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Write,
    Read,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Write => "write",
            Access::Read => "read",
        }
    }
}

/// The admin tokens.
#[derive(Clone)]
pub struct Tokens {
    write: String,
    read: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("read_only", &self.read.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub fn new(write: String, read: Option<String>) -> Tokens {
        Tokens { write, read }
    }

    /// The access an `Authorization: Bearer …` value grants, if any.
    pub fn access(&self, authorization: Option<&HeaderValue>) -> Option<Access> {
        let presented = authorization?.as_bytes().strip_prefix(b"Bearer ")?;
        // Both compared every time: which one matched does not show in the timing either.
        let write = bool::from(presented.ct_eq(self.write.as_bytes()));
        let read = self
            .read
            .as_ref()
            .is_some_and(|r| bool::from(presented.ct_eq(r.as_bytes())));
        if write {
            Some(Access::Write)
        } else if read {
            Some(Access::Read)
        } else {
            None
        }
    }

    /// Refuses tokens too short for `listen`, and a read token equal to the write token.
    pub fn check_for(&self, listen: SocketAddr) -> Result<(), String> {
        if self.read.as_deref() == Some(self.write.as_str()) {
            return Err("the read-only token must differ from the write token".into());
        }
        if listen.ip().is_loopback() {
            return Ok(());
        }
        let short = std::iter::once(("token_env", &self.write))
            .chain(self.read.iter().map(|r| ("read_token_env", r)))
            .find(|(_, t)| t.len() < MIN_TOKEN_BYTES);
        match short {
            Some((which, t)) => Err(format!(
                "admin.{which}: the token is {} bytes; on a non-loopback address ({listen}) it \
                 must be at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
                t.len()
            )),
            None => Ok(()),
        }
    }
}

/// Failed attempts per client IP.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Throttle {
    /// How long `ip` must wait before it may try again, if it is over the limit.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (count, since) = failures.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(now.duration_since(*since))?;
        (*count >= MAX_FAILURES && !left.is_zero()).then_some(left)
    }

    /// Counts a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
        }
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&ip) {
            return;
        }
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_WINDOW {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {t}")).unwrap()
    }

    #[test]
    fn each_token_grants_its_access() {
        let tokens = Tokens::new("w".repeat(32), Some("r".repeat(32)));
        assert_eq!(
            tokens.access(Some(&bearer(&"w".repeat(32)))),
            Some(Access::Write)
        );
        assert_eq!(
            tokens.access(Some(&bearer(&"r".repeat(32)))),
            Some(Access::Read)
        );
        for wrong in [
            bearer(&"w".repeat(31)),
            bearer(&"w".repeat(33)),
            bearer(""),
            HeaderValue::from_str(&"w".repeat(32)).unwrap(),
            HeaderValue::from_str(&format!("bearer {}", "w".repeat(32))).unwrap(),
        ] {
            assert_eq!(tokens.access(Some(&wrong)), None, "{wrong:?}");
        }
        assert_eq!(tokens.access(None), None);
        let no_read = Tokens::new("w".repeat(32), None);
        assert_eq!(no_read.access(Some(&bearer(""))), None);
    }

    #[test]
    fn short_tokens_only_on_loopback() {
        let short = Tokens::new("short".into(), None);
        assert!(short.check_for("127.0.0.1:9090".parse().unwrap()).is_ok());
        assert!(short.check_for("[::1]:9090".parse().unwrap()).is_ok());
        let e = short
            .check_for("0.0.0.0:9090".parse().unwrap())
            .unwrap_err();
        assert!(
            e.contains("admin.token_env") && e.contains("5 bytes"),
            "{e}"
        );
        let short_read = Tokens::new("w".repeat(32), Some("r".into()));
        let e = short_read
            .check_for("10.0.0.1:9090".parse().unwrap())
            .unwrap_err();
        assert!(e.contains("admin.read_token_env"), "{e}");
        assert!(
            Tokens::new("w".repeat(32), Some("w".repeat(32)))
                .check_for("127.0.0.1:1".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn failures_are_throttled_per_ip_for_a_window() {
        let t = Throttle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let start = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(t.blocked(a, start).is_none());
            t.failed(a, start);
        }
        assert!(t.blocked(a, start).is_some());
        assert!(t.blocked(b, start).is_none(), "another IP is not affected");
        assert!(
            t.blocked(a, start + FAILURE_WINDOW).is_none(),
            "the window ends"
        );
        t.failed(a, start + FAILURE_WINDOW);
        assert!(
            t.blocked(a, start + FAILURE_WINDOW).is_none(),
            "counting starts over"
        );
    }
}
