//! One canonical request path: the path flashgate matches routes on is the path the backend
//! receives (the rule Envoy and Istio apply).
//!
//! Backends read the same bytes in different ways: Go's `net/http` decodes `%2F` into a
//! separator, servlet containers drop `;params` and resolve `..;`, some routers ignore case.
//! If flashgate matched one reading and forwarded bytes the backend reads another way, a buy
//! could reach the backend without a reservation. So:
//!
//! 1. [`canonicalize`] decodes percent-escapes of unreserved characters (RFC 3986 §2.3),
//!    resolves `.` and `..` segments and merges repeated slashes. The result is both matched
//!    and forwarded. A trailing slash is kept in the forwarded form (a directory URL stays
//!    one); routes are matched without it ([`match_form`]).
//! 2. Spellings whose meaning depends on the backend are refused ([`Ambiguity`]): an encoded
//!    `/` or `\`, a raw `\`, an encoded control character (`%00`…`%1F`, `%7F`), a `;`
//!    parameter in a segment, a `%` not followed by two hex digits. [`PathPolicy`] may allow
//!    the first three where a backend needs them.
//! 3. [`fold`] is the most lenient reading any common framework applies (case, `;params`,
//!    trailing dots/spaces/NULs, every escape decoded, `\` as `/`): the fence in `gate.rs`
//!    refuses a request whose folded path lands on a sale route it did not match exactly.

use std::borrow::Cow;

/// Which ambiguous spellings are let through (each forwarded as written). Every one is a way
/// for a backend to read a different path than flashgate matched; the fence still refuses
/// any of them that folds onto a sale route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathPolicy {
    /// `%2F` and `%5C` inside a segment.
    pub allow_encoded_slash: bool,
    /// A raw `\` (some servers read it as `/`).
    pub allow_backslash: bool,
    /// `;` in a segment (servlet containers strip `;params`).
    pub allow_semicolon: bool,
}

/// Why a path was refused. The message is the client's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    EncodedSlash,
    Backslash,
    EncodedControl,
    Semicolon,
    BadEscape,
}

impl Ambiguity {
    pub fn message(self) -> &'static str {
        match self {
            Ambiguity::EncodedSlash => {
                "the path contains an encoded `/` or `\\` (%2F, %5C), which backends read differently"
            }
            Ambiguity::Backslash => "the path contains `\\`, which some backends read as `/`",
            Ambiguity::EncodedControl => "the path contains an encoded control character",
            Ambiguity::Semicolon => "the path contains a `;` parameter, which some backends strip",
            Ambiguity::BadEscape => "the path contains a `%` not followed by two hex digits",
        }
    }
}

/// The canonical form of `path`, or why it is refused. Returns the input untouched when there
/// is nothing to do (the common case costs no allocation).
pub fn canonicalize<'a>(path: &'a str, policy: &PathPolicy) -> Result<Cow<'a, str>, Ambiguity> {
    let b = path.as_bytes();
    let mut needs_work = false;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => needs_work = true,
            b'\\' if !policy.allow_backslash => return Err(Ambiguity::Backslash),
            b';' if !policy.allow_semicolon => return Err(Ambiguity::Semicolon),
            b'/' if matches!(b.get(i + 1), Some(b'/' | b'.')) => needs_work = true,
            _ => {}
        }
    }
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path, policy)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// The form routes are matched on: the canonical path without its trailing slash.
pub fn match_form(canonical: &str) -> &str {
    match canonical.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => canonical,
    }
}

/// Decodes unreserved escapes; checks every other escape.
fn decode_unreserved(path: &str, policy: &PathPolicy) -> Result<String, Ambiguity> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&path[i..i + ch_len]);
            i += ch_len;
            continue;
        }
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Ambiguity::BadEscape);
        };
        let c = (h << 4) | l;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(c));
        } else {
            match c {
                b'/' | b'\\' if !policy.allow_encoded_slash => {
                    return Err(Ambiguity::EncodedSlash);
                }
                0x00..=0x1f | 0x7f => return Err(Ambiguity::EncodedControl),
                _ => {}
            }
            // Kept as written: a reserved or non-ASCII byte stays encoded.
            out.push_str(&path[i..i + 3]);
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4, plus merged slashes: `//a/./b/../c/` → `/a/c/`. `..` above the root
/// stays at the root.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path.split('/') {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    join(&segments, trailing)
}

