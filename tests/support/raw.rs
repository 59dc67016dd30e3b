//! A raw HTTP/1.1 client: the request goes out byte for byte as written (hyper's client would
//! normalize the method and the request target), and the answer is read with just enough
//! parsing to know where it ends — `Content-Length`, `chunked`, or the connection closing —
//! all bounded by a timeout. For a connection the test holds open itself (keep-alive,
//! pipelining, a paused writer): [`read_answer`] and [`read_to_close`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One parsed answer.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header (name, value) pairs in order; names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why no answer could be read.
#[derive(Debug)]
pub enum RawError {
    Io(std::io::Error),
    Timeout,
    /// The peer closed before a complete status line and head.
    Closed(Vec<u8>),
    Malformed(String),
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Io(e) => write!(f, "i/o: {e}"),
            RawError::Timeout => f.write_str("timed out"),
            RawError::Closed(b) => write!(
                f,
                "closed after {} bytes: {:?}",
                b.len(),
                String::from_utf8_lossy(b)
            ),
            RawError::Malformed(m) => write!(f, "malformed answer: {m}"),
        }
    }
}

/// Sends `request` as is on a fresh connection to `addr` and reads one answer. `head_only`
/// for a `HEAD` request (the answer has no body whatever its framing headers say).
pub async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    head_only: bool,
    timeout: Duration,
) -> Result<RawResponse, RawError> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr).await.map_err(RawError::Io)?;
        stream.write_all(request).await.map_err(RawError::Io)?;
        read_response(&mut stream, head_only).await
    })
    .await
    .map_err(|_| RawError::Timeout)?
}

/// [`exchange`] for a test that expects an answer: panics, saying why, if none could be read
/// within `timeout`.
pub async fn answer(addr: SocketAddr, request: &[u8], timeout: Duration) -> RawResponse {
    exchange(addr, request, false, timeout)
        .await
        .unwrap_or_else(|e| panic!("no answer from {addr}: {e}"))
}

/// Sends `request` (one with `connection: close`) and returns everything read until the peer
/// closes — status line, head and body — as text; panics if that takes over `timeout`.
pub async fn exchange_text(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let read_all = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(timeout, read_all)
        .await
        .unwrap_or_else(|_| panic!("no answer within {timeout:?}"));
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads one answer off `stream`, a connection the test opened and writes to itself
/// (keep-alive, pipelining, pauses mid-request); panics, saying why, if none could be read
/// within `timeout`.
pub async fn read_answer(stream: &mut TcpStream, timeout: Duration) -> RawResponse {
    tokio::time::timeout(timeout, read_response(stream, false))
        .await
        .unwrap_or_else(|_| panic!("no answer within {timeout:?}"))
        .unwrap_or_else(|e| panic!("no answer: {e}"))
}

/// Reads until the peer closes (or the connection fails); returns what arrived. Unbounded:
/// wrap it in a timeout.
pub async fn read_to_close(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut all = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn read_response(stream: &mut TcpStream, head_only: bool) -> Result<RawResponse, RawError> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Skip interim 1xx answers (100 Continue) in front of the final one.
        let (head_len, status, headers) = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let (status, headers) = parse_head(&buf[..end])?;
                break (end + 4, status, headers);
            }
            if fill(stream, &mut buf).await? == 0 {
                return Err(RawError::Closed(buf));
            }
        };
        if (100..200).contains(&status) && status != 101 {
            buf.drain(..head_len);
            continue;
        }
        let mut rest = buf.split_off(head_len);
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.trim().to_owned())
        };
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else if header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            read_chunked(stream, rest).await?
        } else if let Some(len) = header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| RawError::Malformed(format!("content-length {len:?}")))?;
            while rest.len() < len {
                if fill(stream, &mut rest).await? == 0 {
                    break;
                }
            }
            rest.truncate(len);
            rest
        } else {
            // Delimited by the connection closing.
            while fill(stream, &mut rest).await? != 0 {}
            rest
        };
        return Ok(RawResponse {
            status,
            headers,
            body,
        });
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, RawError> {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }
        // A reset after a complete answer is an ordinary way for a server to close.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
        Err(e) => Err(RawError::Io(e)),
    }
}

fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>), RawError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") {
        return Err(RawError::Malformed(format!("status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RawError::Malformed(format!("status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

async fn read_chunked(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<Vec<u8>, RawError> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(&buf, b"\r\n") {
                break i;
            }
            if fill(stream, &mut buf).await? == 0 {
                return Err(RawError::Malformed("chunked body cut short".into()));
            }
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| RawError::Malformed(format!("chunk size {size_text:?}")))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers are not needed here; the answer is complete.
            return Ok(body);
        }
        while buf.len() < size + 2 {
            if fill(stream, &mut buf).await? == 0 {
                return Err(RawError::Malformed("chunk cut short".into()));
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Every answer in `bytes` (all that was read from a connection up to its close), in order;
/// bodies framed by `Content-Length` or `chunked`. Stops at anything it cannot frame.
pub fn parse_all(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = find(bytes, b"\r\n\r\n") {
        let Ok((status, headers)) = parse_head(&bytes[..end]) else {
            break;
        };
        bytes = &bytes[end + 4..];
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            while let Some(line) = find(bytes, b"\r\n") {
                let size_text = String::from_utf8_lossy(&bytes[..line]).into_owned();
                let Ok(size) =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                else {
                    break;
                };
                bytes = &bytes[line + 2..];
                if size == 0 {
                    bytes = bytes.get(2..).unwrap_or_default();
                    break;
                }
                let chunk = bytes.get(..size).unwrap_or(bytes);
                body.extend_from_slice(chunk);
                bytes = bytes.get(size + 2..).unwrap_or_default();
            }
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.extend_from_slice(bytes.get(..len).unwrap_or(bytes));
            bytes = bytes.get(len..).unwrap_or_default();
        }
        out.push(RawResponse {
            status,
            headers,
            body,
        });
    }
    out
}
