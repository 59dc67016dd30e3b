//! Request-line repair: what real clients send unencoded, made parseable before hyper reads it.
//!
//! curl, scripts and some SDKs send `GET /search?filter={"a":1}` or `/files/<name>` as typed.
//! nginx and gunicorn accept them; hyper (through the `http` crate's URI rules) answers such a
//! request with an empty-bodied 400 and closes the connection. So the bytes of each HTTP/1
//! request line pass through [`RequestLine`] as they are read: inside the request target, the
//! bytes the URI parser refuses are percent-encoded (`"` → `%22`, `<` → `%3C`, a UTF-8 byte →
//! `%E2`…) — the form a browser sends, which every backend decodes to the same characters. The
//! path canonicalization rules (`canonical.rs`) then apply as to any request; an encoded
//! control character, for one, is still refused.
//!
//! The same pass measures the target: past `server.max_uri_bytes` the rest of it is dropped
//! and the request is marked, so flashgate answers 414 (hyper would read the whole line into
//! its header buffer and answer 431, or nothing useful).
//!
//! Only the request line is touched, never headers or bodies, and only on a connection that is
//! speaking HTTP/1 heads: the repair stops for good on anything that does not start like a
//! request line (an h2 preface is passed through, an upgraded connection is switched off by
//! the server).

/// Longest method looked at; anything longer is left to hyper.
const MAX_METHOD: usize = 32;

#[derive(Debug, Default)]
pub struct RequestLine {
    state: State,
    /// Bytes of the target emitted so far (after encoding).
    target_len: usize,
    in_query: bool,
    too_long: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the method (empty lines before a request line are allowed).
    #[default]
    Leading,
    Method(usize),
    Target,
    /// After the target, up to the end of the line.
    Version,
    /// The line is done: nothing more until [`RequestLine::next_request`].
    Done,
    /// Not an HTTP/1 head (or switched off): nothing is touched again.
    Off,
}

/// What happens to one byte.
enum Emit {
    Same,
    Encode,
    Drop,
}

impl RequestLine {
    /// Passes the next bytes read from the client. `None`: forward them unchanged (the common
    /// case, without a copy); `Some`: forward these bytes instead.
    pub fn repair(&mut self, bytes: &[u8], max_target: usize) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for (i, &b) in bytes.iter().enumerate() {
            if matches!(self.state, State::Done | State::Off) {
                let mut out = out?;
                out.extend_from_slice(&bytes[i..]);
                return Some(out);
            }
            match self.step(b, max_target) {
                Emit::Same => {
                    if let Some(out) = out.as_mut() {
                        out.push(b);
                    }
                }
                Emit::Encode => {
                    let out = out.get_or_insert_with(|| copy_of(&bytes[..i], bytes.len()));
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.extend_from_slice(&[
                        b'%',
                        HEX[usize::from(b >> 4)],
                        HEX[usize::from(b & 15)],
                    ]);
                }
                Emit::Drop => {
                    out.get_or_insert_with(|| copy_of(&bytes[..i], bytes.len()));
                }
            }
        }
        out
    }

    /// The request line was longer than `max_target` allowed (its target was cut short).
    pub fn too_long(&self) -> bool {
        self.too_long
    }

    /// A request head was parsed: the next bytes in head position start a new request line.
    pub fn next_request(&mut self) {
        if self.state != State::Off {
            *self = RequestLine::default();
        }
    }

    /// Stops the repair for the rest of the connection (an upgrade may take it over).
    pub fn switch_off(&mut self) {
        self.state = State::Off;
    }

    fn step(&mut self, b: u8, max_target: usize) -> Emit {
        match self.state {
            State::Leading => {
                if b.is_ascii_alphabetic() {
                    self.state = State::Method(1);
                } else if b != b'\r' && b != b'\n' {
                    self.state = State::Off;
                }
                Emit::Same
            }
            State::Method(n) => {
                if b == b' ' {
                    self.state = State::Target;
                } else if n >= MAX_METHOD || !is_tchar(b) {
                    self.state = State::Off;
                } else {
                    self.state = State::Method(n + 1);
                }
                Emit::Same
            }
            State::Target => {
                if b == b' ' {
                    self.state = State::Version;
                    return Emit::Same;
                }
                if b == b'\r' || b == b'\n' {
                    // No version: not a request line we know; hyper decides.
                    self.state = State::Done;
                    return Emit::Same;
                }
                let encode = refused_by_uri_parser(b, self.in_query);
                let len = if encode { 3 } else { 1 };
                if self.too_long || self.target_len + len > max_target {
                    self.too_long = true;
                    return Emit::Drop;
                }
                self.target_len += len;
                if b == b'?' {
                    self.in_query = true;
                }
                if encode { Emit::Encode } else { Emit::Same }
            }
            State::Version => {
                if b == b'\n' {
                    self.state = State::Done;
                }
                Emit::Same
            }
            State::Done | State::Off => Emit::Same,
        }
    }
}

