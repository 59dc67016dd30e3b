//! The per-connection [`Activity`]: what one client connection is doing, shared by the
//! connection task (`conn.rs`), the I/O hyper reads through (`watched.rs`) and the request service.
//! It owns the header-read and keep-alive idle timeouts, the scan of each request head as it
//! is read (`framing.rs`) and the repair of its request line (`request_line.rs`), the count of
//! requests in flight ([`Busy`]), and the decision to park an idle HTTP/1.1 connection: only
//! when hyper's read buffer is certainly empty.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::framing::HeadScan;
use crate::request_line::RequestLine;

/// What one connection is doing, for the header and idle timeouts, and whether hyper's read
/// buffer is certainly empty (so that an idle HTTP/1.1 connection can be parked).
pub(super) struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the connection last became idle (ms since epoch).
    idle_since: AtomicU64,
    /// When bytes of a new request head started arriving on an idle connection; 0 = none.
    head_started: AtomicU64,
    head_scan: std::sync::Mutex<HeadScan>,
    /// Repairs each request line as it is read (see `request_line.rs`).
    line: std::sync::Mutex<RequestLine>,
    limits: HeadLimits,
    /// Bytes of the current request's body not read yet, or [`UNACCOUNTED`]: bytes were read
    /// that hyper may still hold (a pipelined request, a chunked body, an upgrade...).
    unread_body: AtomicU64,
    /// The connection task asked hyper's next idle read to end the session.
    park_wanted: AtomicBool,
    /// The session is ending for a park: the socket must be kept, not shut down.
    parking: AtomicBool,
    /// Where the I/O puts the socket back when hyper drops it after a park.
    parked: std::sync::Mutex<Option<TcpStream>>,
    /// A long-lived response's body waiting to be taken out of hyper (`detach.rs`).
    pub(super) detach: super::detach::Slot,
}

const UNACCOUNTED: u64 = u64::MAX;

/// A deadline too far to compute (a timeout near `Duration::MAX`): about a year.
const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Limits on a request head, checked as its bytes are read.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadLimits {
    pub(super) max_head: usize,
    pub(super) max_uri: usize,
}

/// What was noticed in a request head as it was read.
#[derive(Debug, Clone, Copy)]
pub(super) struct HeadMarks {
    pub(super) two_framings: bool,
    pub(super) uri_too_long: bool,
}

/// What [`Activity::watch`] saw on the connection.
pub(super) enum Verdict {
    HeaderTimeout,
    Idle,
    /// Idle long enough to drop hyper's state (see [`Activity::try_park`]).
    Park,
}

impl Activity {
    pub(super) fn new(limits: HeadLimits) -> Self {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            head_scan: std::sync::Mutex::new(HeadScan::default()),
            line: std::sync::Mutex::new(RequestLine::default()),
            limits,
            unread_body: AtomicU64::new(UNACCOUNTED),
            park_wanted: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            parked: std::sync::Mutex::new(None),
            detach: super::detach::Slot::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 can mean "not set".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Bytes of a request head have arrived (starts the header timeout).
    pub(super) fn head_begins(&self) {
        // Read the clock only for the first bytes of a head.
        if self.head_started.load(Ordering::Acquire) == 0 {
            let _ = self.head_started.compare_exchange(
                0,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    pub(super) fn on_read(&self, bytes: &[u8]) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.head_begins();
            self.scan().feed(bytes, self.limits.max_head);
        } else {
            let n = bytes.len() as u64;
            let _ = self
                .unread_body
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                    Some(if left >= n { left - n } else { UNACCOUNTED })
                });
        }
    }

    /// Bytes just read, as hyper should see them: a request line in head position repaired.
    pub(super) fn repair_line(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        self.line().repair(bytes, self.limits.max_uri)
    }

