//! [`Watched`], the client socket as hyper reads and writes it. On the way in it repairs each
//! request line (`request_line.rs`) and reports what was read to the connection's
//! [`Activity`]; on the way out it replaces hyper's own answers to refused heads with ones that
//! carry a JSON body (`head_errors.rs`), and writes the backend's early hints (`interim.rs`)
//! ahead of the response they precede. On an idle HTTP/1.1 connection it parks: it ends
//! hyper's session with an end of stream and hands the still-open socket back.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::activity::Activity;
use crate::head_errors;
use crate::interim::Outbox;

/// The client socket as hyper sees it: reports reads to [`Activity`], and on an idle HTTP/1.1
/// connection may end hyper's session while keeping the socket (see [`Activity::try_park`]).
pub(super) struct Watched {
    /// `None` once handed back for a park.
    inner: Option<TcpStream>,
    activity: Arc<Activity>,
    /// An HTTP/1 connection (h2 ones are never parked, and have no heads to answer).
    may_park: bool,
    /// The backend's early hints for this (HTTP/1) client, written ahead of hyper's bytes.
    hints: Option<Arc<Outbox>>,
    /// hyper flushed after its last write. It flushes only once its write buffer is all
    /// written, so until then the end of a response may still be in that buffer (a client
    /// that stops reading), and a park would lose it.
    flushed: bool,
    /// Repaired bytes that did not fit hyper's read buffer; handed out before reading more.
    held: Vec<u8>,
    /// Bytes of a replaced answer not written yet; written before anything else.
    owed: Vec<u8>,
}

impl Watched {
    /// `hints`: an HTTP/1 connection's outbox of early hints (`None` for h2).
    pub(super) fn new(
        inner: TcpStream,
        activity: Arc<Activity>,
        hints: Option<Arc<Outbox>>,
    ) -> Self {
        Watched {
            inner: Some(inner),
            activity,
            may_park: hints.is_some(),
            hints,
            flushed: false,
            held: Vec::new(),
            owed: Vec::new(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.activity.is_parking()
            && let Some(stream) = self.inner.take()
        {
            self.activity.put_parked(stream);
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection parked")
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.is_parking() {
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let before = buf.filled().len();
        if !this.held.is_empty() {
            let n = this.held.len().min(buf.remaining());
            buf.put_slice(&this.held[..n]);
            this.held.drain(..n);
            this.activity.on_read(&buf.filled()[before..]);
            return Poll::Ready(Ok(()));
        }
        let mut polled = Pin::new(&mut *inner).poll_read(cx, buf);
        // A repair may drop every byte just read (the rest of an over-long target): read on,
        // as an empty read would tell hyper the client closed.
        while buf.filled().len() > before {
            if let Some(repaired) = this.activity.repair_line(&buf.filled()[before..]) {
                buf.set_filled(before);
                let n = repaired.len().min(buf.remaining());
                buf.put_slice(&repaired[..n]);
                this.held.extend_from_slice(&repaired[n..]);
                if n == 0 {
                    polled = Pin::new(&mut *inner).poll_read(cx, buf);
                    continue;
                }
            }
            this.activity.on_read(&buf.filled()[before..]);
            return polled;
        }
        if polled.is_pending() && this.may_park && this.flushed && this.activity.try_park() {
            // An end of stream for hyper; the socket itself stays open.
            return Poll::Ready(Ok(()));
        }
        polled
    }
}

impl Watched {
    /// Writes what is owed — early hints from the backend, a replaced answer
    /// ([`head_errors`]) — before anything else.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(hints) = &self.hints {
            hints.take_into(&mut self.owed);
        }
        while !self.owed.is_empty() {
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(Err(gone()));
            };
            let n = ready!(Pin::new(inner).poll_write(cx, &self.owed))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.owed.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// hyper writing while a head is pending without a request is hyper answering a head it
    /// refused: that answer goes out with a JSON body instead. `Some(len)`: taken over.
    fn take_over_own_answer(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Option<usize> {
        if bytes.len() > head_errors::MAX_OWN_ANSWER
            || !self.may_park
            || !self.activity.head_without_request()
        {
            return None;
        }
        self.owed = head_errors::with_json_body(bytes)?;
        // Pending is fine: the rest goes out with the next write, flush or shutdown.
        let _ = self.poll_owed(cx);
        Some(bytes.len())
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        ready!(this.poll_owed(cx))?;
        if let Some(n) = this.take_over_own_answer(cx, buf) {
            return Poll::Ready(Ok(n));
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes on every turn of its connection, also while a response is awaited:
        // early hints arriving then wake it, and go out here.
        if let Some(hints) = &this.hints {
            hints.register(cx.waker());
        }
        ready!(this.poll_owed(cx))?;
        let polled = match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        };
        this.flushed = matches!(polled, Poll::Ready(Ok(())));
        if this.flushed {
            this.activity.detach.flushed();
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.is_parking() {
            // hyper closes its side of a parked session; the client's connection stays open.
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_owed(cx))?;
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        ready!(this.poll_owed(cx))?;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len <= head_errors::MAX_OWN_ANSWER
            && this.may_park
            && this.activity.head_without_request()
        {
            // Rare (an answer to a refused head, a short bodiless head): one small copy.
            let bytes: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(n) = this.take_over_own_answer(cx, &bytes) {
                return Poll::Ready(Ok(n));
            }
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(TcpStream::is_write_vectored)
    }
}
