//! Pipelined bidirectional streams: replies in request order, a bounded window in flight,
//! and a clean end on drain.
#![forbid(unsafe_code)]
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Status, Streaming};

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Pipelined stream requests in flight per stream; replies keep request order.
const STREAM_WINDOW: usize = 64;

/// Answers a client stream in order, up to STREAM_WINDOW requests in flight. On drain it stops
/// reading and, after the replies to what it read, ends with UNAVAILABLE if the client had not
/// ended its side: the client then knows that requests without a reply were not processed and
/// can retry them elsewhere (an idle stream cannot hold the drain open).
/// `drained` resolves when the server begins to drain; `answer(ctx, request)` makes a reply.
pub(super) fn serve_stream<Ctx, Req, Rep, F, Fut>(
    ctx: Ctx,
    drained: impl Future<Output = ()> + Send + 'static,
    inbound: Streaming<Req>,
    answer: F,
) -> BoxStream<Rep>
where
    Ctx: Clone + Send + Sync + 'static,
    Req: Send + 'static,
    Rep: Send + 'static,
    F: Fn(Ctx, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Rep> + Send + 'static,
{
    let ended = Arc::new(AtomicBool::new(false));
    let seen_end = ended.clone();
    let answer = Arc::new(answer);
    let replies = inbound
        .map(Some)
        .chain(futures::stream::iter([None])) // marks the client's own end
        .take_until(drained)
        .filter_map(move |item| {
            if item.is_none() {
                seen_end.store(true, Ordering::Release);
            }
            futures::future::ready(item)
        })
        .map(move |item| {
            let (ctx, answer) = (ctx.clone(), answer.clone());
            async move { Ok(answer(ctx, item?).await) }
        })
        .buffered(STREAM_WINDOW);
    let tail = futures::stream::once(async move {
        (!ended.load(Ordering::Acquire)).then(|| {
            Err(Status::unavailable(
                "server draining: stream closed; requests without a reply were not processed",
            ))
        })
    })
    .filter_map(futures::future::ready);
    Box::pin(replies.chain(tail))
}