fn copy_of(prefix: &[u8], capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(capacity + 32);
    v.extend_from_slice(prefix);
    v
}

/// RFC 9110 token characters (a method is a token).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The bytes the `http` crate refuses in a request target (its path and query tables), which
/// clients nonetheless send: everything else passes as sent.
fn refused_by_uri_parser(b: u8, in_query: bool) -> bool {
    if !(0x20..0x7F).contains(&b) {
        return true;
    }
    if in_query {
        matches!(b, b'"' | b'<' | b'>')
    } else {
        matches!(b, b'<' | b'>' | b'`')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repaired(chunks: &[&[u8]], max: usize) -> (Vec<u8>, bool) {
        let mut line = RequestLine::default();
        let mut out = Vec::new();
        for c in chunks {
            match line.repair(c, max) {
                Some(v) => out.extend_from_slice(&v),
                None => out.extend_from_slice(c),
            }
        }
        (out, line.too_long())
    }

    fn one(head: &str) -> String {
        String::from_utf8(repaired(&[head.as_bytes()], 8192).0).unwrap()
    }

    #[test]
    fn what_clients_send_unencoded_is_encoded_in_the_target_only() {
        for (sent, fixed) in [
            (
                "GET /get?filter={\"a\":1} HTTP/1.1\r\nX-J: {\"a\":<1>}\r\n\r\n",
                "GET /get?filter={%22a%22:1} HTTP/1.1\r\nX-J: {\"a\":<1>}\r\n\r\n",
            ),
            (
                "GET /a<b>?q=<x> HTTP/1.1\r\n",
                "GET /a%3Cb%3E?q=%3Cx%3E HTTP/1.1\r\n",
            ),
            (
                "GET /a`b?q=`x` HTTP/1.1\r\n",
                "GET /a%60b?q=`x` HTTP/1.1\r\n",
            ),
            ("GET /caf\u{e9} HTTP/1.1\r\n", "GET /caf%C3%A9 HTTP/1.1\r\n"),
            (
                "GET /a\"{|}^\\b HTTP/1.1\r\n",
                "GET /a\"{|}^\\b HTTP/1.1\r\n",
            ),
            ("\r\nGET /<> HTTP/1.1\r\n", "\r\nGET /%3C%3E HTTP/1.1\r\n"),
        ] {
            assert_eq!(one(sent), fixed, "{sent:?}");
        }
    }

    #[test]
    fn a_clean_line_is_passed_without_a_copy() {
        let mut line = RequestLine::default();
        assert!(
            line.repair(b"GET /a/b?c=d HTTP/1.1\r\nHost: x\r\n\r\n", 8192)
                .is_none()
        );
    }

    #[test]
    fn split_reads_give_the_same_result() {
        let head = "POST /x?q=\"<\u{e9}>\" HTTP/1.1\r\nHost: a<b\r\n\r\n";
        let whole = one(head);
        let bytes: Vec<&[u8]> = head.as_bytes().chunks(1).collect();
        assert_eq!(String::from_utf8(repaired(&bytes, 8192).0).unwrap(), whole);
        let (a, b) = head.as_bytes().split_at(9);
        assert_eq!(String::from_utf8(repaired(&[a, b], 8192).0).unwrap(), whole);
    }

    #[test]
    fn a_target_over_the_limit_is_cut_and_marked() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(100));
        let (out, too_long) = repaired(&[long.as_bytes()], 20);
        assert!(too_long);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(19))
        );
        let (_, too_long) = repaired(&[b"GET /aaaa HTTP/1.1\r\n"], 5);
        assert!(!too_long, "exactly the limit");
        let (_, too_long) = repaired(&[b"GET /aa<> HTTP/1.1\r\n"], 5);
        assert!(too_long, "the limit counts encoded bytes");
    }

    #[test]
    fn anything_but_an_http1_request_line_is_left_alone() {
        for bytes in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00<>"[..],
            &b"\x81\x85<<>>"[..],
            &b"\x00\x00\x12\x04<"[..],
        ] {
            let mut line = RequestLine::default();
            let first = line.repair(bytes, 8192);
            line.next_request();
            let second = line.repair(b"<x> <y>", 8192);
            assert!(first.is_none() && second.is_none(), "{bytes:?}");
        }
        let mut line = RequestLine::default();
        line.switch_off();
        line.next_request();
        assert!(line.repair(b"GET /<> HTTP/1.1\r\n", 8192).is_none());
    }

    #[test]
    fn the_next_request_on_the_connection_is_repaired_too() {
        let mut line = RequestLine::default();
        assert!(line.repair(b"GET /a HTTP/1.1\r\n\r\n", 8192).is_none());
        assert!(
            line.repair(b"GET /<b> HTTP/1.1\r\n", 8192).is_none(),
            "done"
        );
        line.next_request();
        assert_eq!(
            line.repair(b"GET /<b> HTTP/1.1\r\n", 8192).unwrap(),
            b"GET /%3Cb%3E HTTP/1.1\r\n"
        );
    }
}