fn join(segments: &[impl AsRef<str>], trailing: bool) -> String {
    let mut out = String::with_capacity(segments.iter().map(|s| s.as_ref().len() + 1).sum());
    for s in segments {
        out.push('/');
        out.push_str(s.as_ref());
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// Whether [`fold`] would return [`match_form`] of `canonical` unchanged: nothing to decode,
/// no upper case, no `;` or `\`, no segment ending in a dot or space. Lets the fence skip the
/// allocation for ordinary paths.
pub fn folds_to_itself(canonical: &str) -> bool {
    let b = canonical.as_bytes();
    b.iter().enumerate().all(|(i, &c)| {
        !(c == b'%' || c == b';' || c == b'\\' || c.is_ascii_uppercase() || c >= 0x80)
            && !(c == b'.' && matches!(b.get(i + 1), None | Some(b'/')))
    })
}

/// The most lenient reading a common framework gives `canonical`: every escape decoded,
/// `\` read as `/`, each segment cut at `;` and trimmed of surrounding whitespace, control
/// characters and trailing dots, dot segments resolved after that (so `..;` climbs), lower
/// case, no trailing slash — and all of that again until nothing changes, for servers that
/// decode twice (`%2562` → `%62` → `b`). Only ever compared with sale-route templates
/// folded alike.
pub fn fold(canonical: &str) -> String {
    /// Rounds until a fixed point; each round decodes at least one level of escapes.
    const MAX_ROUNDS: usize = 8;
    let mut folded = fold_once(canonical);
    for _ in 0..MAX_ROUNDS {
        let again = fold_once(&folded);
        if again == folded {
            break;
        }
        folded = again;
    }
    folded
}

fn fold_once(canonical: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(canonical).decode_utf8_lossy();
    // Upper then lower case: `ſ` (long s) and `K` (Kelvin) fold to `s` and `k`, as .NET's
    // invariant upper-casing and Go's EqualFold do.
    let lowered: String = decoded
        .chars()
        .map(|c| if c == '\\' { '/' } else { c })
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect();
    let mut segments: Vec<&str> = Vec::new();
    for seg in lowered.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        let seg = seg.trim_matches(|c: char| c.is_whitespace() || c.is_control());
        // `..` climbs even when written `..;x` or `.. ` (cut and trimmed just above).
        if seg == ".." {
            segments.pop();
            continue;
        }
        let seg = seg.trim_end_matches(|c: char| c == '.' || c.is_whitespace() || c.is_control());
        if !seg.is_empty() {
            segments.push(seg);
        }
    }
    join(&segments, false)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: PathPolicy = PathPolicy {
        allow_encoded_slash: false,
        allow_backslash: false,
        allow_semicolon: false,
    };

    /// Every input form and its verdict: the canonical path, or the refusal.
    const CANONICAL: &[(&str, Result<&str, Ambiguity>)] = &[
        ("/api/flash/x/buy", Ok("/api/flash/x/buy")),
        ("/api/flash/x/buy/", Ok("/api/flash/x/buy/")),
        ("//api/flash//x/buy", Ok("/api/flash/x/buy")),
        ("/api/flash/x/./buy", Ok("/api/flash/x/buy")),
        ("/api/flash/y/../x/buy", Ok("/api/flash/x/buy")),
        ("/api/flash/x/%62uy", Ok("/api/flash/x/buy")),
        ("/api/fl%61sh/x/buy", Ok("/api/flash/x/buy")),
        ("/api/flash/x/%2e%2e/x/buy", Ok("/api/flash/x/buy")),
        ("/api/flash/x/%2E/buy", Ok("/api/flash/x/buy")),
        ("/a/b/..", Ok("/a/")),
        ("/a/.", Ok("/a/")),
        ("/", Ok("/")),
        ("/..", Ok("/")),
        ("/../../a", Ok("/a")),
        ("/caf%C3%A9/", Ok("/caf%C3%A9/")),
        ("/q%20x", Ok("/q%20x")),
        ("/a%25b", Ok("/a%25b")),
        ("/ü/", Ok("/ü/")),
        ("/api/flash/tee%2fbuy", Err(Ambiguity::EncodedSlash)),
        ("/api/flash/tee%2Fbuy", Err(Ambiguity::EncodedSlash)),
        ("/api/flash/tee%5cbuy", Err(Ambiguity::EncodedSlash)),
        ("/api/flash/tee\\buy", Err(Ambiguity::Backslash)),
        ("/api/flash/tee/buy%00", Err(Ambiguity::EncodedControl)),
        ("/api/flash/tee/buy%0a", Err(Ambiguity::EncodedControl)),
        ("/api/flash/tee/buy%09", Err(Ambiguity::EncodedControl)),
        ("/api/flash/tee/buy%7F", Err(Ambiguity::EncodedControl)),
        ("/api/flash/tee/buy;x=1", Err(Ambiguity::Semicolon)),
        ("/zz/..;/api/flash/tee/buy", Err(Ambiguity::Semicolon)),
        ("/a%", Err(Ambiguity::BadEscape)),
        ("/a%4", Err(Ambiguity::BadEscape)),
        ("/a%zz", Err(Ambiguity::BadEscape)),
    ];

    #[test]
    fn canonical_forms_and_refusals() {
        for (input, want) in CANONICAL {
            let got = canonicalize(input, &STRICT);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{input}");
        }
    }

    #[test]
    fn clean_paths_are_borrowed() {
        assert!(matches!(
            canonicalize("/a/b", &STRICT),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(
            canonicalize("/a/b/", &STRICT),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn allowed_spellings_pass_as_written() {
        let lax = PathPolicy {
            allow_encoded_slash: true,
            allow_backslash: true,
            allow_semicolon: true,
        };
        assert_eq!(canonicalize("/a%2Fb", &lax).unwrap(), "/a%2Fb");
        assert_eq!(canonicalize("/a\\b", &lax).unwrap(), "/a\\b");
        assert_eq!(canonicalize("/a;v=1/b", &lax).unwrap(), "/a;v=1/b");
        // Encoded controls are never allowed.
        assert_eq!(canonicalize("/a%00", &lax), Err(Ambiguity::EncodedControl));
    }

    #[test]
    fn match_form_drops_one_trailing_slash() {
        assert_eq!(match_form("/a/"), "/a");
        assert_eq!(match_form("/a"), "/a");
        assert_eq!(match_form("/"), "/");
    }

    /// What a lenient framework reads: every spelling here lands on `/api/flash/tee/buy`.
    #[test]
    fn folded_spellings() {
        for p in [
            "/API/flash/tee/buy",
            "/api/flash/tee/BUY",
            "/api/flash/tee/buy;x=1",
            "/api/flash;a/tee/buy",
            "/zz/..;/api/flash/tee/buy",
            "/api/flash/tee/buy.",
            "/api/flash/tee/buy%20",
            "/api/flash/tee/buy%00",
            "/api/flash/tee%2fbuy",
            "/api/flash/tee%5Cbuy",
            "/api/flash/tee\\buy",
            "/api/flash/tee/buy/",
            "/api/fla%C5%BFh/tee/buy",
        ] {
            assert_eq!(fold(p), "/api/flash/tee/buy", "{p}");
        }
    }

    #[test]
    fn folds_to_itself_only_when_fold_is_a_no_op() {
        for p in ["/a/b", "/", "/a.b/c", "/static/app.js"] {
            assert!(folds_to_itself(p), "{p}");
            assert_eq!(fold(p), match_form(p), "{p}");
        }
        for p in ["/A", "/a.", "/a./b", "/a%20", "/a;b", "/a\\b", "/ü"] {
            assert!(!folds_to_itself(p), "{p}");
        }
    }
}
