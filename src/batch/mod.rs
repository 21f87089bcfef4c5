//! Dynamic batcher: a bounded admission queue with priorities and deadlines, a batch-forming
//! thread that packs jobs by token budget and request cap, and one backend thread that owns the
//! model. The next batch is formed while the current one runs (a rendezvous of depth one).
//! Work whose client has gone, or whose deadline has passed, is dropped before compute.
#![forbid(unsafe_code)]
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::base::{Backend, BackendError, Device, PackedBatch};
use crate::metrics as m;

/// Why a job was not embedded. Admission errors come back at once; the others through the
/// job's reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The sequence cannot be batched (empty, over the token budget) or the backend refused
    /// it as malformed.
    #[error("{0}")]
    InvalidInput(String),
    /// The admission queue is full: retry with backoff.
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("deadline exceeded before the request was computed")]
    DeadlineExceeded,
    /// Shutting down, or a worker thread stopped: safe to retry on another replica.
    #[error("not ready: {0}")]
    Unavailable(String),
    /// The backend failed on a well-formed batch (a device fault, a panic).
    #[error("backend failure: {0}")]
    Backend(String),
    /// The batcher itself could not run (a thread the OS refused).
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for BatchError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidBatch(m) => BatchError::InvalidInput(m),
            BackendError::Fault(m) | BackendError::Unsupported(m) => BatchError::Backend(m),
        }
    }
}

/// Lower index = served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

/// A lower-priority job that has waited this long is served before higher ones (no starvation).
const AGING: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_queue: usize,
}

#[derive(Debug)]
pub struct JobOutput {
    pub embedding: Vec<f32>,
    pub queue: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

struct Job {
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<JobOutput, BatchError>>,
}

impl Job {
    /// Answers and drops the job if nobody waits for it or it is too late.
    fn still_wanted(self, now: Instant) -> Option<Job> {
        if self.reply.is_closed() {
            metrics::counter!(m::DROPPED, "reason" => "client_gone", "stage" => "queue")
                .increment(1);
            return None;
        }
        if self.deadline.is_some_and(|d| d <= now) {
            metrics::counter!(m::DROPPED, "reason" => "deadline", "stage" => "queue").increment(1);
            let _ = self.reply.send(Err(BatchError::DeadlineExceeded));
            return None;
        }
        Some(self)
    }
}

#[derive(Default)]
struct State {
    queues: [VecDeque<Job>; 3],
    len: usize,
    closed: bool,
    /// Why a worker thread ended without a shutdown request; admission is then refused.
    stopped: Option<String>,
}

/// Held by each worker thread: if the thread ends while the batcher is open (a panic
/// outside the backend's own guard, a channel torn down), nothing would ever serve the
/// queue again. Close admission and answer everything queued, so no client hangs.
struct ExitGuard {
    shared: Arc<Shared>,
    thread: &'static str,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.closed {
            return;
        }
        let why = format!("the {} thread stopped", self.thread);
        tracing::error!(
            thread = self.thread,
            "batcher worker ended unexpectedly; refusing work"
        );
        st.closed = true;
        st.stopped = Some(why.clone());
        let jobs: Vec<Job> = st.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
        st.len = 0;
        metrics::gauge!(m::QUEUE_DEPTH).set(0.0);
        drop(st);
        self.shared.ready.notify_all();
        for j in jobs {
            let _ = j.reply.send(Err(BatchError::Unavailable(format!(
                "encoder unavailable: {why}"
            ))));
        }
    }
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    limits: Limits,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a thread panicked while holding it; the queue itself is
        // still consistent (every mutation is a single push/pop), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Batcher {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    backend_name: &'static str,
    device: Device,
    dim: usize,
}

type Formed = (PackedBatch, Vec<Job>, Instant);