    pub(super) fn line(&self) -> std::sync::MutexGuard<'_, RequestLine> {
        // Held for one pass over the bytes just read, never across an await.
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scan(&self) -> std::sync::MutexGuard<'_, HeadScan> {
        // Held for a copy of the bytes just read, never across an await.
        self.head_scan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request head was parsed: the connection is busy until its response is sent. Also
    /// says what was noticed in that head (two framings, see `framing.rs`; a cut request
    /// line, see `request_line.rs`). `body_len` is the exact length of the request body, when
    /// it is known.
    pub(super) fn begin_request(self: &Arc<Self>, body_len: Option<u64>) -> (Busy, HeadMarks) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        self.park_wanted.store(false, Ordering::Release);
        let scanned = self.scan().take(body_len, self.limits.max_head);
        let uri_too_long = {
            let mut line = self.line();
            let cut = line.too_long();
            line.next_request();
            cut
        };
        // Whatever was read past the head is the start of the body; more than the body means
        // a pipelined request is (partly) in hyper's buffer.
        let unread = match (scanned.past_head, body_len) {
            (Some(past), Some(len)) if past <= len => len - past,
            _ => UNACCOUNTED,
        };
        self.unread_body.store(unread, Ordering::Release);
        let marks = HeadMarks {
            two_framings: scanned.two_framings,
            uri_too_long,
        };
        (Busy(self.clone()), marks)
    }

    /// Whether hyper, asking to read now, holds no unread bytes: no request in flight, no
    /// bytes of a next head read, and every byte read since the last head belonged to its body.
    fn nothing_buffered(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == 0
            && self.unread_body.load(Ordering::Acquire) == 0
    }

    /// Bytes of a request head have arrived and no request was made of them (yet): what
    /// hyper writes now is its own answer to a head it refused.
    pub(super) fn head_without_request(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) != 0
    }

    pub(super) fn want_park(&self) {
        self.park_wanted.store(true, Ordering::Release);
    }

    /// Called by the I/O when hyper's read would block: decides whether to answer with an end
    /// of stream instead, which hyper takes, on an idle connection, as the client closing; it
    /// then drops its connection state without an error or a response. Only when hyper's read
    /// buffer is empty, or that end of stream would cut a request short.
    pub(super) fn try_park(&self) -> bool {
        if self.park_wanted.load(Ordering::Acquire) && self.nothing_buffered() {
            self.parking.store(true, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// hyper's session is about to be dropped with a response in flight (`detach.rs`): its
    /// I/O hands the socket back, as for a park.
    pub(super) fn keep_socket(&self) {
        self.parking.store(true, Ordering::Release);
    }

    pub(super) fn is_parking(&self) -> bool {
        self.parking.load(Ordering::Acquire)
    }

    pub(super) fn put_parked(&self, stream: TcpStream) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
    }

    pub(super) fn take_parked(&self) -> Option<TcpStream> {
        self.parking.store(false, Ordering::Release);
        self.park_wanted.store(false, Ordering::Release);
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Resolves when the connection should be closed, or, given `park_after`, when it has been
    /// idle that long with nothing left in hyper's buffer. Looks at the timeouts at a coarse
    /// tick, and wakes exactly when a park is due. A busy connection arms no park: every change
    /// to that state happens while the task polls hyper, and `drive` polls this right after.
    pub(super) async fn watch(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
        park_after: Option<Duration>,
    ) -> Verdict {
        let tick = (header_timeout.min(idle_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let header_ms = u64::try_from(header_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let sleep = tokio::time::sleep(tick);
        tokio::pin!(sleep);
        std::future::poll_fn(|cx| {
            loop {
                let park_due = park_after
                    .filter(|_| {
                        !self.park_wanted.load(Ordering::Acquire) && self.nothing_buffered()
                    })
                    .map(|after| {
                        let idle_since = self.idle_since.load(Ordering::Acquire);
                        tokio::time::Instant::from_std(
                            self.epoch + Duration::from_millis(idle_since) + after,
                        )
                    });
                if let Some(due) = park_due
                    && sleep.deadline() > due
                {
                    sleep.as_mut().reset(due);
                }
                ready!(sleep.as_mut().poll(cx));
                if park_due.is_some_and(|due| tokio::time::Instant::now() >= due) {
                    return Poll::Ready(Verdict::Park);
                }
                if let Some(verdict) = self.timed_out(header_ms, idle_ms) {
                    return Poll::Ready(verdict);
                }
                sleep.as_mut().reset(tokio::time::Instant::now() + tick);
            }
        })
        .await
    }

    /// When a connection with no request in flight times out if nothing changes:
    /// `header_timeout` after a request head began arriving, else `idle_timeout` after it
    /// became idle (or opened). At this instant [`Activity::timed_out_at_rest`] sees it.
    pub(super) fn deadline(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> tokio::time::Instant {
        let head = self.head_started.load(Ordering::Acquire);
        let (since, limit) = if head != 0 {
            (head, header_timeout)
        } else {
            (self.idle_since.load(Ordering::Acquire), idle_timeout)
        };
        // A millisecond past the limit: `timed_out` wants more than the limit, on a clock
        // that counts from 1.
        let at = Duration::from_millis(since.saturating_add(1))
            .checked_add(limit)
            .and_then(|d| self.epoch.checked_add(d));
        match at {
            Some(at) => tokio::time::Instant::from_std(at),
            None => tokio::time::Instant::now() + FAR_FUTURE,
        }
    }

    /// [`Activity::timed_out`] for a connection hyper is not serving (parked, or before its
    /// first request).
    pub(super) fn timed_out_at_rest(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<Verdict> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.timed_out(ms(header_timeout), ms(idle_timeout))
    }

    fn timed_out(&self, header_ms: u64, idle_ms: u64) -> Option<Verdict> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = self.now_ms();
        let head = self.head_started.load(Ordering::Acquire);
        if head != 0 {
            (now.saturating_sub(head) > header_ms).then_some(Verdict::HeaderTimeout)
        } else {
            let idle_since = self.idle_since.load(Ordering::Acquire);
            (now.saturating_sub(idle_since) > idle_ms).then_some(Verdict::Idle)
        }
    }
}

/// Held while a request is in flight on the connection (until its response body is done).
pub(super) struct Busy(Arc<Activity>);

impl Busy {
    pub(super) fn activity(&self) -> &Arc<Activity> {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parkable(a: &Activity) -> bool {
        a.want_park();
        let yes = a.try_park();
        a.take_parked();
        yes
    }

    #[test]
    fn parks_only_when_every_byte_read_was_consumed() {
        let a = Arc::new(Activity::new(HeadLimits {
            max_head: 8192,
            max_uri: 8192,
        }));
        assert!(!parkable(&a), "before any request");

        a.on_read(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let (busy, _) = a.begin_request(Some(0));
        assert!(!parkable(&a), "while a request is in flight");
        drop(busy);
        assert!(parkable(&a));

        a.on_read(b"GET / HT");
        assert!(!parkable(&a), "part of the next head was read");
        a.on_read(b"TP/1.1\r\n\r\n");
        drop(a.begin_request(Some(0)).0);
        assert!(parkable(&a));

        // A body, partly read with its head: parkable once the rest is read, not before.
        a.on_read(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe");
        let (busy, _) = a.begin_request(Some(5));
        a.on_read(b"llo");
        drop(busy);
        assert!(parkable(&a));

        // More bytes than the body: a pipelined request is in hyper's buffer.
        a.on_read(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok");
        let (busy, _) = a.begin_request(Some(2));
        a.on_read(b"G");
        drop(busy);
        assert!(!parkable(&a));
    }

    #[test]
    fn never_parks_without_an_exact_account() {
        for (head, body_len) in [
            // A chunked body (no exact length).
            (
                &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                None,
            ),
            // Two requests in one read.
            (b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", Some(0)),
            // A head ended by bare line feeds, which the scan does not recognise.
            (b"GET / HTTP/1.1\nHost: a\n\n", Some(0)),
        ] {
            let a = Arc::new(Activity::new(HeadLimits {
                max_head: 8192,
                max_uri: 8192,
            }));
            a.on_read(head);
            drop(a.begin_request(body_len).0);
            assert!(!parkable(&a), "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn parks_only_when_asked() {
        let a = Arc::new(Activity::new(HeadLimits {
            max_head: 8192,
            max_uri: 8192,
        }));
        a.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(a.begin_request(Some(0)).0);
        assert!(!a.try_park(), "not asked");
        a.want_park();
        assert!(a.try_park());
        assert!(a.is_parking());
        assert!(a.take_parked().is_none(), "no socket was handed back");
        assert!(!a.is_parking());
        // A new request withdraws a park asked for earlier.
        a.want_park();
        a.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(a.begin_request(Some(0)).0);
        assert!(!a.try_park());
    }
}
