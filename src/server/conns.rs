//! The gRPC port's connection cap: an accepted connection holds a slot until it closes; at the
//! cap accepting waits, so further clients stay in the listen backlog (as on the HTTP front,
//! `gateway.max_connections`). Without it every client connection, each with its streams, is
//! kept.
#![forbid(unsafe_code)]
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// A connection and its slot, given back when the connection is dropped.
pub struct Held<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
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
            Ok(Held { io, _slot: slot })
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
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
