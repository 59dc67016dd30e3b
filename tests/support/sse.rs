//! A shopper's stock stream, read off a raw HTTP/1.1 connection the way a browser's
//! `EventSource` reads it: the head, then the chunked body decoded as it arrives, split into
//! server-sent events. Every read is bounded by the caller's deadline.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One event's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockEvent {
    pub sku: String,
    pub remaining: u64,
    pub state: String,
}

/// What the stream gave next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(StockEvent),
    /// A comment line (`: keep-alive`).
    Comment(String),
    /// The last chunk: the server ended the stream.
    End,
}

/// An open stream.
pub struct Sse {
    stream: TcpStream,
    /// The status and headers (names lower-cased).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Bytes read and not decoded yet.
    raw: Vec<u8>,
    /// Decoded body bytes not split into events yet.
    text: Vec<u8>,
    /// Whether the body is chunked (HTTP/1.1) or runs to the close (HTTP/1.0).
    chunked: bool,
    ended: bool,
}

impl Sse {
    /// Opens `path` on `addr` (`GET`, HTTP/1.1 unless `version` says `HTTP/1.0`) and reads the
    /// head. The answer's body, for a status other than 200, is in [`Sse::rest`].
    pub async fn open(addr: SocketAddr, path: &str, version: &str) -> Result<Sse, String> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request =
            format!("GET {path} {version}\r\nHost: shop\r\nAccept: text/event-stream\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut buf = [0u8; 4096];
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "closed before the head: {:?}",
                    String::from_utf8_lossy(&raw)
                ));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let rest = raw[end + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        Ok(Sse {
            stream,
            status,
            headers,
            raw: rest,
            text: Vec::new(),
            chunked,
            ended: false,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body of a non-streaming answer (read to `Content-Length`), as JSON.
    pub async fn json_body(&mut self) -> Value {
        let len: usize = self
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.raw.len() < len {
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
        serde_json::from_slice(&self.raw[..len.min(self.raw.len())])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.raw)))
    }

    /// The next item, or `Err` when the connection closed or `within` passed first.
    pub async fn next(&mut self, within: Duration) -> Result<Item, String> {
        tokio::time::timeout(within, self.next_item())
            .await
            .map_err(|_| format!("no event within {within:?}"))?
    }

    /// The next event, skipping comments; `Err` on the end of the stream.
    pub async fn next_event(&mut self, within: Duration) -> Result<StockEvent, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Item::Event(e) => return Ok(e),
                Item::Comment(_) => {}
                Item::End => return Err("the stream ended".into()),
            }
        }
    }

    /// Events until one satisfies `last` (included), all bounded by `within`.
    pub async fn events_until(
        &mut self,
        within: Duration,
        last: impl Fn(&StockEvent) -> bool,
    ) -> Result<Vec<StockEvent>, (String, Vec<StockEvent>)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok(e) => {
                    let done = last(&e);
                    seen.push(e);
                    if done {
                        return Ok(seen);
                    }
                }
                Err(why) => return Err((why, seen)),
            }
        }
    }

    async fn next_item(&mut self) -> Result<Item, String> {
        loop {
            if let Some(item) = self.split_event()? {
                return Ok(item);
            }
            if self.ended {
                return Ok(Item::End);
            }
            if self.decode() {
                continue;
            }
            let mut buf = [0u8; 4096];
            let n = self
                .stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                if !self.chunked {
                    self.ended = true;
                    continue;
                }
                return Err("closed mid-stream".into());
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// Moves whole chunks from `raw` to `text`; `true` if anything moved or the body ended.
    fn decode(&mut self) -> bool {
        if !self.chunked {
            let moved = !self.raw.is_empty();
            self.text.append(&mut self.raw);
            return moved;
        }
        let mut progressed = false;
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return progressed;
            };
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
            let Some(size) = size else {
                panic!(
                    "bad chunk size line: {:?}",
                    String::from_utf8_lossy(&self.raw)
                );
            };
            let need = line_end + 2 + size + 2;
            if size == 0 {
                if self.raw.len() < line_end + 4 {
                    return progressed;
                }
                self.raw.drain(..line_end + 4);
                self.ended = true;
                return true;
            }
            if self.raw.len() < need {
                return progressed;
            }
            assert_eq!(
                &self.raw[need - 2..need],
                b"\r\n",
                "chunk not ended by CRLF"
            );
            self.text
                .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..need);
            progressed = true;
        }
    }

    /// One event block (up to a blank line) from `text`.
    fn split_event(&mut self) -> Result<Option<Item>, String> {
        let Some(end) = self.text.windows(2).position(|w| w == b"\n\n") else {
            return Ok(None);
        };
        let block = String::from_utf8(self.text[..end].to_vec()).map_err(|e| e.to_string())?;
        self.text.drain(..end + 2);
        if let Some(comment) = block.strip_prefix(':') {
            return Ok(Some(Item::Comment(comment.trim().to_owned())));
        }
        let data: String = block
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .collect();
        let v: Value = serde_json::from_str(&data).map_err(|e| format!("{e}: {block:?}"))?;
        let event = StockEvent {
            sku: v["sku"].as_str().ok_or("no sku")?.to_owned(),
            remaining: v["remaining"].as_u64().ok_or("no remaining")?,
            state: v["state"].as_str().ok_or("no state")?.to_owned(),
        };
        Ok(Some(Item::Event(event)))
    }
}
