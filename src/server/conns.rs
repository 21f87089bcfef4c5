//! The gRPC port's connection cap: an accepted connection holds a slot until it closes; at the
//! cap accepting waits, so further clients stay in the listen backlog (as on the HTTP front,
//! `gateway.max_connections`). Without it every client connection, each with its streams, is
//! kept. A connection must send HTTP/2's preface within [`FIRST_BYTES_WITHIN`] of getting its
//! slot: hyper sets no limit there, and silent sockets would otherwise hold every slot (the
//! HTTP/2 pings that close dead peers start only after it).
#![forbid(unsafe_code)]
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// How long a connection given a slot has to send HTTP/2's client preface.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);
/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_BYTES: usize = 24;

/// A connection and its slot, given back when the connection is dropped.
pub struct Held<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
    /// Until the preface is in: its deadline and the bytes read so far.
    waiting: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

/// `incoming` with at most `max` connections open at once. Each connection waits for its slot
/// before the next is taken from `incoming`.
pub fn capped<S, T>(incoming: S, max: usize) -> impl Stream<Item = io::Result<Held<T>>>
where
    S: Stream<Item = io::Result<T>>,
{
    let slots = Arc::new(Semaphore::new(max));
    incoming.then(move |conn| {
        let slots = slots.clone();
        async move {
            let io = conn?;
            // The semaphore is never closed; were it, the connection is refused, not served.
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("connection slots closed"))?;
            let deadline = Box::pin(tokio::time::sleep(FIRST_BYTES_WITHIN));
            Ok(Held {
                io,
                _slot: slot,
                waiting: Some((deadline, 0)),
            })
        }
    })
}

impl<T: Connected> Connected for Held<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Held<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some((deadline, _)) = &mut this.waiting {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface in time",
                )));
            }
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((_, got))) = (&r, &mut this.waiting) {
            *got += buf.filled().len() - before;
            if *got >= PREFACE_BYTES {
                this.waiting = None;
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Held<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
