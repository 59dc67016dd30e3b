//! Request smuggling guard. A request head that declares both `Content-Length` and
//! `Transfer-Encoding` has two framings; front and back ends that pick different ones disagree
//! on where the request ends, and a second, hidden request slips through. hyper serves such a
//! request by its chunked framing and drops `Content-Length` before flashgate sees the request,
//! so the gate cannot tell. This scanner looks at the raw head bytes as they are read from the
//! client and remembers whether the head declared both, so the gate can refuse it with 400.

const TE: &[u8] = b"transfer-encoding";

/// Most headers parsed per head; a head with more is left to hyper's own limits.
const MAX_HEADERS: usize = 128;

#[derive(Default)]
pub struct HeadScan {
    buf: Vec<u8>,
    state: State,
    /// Bytes read past the end of the head (at most `cap`): a body, or a pipelined request
    /// whose head [`HeadScan::take`] scans next once the body's length is known.
    past: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Scanning,
    Done {
        two_framings: bool,
        /// Bytes fed after the end of the head; `None` if the end was never found.
        past_head: Option<u64>,
    },
    /// An HTTP/2 connection: frames, not text heads.
    Off,
}

/// What [`HeadScan::take`] learned about the head just parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// The head declared both `Content-Length` and `Transfer-Encoding`.
    pub two_framings: bool,
    /// How many bytes were read past the end of the head (the start of a body, or of a
    /// pipelined request), when the end was found; `None` when it is not known.
    pub past_head: Option<u64>,
}

impl HeadScan {
    /// Feeds bytes read while no request is in flight (the next request's head). Stops at the
    /// end of the head, or after `cap` bytes (hyper answers 431 past its own limit).
    pub fn feed(&mut self, bytes: &[u8], cap: usize) {
        match &mut self.state {
            State::Scanning => {}
            State::Done {
                past_head: Some(past),
                ..
            } => {
                *past = past.saturating_add(bytes.len() as u64);
                keep_past(&mut self.past, bytes, cap);
                return;
            }
            State::Done { .. } | State::Off => return,
        }
        // The usual case: the whole head arrives in one read. Scan it in place, no copy.
        if self.buf.is_empty()
            && !bytes.starts_with(b"PRI * HTTP/2.0")
            && let Some(end) = find(&bytes[..bytes.len().min(cap)], b"\r\n\r\n")
        {
            self.state = State::Done {
                two_framings: two_framings(&bytes[..end + 4]),
                past_head: Some((bytes.len() - (end + 4)) as u64),
            };
            keep_past(&mut self.past, &bytes[end + 4..], cap);
            return;
        }
        let room = cap.saturating_sub(self.buf.len());
        // Search only what is new (plus 3 bytes of overlap): a head trickled byte by byte
        // must not cost a rescan of the whole buffer per byte.
        let from = self.buf.len().saturating_sub(3);
        let kept = bytes.len().min(room);
        self.buf.extend_from_slice(&bytes[..kept]);
        if self.buf.starts_with(b"PRI * HTTP/2.0") {
            self.state = State::Off;
            self.buf = Vec::new();
            return;
        }
        let Some(end) = find(&self.buf[from..], b"\r\n\r\n").map(|i| from + i) else {
            if self.buf.len() >= cap {
                self.state = State::Done {
                    two_framings: false,
                    past_head: None,
                };
                self.buf = Vec::new();
            }
            return;
        };
        let past_head = (self.buf.len() - (end + 4)) + (bytes.len() - kept);
        self.state = State::Done {
            two_framings: two_framings(&self.buf[..end + 4]),
            past_head: Some(past_head as u64),
        };
        keep_past(&mut self.past, &self.buf[end + 4..], cap);
        keep_past(&mut self.past, &bytes[kept..], cap);
        // Only the verdict is kept: an upgraded (WebSocket) connection, which never starts
        // another request, must not hold on to the head.
        self.buf = Vec::new();
    }

