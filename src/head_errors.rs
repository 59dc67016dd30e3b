//! hyper's own answers, given the JSON body every flashgate answer has.
//!
//! A request head hyper cannot parse — an obfuscated `Transfer-Encoding` (`xchunked`,
//! `chunked, identity`), two different `Content-Length`s, obs-fold, a space before a colon, a
//! head over `server.max_header_bytes` — never reaches the gate: hyper answers it itself, with
//! an empty body, and closes the connection. That is the right decision (these are the
//! request-smuggling classics) but not a clear answer. The server's I/O layer passes what
//! hyper writes while a head is pending without a request through [`with_json_body`], which
//! recognizes exactly that answer (`connection: close`, `content-length: 0`, `date`, nothing
//! else) and adds the body.

/// hyper's own answers are a short status line and three fields: anything longer is not one
/// (and is not copied to be looked at).
pub const MAX_OWN_ANSWER: usize = 256;

/// The same answer with a JSON body, if `bytes` is hyper's own bodiless answer to a head it
/// refused; `None` for anything else (which then goes out unchanged).
pub fn with_json_body(bytes: &[u8]) -> Option<Vec<u8>> {
    let head = bytes.strip_suffix(b"\r\n\r\n")?;
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?
        .get(..3)?;
    let (reason, message) = match code {
        "400" => (
            "bad_request",
            "the request head is malformed or ambiguous (request line, header syntax, \
             Content-Length or Transfer-Encoding; RFC 9112)",
        ),
        "414" => ("uri_too_long", "request URI too long"),
        "431" => (
            "headers_too_large",
            "the request head is larger than server.max_header_bytes or has more than \
             server.max_headers fields",
        ),
        "505" => (
            "http_version_not_supported",
            "only HTTP/1.0, HTTP/1.1 and h2c are served",
        ),
        _ => return None,
    };
    let mut date = None;
    let (mut close, mut empty, mut fields) = (false, false, 0);
    for line in lines {
        fields += 1;
        let lower = line.to_ascii_lowercase();
        if lower == "connection: close" {
            close = true;
        } else if lower == "content-length: 0" {
            empty = true;
        } else if lower.starts_with("date: ") {
            date = Some(line);
        }
    }
    if !(close && empty && fields == 3) {
        return None;
    }
    let date = date?;
    let body = format!("{{\"error\":\"{reason}\",\"message\":\"{message}\"}}\n");
    Some(
        format!(
            "{status_line}\r\ncontent-type: application/json\r\nconnection: close\r\n\
             content-length: {}\r\n{date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "date: Wed, 02 Dec 2026 13:03:30 GMT";

    #[test]
    fn hypers_own_answers_get_a_json_body() {
        for (status, reason) in [
            ("400 Bad Request", "bad_request"),
            ("431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let raw = format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"
            );
            let out = String::from_utf8(with_json_body(raw.as_bytes()).unwrap()).unwrap();
            let (head, body) = out.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert!(head.contains("\r\ncontent-type: application/json\r\n"));
            assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
            assert!(head.contains("\r\nconnection: close\r\n"));
            assert!(head.ends_with(DATE));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(json["error"], reason);
        }
    }

    #[test]
    fn anything_else_is_left_alone() {
        for raw in [
            // A backend's answer: other fields, or a body.
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"
            ),
            format!(
                "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 2\r\n{DATE}\r\n\r\nno"
            ),
            format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"),
            format!(
                "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n\r\n"
            ),
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n".to_owned(),
        ] {
            assert!(with_json_body(raw.as_bytes()).is_none(), "{raw:?}");
        }
    }
}