impl Batcher {
    /// Starts the forming and backend threads; an error if the OS refuses a thread.
    pub fn start(backend: Box<dyn Backend>, limits: Limits) -> Result<Batcher, BatchError> {
        let backend_name = backend.name();
        let device = backend.device();
        let dim = backend.dim();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            limits,
        });
        let (tx, rx) = sync_channel::<Formed>(1);
        let spawn_err =
            |e: std::io::Error| BatchError::Internal(format!("starting a batcher thread: {e}"));
        let guard = ExitGuard {
            shared: shared.clone(),
            thread: "backend",
        };
        let exec = std::thread::Builder::new()
            .name("tiergate-backend".into())
            .spawn(move || {
                let _guard = guard;
                run_batches(backend, rx)
            })
            .map_err(spawn_err)?;
        let s = shared.clone();
        let guard = ExitGuard {
            shared: shared.clone(),
            thread: "batch-forming",
        };
        let former = std::thread::Builder::new()
            .name("tiergate-batcher".into())
            .spawn(move || {
                let _guard = guard;
                form_batches(&s, tx)
            });
        let former = match former {
            Ok(t) => t,
            Err(e) => {
                // `tx` went with the failed closure, so the backend thread ends by itself.
                let _ = exec.join();
                return Err(spawn_err(e));
            }
        };
        Ok(Batcher {
            shared,
            threads: Mutex::new(vec![former, exec]),
            backend_name,
            device,
            dim,
        })
    }

    /// Why the batcher stopped serving on its own (a worker thread ended), if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().stopped.clone()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend_name
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    pub fn queue_depth(&self) -> usize {
        self.shared.lock().len
    }

    /// Admits one sequence; answers at once with RESOURCE_EXHAUSTED if the queue is full.
    pub fn submit(
        &self,
        ids: Vec<u32>,
        type_ids: Vec<u32>,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Result<JobOutput, BatchError>>, BatchError> {
        if ids.is_empty() || ids.len() > self.shared.limits.max_batch_tokens {
            return Err(BatchError::InvalidInput(format!(
                "sequence of {} tokens cannot be batched (limit {})",
                ids.len(),
                self.shared.limits.max_batch_tokens
            )));
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(BatchError::DeadlineExceeded);
        }
        let (reply, rx) = oneshot::channel();
        let mut st = self.shared.lock();
        if st.closed {
            return Err(BatchError::Unavailable(match &st.stopped {
                Some(why) => format!("encoder unavailable: {why}"),
                None => "server is shutting down".into(),
            }));
        }
        if st.len >= self.shared.limits.max_queue {
            return Err(BatchError::Overloaded(format!(
                "queue full ({} waiting); retry with backoff",
                st.len
            )));
        }
        st.queues[priority as usize].push_back(Job {
            ids,
            type_ids,
            deadline,
            enqueued: Instant::now(),
            reply,
        });
        st.len += 1;
        metrics::gauge!(m::QUEUE_DEPTH).set(st.len as f64);
        drop(st);
        self.shared.ready.notify_one();
        Ok(rx)
    }

    /// Submits and waits for the embedding.
    pub async fn embed(
        &self,
        ids: Vec<u32>,
        type_ids: Vec<u32>,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<JobOutput, BatchError> {
        let rx = self.submit(ids, type_ids, priority, deadline)?;
        // UNAVAILABLE, not INTERNAL: the request is safe to retry on another replica.
        rx.await.map_err(|_| {
            BatchError::Unavailable("backend thread stopped before answering".into())
        })?
    }

    /// Embeds many sequences offline (train, score) through the same queue and backend,
    /// keeping the queue full and waiting on the oldest job when it is. Output in input order.
    pub fn embed_all(
        &self,
        seqs: impl IntoIterator<Item = (Vec<u32>, Vec<u32>)>,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<f32>, BatchError> {
        let mut pending: VecDeque<oneshot::Receiver<Result<JobOutput, BatchError>>> =
            VecDeque::new();
        let mut out = Vec::new();
        let mut take = |rx: oneshot::Receiver<Result<JobOutput, BatchError>>,
                        out: &mut Vec<f32>| {
            let e = rx
                .blocking_recv()
                .map_err(|_| BatchError::Internal("backend thread stopped".into()))??;
            out.extend_from_slice(&e.embedding);
            progress(1);
            Ok::<_, BatchError>(())
        };
        let window = self.shared.limits.max_queue.max(1);
        for (ids, type_ids) in seqs {
            if pending.len() >= window {
                if let Some(rx) = pending.pop_front() {
                    take(rx, &mut out)?;
                }
            }
            loop {
                match self.submit(ids.clone(), type_ids.clone(), Priority::Low, None) {
                    Ok(rx) => {
                        pending.push_back(rx);
                        break;
                    }
                    // Shared with live traffic: wait for our oldest job, then retry.
                    Err(BatchError::Overloaded(_)) => match pending.pop_front() {
                        Some(rx) => take(rx, &mut out)?,
                        None => std::thread::sleep(Duration::from_millis(5)),
                    },
                    Err(e) => return Err(e),
                }
            }
        }
        for rx in pending {
            take(rx, &mut out)?;
        }
        Ok(out)
    }

    /// Stops admission; what was admitted is still computed and answered. Blocks until done.
    pub fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Picks the queue to serve next: highest priority, unless a lower one has aged past AGING.
fn next_queue(st: &State, now: Instant) -> Option<usize> {
    let aged = (1..3).rev().find(|&q| {
        st.queues[q]
            .front()
            .is_some_and(|j| now.duration_since(j.enqueued) > AGING)
    });
    aged.or_else(|| (0..3).find(|&q| !st.queues[q].is_empty()))
}

fn form_batches(shared: &Shared, tx: SyncSender<Formed>) {
    let lim = shared.limits;
    loop {
        let mut jobs: Vec<Job> = Vec::new();
        let mut tokens = 0usize;
        {
            let mut st = shared.lock();
            while st.len == 0 && !st.closed {
                st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.len == 0 && st.closed {
                return; // dropping tx ends the backend thread
            }
            let now = Instant::now();
            while jobs.len() < lim.max_batch_requests {
                let Some(q) = next_queue(&st, now) else { break };
                let fits = st.queues[q]
                    .front()
                    .is_some_and(|j| tokens + j.ids.len() <= lim.max_batch_tokens);
                if !fits {
                    break;
                }
                let Some(job) = st.queues[q].pop_front() else {
                    break;
                };
                st.len -= 1;
                if let Some(job) = job.still_wanted(now) {
                    tokens += job.ids.len();
                    jobs.push(job);
                }
            }
            metrics::gauge!(m::QUEUE_DEPTH).set(st.len as f64);
        }
        if jobs.is_empty() {
            continue;
        }
        let batch = pack(&jobs);
        if tx.send((batch, jobs, Instant::now())).is_err() {
            return; // backend thread is gone; its jobs' senders were dropped with it
        }
    }
}

fn pack(jobs: &[Job]) -> PackedBatch {
    let mut b = PackedBatch::new();
    for j in jobs {
        b.push(&j.ids, &j.type_ids);
    }
    b
}

fn run_batches(mut backend: Box<dyn Backend>, rx: Receiver<Formed>) {
    let dim = backend.dim();
    for (mut batch, mut jobs, _formed) in rx {
        // Clients may have left while this batch waited for the backend.
        let n = jobs.len();
        let now = Instant::now();
        jobs = jobs
            .into_iter()
            .filter_map(|j| j.still_wanted(now))
            .collect();
        if jobs.is_empty() {
            continue;
        }
        if jobs.len() != n {
            batch = pack(&jobs);
        }
        metrics::histogram!(m::BATCH_SIZE).record(jobs.len() as f64);
        metrics::histogram!(m::BATCH_TOKENS).record(batch.tokens() as f64);
        let t0 = Instant::now();
        let out = catch_unwind(AssertUnwindSafe(|| backend.embed(&batch)))
            .unwrap_or_else(|_| Err(BackendError::Fault("backend panicked".into())))
            .map_err(BatchError::from);
        let inference = t0.elapsed();
        metrics::histogram!(m::INFERENCE_SECONDS).record(inference.as_secs_f64());
        let size = jobs.len();
        match out {
            Ok(emb) if emb.len() == size * dim => {
                for (job, e) in jobs.into_iter().zip(emb.chunks_exact(dim)) {
                    let queue = t0.duration_since(job.enqueued);
                    metrics::histogram!(m::QUEUE_SECONDS).record(queue.as_secs_f64());
                    let _ = job.reply.send(Ok(JobOutput {
                        embedding: e.to_vec(),
                        queue,
                        inference,
                        batch_size: size,
                    }));
                }
            }
            Ok(emb) => fail_all(
                jobs,
                BatchError::Backend(format!(
                    "backend returned {} floats for {size} x {dim}",
                    emb.len()
                )),
            ),
            Err(e) => fail_all(jobs, e),
        }
    }
}

/// Answers every job of a failed batch with the batch's error: bad input stays bad input.
fn fail_all(jobs: Vec<Job>, e: BatchError) {
    tracing::error!(error = %e, jobs = jobs.len(), "batch failed");
    for j in jobs {
        let _ = j.reply.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u32) -> (Job, oneshot::Receiver<Result<JobOutput, BatchError>>) {
        let (reply, rx) = oneshot::channel();
        let j = Job {
            ids: vec![101, n, 102],
            type_ids: vec![0; 3],
            deadline: None,
            enqueued: Instant::now(),
            reply,
        };
        (j, rx)
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            limits: Limits {
                max_batch_tokens: 64,
                max_batch_requests: 4,
                max_queue: 8,
            },
        })
    }

    #[test]
    fn a_worker_ending_answers_the_queue_and_closes_admission() {
        let shared = shared();
        let mut waiting = Vec::new();
        for (q, n) in [(0usize, 1u32), (1, 2), (2, 3)] {
            let (j, rx) = job(n);
            shared.lock().queues[q].push_back(j);
            shared.lock().len += 1;
            waiting.push(rx);
        }
        // A thread holding this guard ends while the batcher is open.
        drop(ExitGuard {
            shared: shared.clone(),
            thread: "backend",
        });
        for mut rx in waiting {
            match rx.try_recv() {
                Ok(Err(BatchError::Unavailable(m))) => assert!(m.contains("backend"), "{m}"),
                other => panic!("queued job got {other:?}"),
            }
        }
        let st = shared.lock();
        assert!(st.closed && st.len == 0 && st.queues.iter().all(VecDeque::is_empty));
        assert_eq!(st.stopped.as_deref(), Some("the backend thread stopped"));
    }

    #[test]
    fn a_requested_shutdown_is_not_a_failure() {
        let shared = shared();
        shared.lock().closed = true;
        drop(ExitGuard {
            shared: shared.clone(),
            thread: "backend",
        });
        assert!(shared.lock().stopped.is_none());
    }
}