    /// What the head just parsed declared; resets for the next request. With the body's
    /// exact length known, the bytes already read past that body (a pipelined request) are
    /// scanned as the next head.
    pub fn take(&mut self, body_len: Option<u64>, cap: usize) -> Scanned {
        let scanned = match self.state {
            State::Done {
                two_framings,
                past_head,
            } => Scanned {
                two_framings,
                past_head,
            },
            State::Scanning | State::Off => Scanned {
                two_framings: false,
                past_head: None,
            },
        };
        if self.state != State::Off {
            self.state = State::Scanning;
            self.buf = Vec::new();
            let past = std::mem::take(&mut self.past);
            let next = body_len
                .and_then(|len| usize::try_from(len).ok())
                .and_then(|len| past.get(len..))
                .filter(|next| !next.is_empty());
            if let Some(next) = next {
                self.feed(next, cap);
            }
        }
        scanned
    }
}

/// Keeps bytes read past a head, up to `cap` in all.
fn keep_past(past: &mut Vec<u8>, bytes: &[u8], cap: usize) {
    let room = cap.saturating_sub(past.len());
    past.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn two_framings(head: &[u8]) -> bool {
    // Any header named Transfer-Encoding spells it out (in some case): without it there is
    // nothing to parse, and that spares the common head a second parse.
    if !head.windows(TE.len()).any(|w| w.eq_ignore_ascii_case(TE)) {
        return false;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    has("content-length") && has("transfer-encoding")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut s = HeadScan::default();
        for c in chunks {
            s.feed(c, 16 * 1024);
        }
        s.take(None, 16 * 1024).two_framings
    }

    #[test]
    fn both_framings_are_seen_even_split_across_reads() {
        let head = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(scan(&[head]));
        let (a, b) = head.split_at(40);
        assert!(scan(&[a, b]));
        assert!(scan(&[
            b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
        ]));
    }

    #[test]
    fn one_framing_or_h2_is_fine() {
        assert!(!scan(&[
            b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        ]));
        assert!(!scan(&[
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ]));
        assert!(!scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]));
        assert!(
            !scan(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]),
            "incomplete head"
        );
    }

    #[test]
    fn a_head_trickled_byte_by_byte_is_still_seen() {
        let head = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytes));
    }

    #[test]
    fn take_resets_for_the_next_request() {
        let mut s = HeadScan::default();
        s.feed(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            8192,
        );
        assert!(s.take(None, 16 * 1024).two_framings);
        s.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 8192);
        assert!(!s.take(None, 16 * 1024).two_framings);
    }

    #[test]
    fn a_pipelined_head_past_a_known_body_is_scanned_next() {
        let first = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let second =
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let both = [&first[..], &second[..]].concat();
        for chunks in [vec![&both[..]], both.chunks(7).collect::<Vec<_>>()] {
            let mut s = HeadScan::default();
            for c in &chunks {
                s.feed(c, 8192);
            }
            assert!(!s.take(Some(5), 8192).two_framings, "the first is fine");
            assert!(
                s.take(Some(0), 8192).two_framings,
                "the pipelined one is not"
            );
        }
        // Without a known body length nothing is guessed.
        let mut s = HeadScan::default();
        s.feed(&both, 8192);
        assert!(!s.take(None, 8192).two_framings);
        assert!(!s.take(Some(0), 8192).two_framings);
    }

    #[test]
    fn counts_the_bytes_read_past_the_head() {
        let past = |chunks: &[&[u8]], cap: usize| {
            let mut s = HeadScan::default();
            for c in chunks {
                s.feed(c, cap);
            }
            s.take(None, 8192).past_head
        };
        assert_eq!(past(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], 8192), Some(0));
        assert_eq!(
            past(
                &[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel", b"lo"],
                8192
            ),
            Some(5)
        );
        // Past the cap the bytes are not kept, but still counted.
        assert_eq!(past(&[b"GET / HTTP/1.1\r\n\r\nGET /next"], 20), Some(9));
        assert_eq!(past(&[b"GET / HTTP/1.1\r\nHost: a\r\n"], 8192), None);
        // A head ended by bare line feeds is not recognised: unknown, never a guess.
        assert_eq!(past(&[b"GET / HTTP/1.1\nHost: a\n\n"], 8192), None);
        assert_eq!(past(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], 8192), None);
    }
}
