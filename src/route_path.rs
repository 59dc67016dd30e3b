//! The path a route is matched against. Backends commonly treat `/buy/`, `/buy`, `//buy`,
//! `/a/../buy` and `/%62uy` as the same resource; if flashgate matched only the raw bytes, such a
//! variant of a flash-sale path would miss the sale route, fall through to a pass-through route
//! and reach the backend with no reservation. So routes are matched on a normalized path, while
//! the backend still receives the path exactly as the client sent it.

use std::borrow::Cow;

/// Decodes percent-encoded unreserved characters (RFC 3986 §2.3), collapses repeated slashes,
/// resolves `.` and `..` segments and drops a trailing slash. Returns the input untouched when
/// there is nothing to do (the common case costs no allocation).
pub fn normalize(path: &str) -> Cow<'_, str> {
    let clean = !path.contains('%')
        && !path.contains("//")
        && !path.contains("/.")
        && (path.len() <= 1 || !path.ends_with('/'));
    if clean {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = (h << 4) | l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(c));
                i += 3;
                continue;
            }
        }
        // Anything else stays as written (including `%2F`, which is not a separator).
        let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    out
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

    #[test]
    fn variants_of_one_path_normalize_alike() {
        for p in [
            "/api/flash/x/buy",
            "/api/flash/x/buy/",
            "//api/flash//x/buy",
            "/api/flash/x/./buy",
            "/api/flash/y/../x/buy",
            "/api/flash/x/%62uy",
            "/api/fl%61sh/x/buy",
        ] {
            assert_eq!(normalize(p), "/api/flash/x/buy", "{p}");
        }
    }

    #[test]
    fn clean_paths_are_borrowed_and_reserved_escapes_kept() {
        assert!(matches!(normalize("/a/b"), Cow::Borrowed(_)));
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/.."), "/");
        assert_eq!(normalize("/a%2Fb"), "/a%2Fb");
        assert_eq!(normalize("/a%"), "/a%");
        assert_eq!(normalize("/caf%C3%A9/"), "/caf%C3%A9");
        assert_eq!(normalize("/ü/"), "/ü");
    }
}
