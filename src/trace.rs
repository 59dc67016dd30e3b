//! W3C Trace Context (`traceparent`): a request keeps the trace it came with, or starts one,
//! and the backend gets flashgate's hop as the parent. The trace id goes into the access
//! log and into every JSON error body flashgate sends (`"trace_id"`), so a buyer's
//! complaint, a log line and the backend's own traces meet on one id.
//!
//! `traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; a header that is not
//! exactly that (version `00`, lowercase hex, ids not all zero) is replaced by a new trace,
//! as the spec asks. `tracestate` is passed on untouched.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// One request's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    trace_id: [u8; 16],
    /// flashgate's own span: the backend's parent.
    span_id: [u8; 8],
    flags: u8,
}

impl Trace {
    /// The trace `headers` carry (a new span in it), or a new trace.
    pub fn from_headers(headers: &HeaderMap) -> Trace {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let parsed = match (values.next(), values.next()) {
            (Some(v), None) => parse(v.as_bytes()),
            // Absent, or repeated (ambiguous): start afresh.
            _ => None,
        };
        let (trace_id, flags) = parsed.unwrap_or_else(|| (nonzero(rand::random()), 0));
        Trace {
            trace_id,
            span_id: nonzero(rand::random()),
            flags,
        }
    }

    /// A number from the trace id's right half (its random part, in W3C Trace Context level
    /// 2), for sampling decisions every instance makes alike.
    pub fn sample_key(&self) -> u64 {
        let mut low = [0u8; 8];
        low.copy_from_slice(&self.trace_id[8..]);
        u64::from_be_bytes(low)
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The `traceparent` the backend gets: this trace, flashgate's span as the parent.
    pub fn header(&self) -> HeaderValue {
        let value = format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        );
        // Hex digits and dashes only.
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id.iter().all(|&b| b == 0) {
        id[N - 1] = 1;
    }
    id
}

/// `(trace id, flags)` of a well-formed version-00 `traceparent`.
fn parse(v: &[u8]) -> Option<([u8; 16], u8)> {
    if v.len() != 55 || &v[..3] != b"00-" || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id: [u8; 16] = unhex(&v[3..35])?;
    let parent: [u8; 8] = unhex(&v[36..52])?;
    let [flags]: [u8; 1] = unhex(&v[53..55])?;
    if trace_id.iter().all(|&b| b == 0) || parent.iter().all(|&b| b == 0) {
        return None;
    }
    Some((trace_id, flags))
}

fn unhex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    let digit = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    if digits.len() != 2 * N {
        return None;
    }
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TRACEPARENT, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = Trace::from_headers(&headers(&[incoming]));
        assert_eq!(t.id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = t.header();
        let out = out.to_str().expect("ascii");
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(&out[36..52], "00f067aa0ba902b7", "flashgate's own span");
        assert_eq!(parse(out.as_bytes()).map(|p| p.1), Some(1));
    }

    #[test]
    fn anything_else_starts_a_new_trace() {
        for bad in [
            vec![],
            vec!["garbage"],
            vec!["00-00000000000000000000000000000000-00f067aa0ba902b7-01"],
            vec!["00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"],
            vec!["00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"],
            vec!["01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
            vec![
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ],
        ] {
            let t = Trace::from_headers(&headers(&bad));
            assert_ne!(t.id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
            assert_eq!(t.id().len(), 32);
            let out = t.header();
            assert!(parse(out.as_bytes()).is_some(), "{bad:?}: {out:?}");
            assert!(out.to_str().expect("ascii").ends_with("-00"));
        }
    }
}
