//! Dynamic batcher: a bounded admission queue with priorities and deadlines, a batch-forming
//! thread that packs jobs by token budget and request cap, and one backend thread that owns the
//! model. The next batch is formed while the current one runs (a rendezvous of depth one).
//! Work whose client has gone, or whose deadline has passed, is dropped before compute.
//! Admission also refuses work whose expected queue wait (queued tokens × the measured time per
//! token) exceeds its deadline or a configured bound, and a full queue makes room for higher
//! priorities by shedding its newest lower-priority job. A watchdog declares the backend faulty
//! after consecutive failed batches or one batch running too long: admission then answers
//! UNAVAILABLE until a probe batch succeeds (or a fallback backend takes over).
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

/// Each level below High counts as this much later in the queue: a lower-priority job waits
/// at most this much longer per level than higher ones (no starvation, no inversion).
const AGING: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_batch_requests: usize,
    pub max_queue: usize,
}

/// What the batcher does beyond batching: all off by default (offline commands, unit tests).
#[derive(Default)]
pub struct Options {
    /// Consecutive failed batches (a fault, a panic, non-finite output) after which the
    /// backend is declared faulty; 0 = never.
    pub max_consecutive_faults: u32,
    /// A batch running longer than this is declared hung: the backend is faulty and the
    /// batch's requests are answered UNAVAILABLE at once.
    pub watchdog: Option<Duration>,
    /// Refuse a request whose expected queue wait exceeds this.
    pub max_queue_delay: Option<Duration>,
    /// Swapped in when the backend is declared faulty after failed batches (backend = auto:
    /// the CPU after CUDA). Not for a hung batch: its thread cannot be taken back.
    pub fallback: Option<Fallback>,
}

/// A backend to build when the first one fails, and the batch limits of its device.
pub struct Fallback {
    pub build: Box<dyn FnOnce() -> Result<Box<dyn Backend>, BackendError> + Send>,
    pub limits: Limits,
}

/// Time per token before any batch was measured: none, so nothing is refused for its wait.
const EWMA_WEIGHT: f64 = 0.3;

/// Batches smaller than this do not update the time per token.
const MIN_TIMED_TOKENS: usize = 64;

/// How often the watchdog looks at the running batch, and re-probes a faulty backend.
const WATCH_EVERY: Duration = Duration::from_millis(100);
const PROBE_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct JobOutput {
    pub embedding: Vec<f32>,
    pub queue: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

type Reply = oneshot::Sender<Result<JobOutput, BatchError>>;

struct Job {
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: Reply,
    /// The watchdog's own test batch on a faulty backend: nobody waits for its answer.
    probe: bool,
}

impl Job {
    /// Answers and drops the job if nobody waits for it or it is too late.
    fn still_wanted(self, now: Instant) -> Option<Job> {
        if !self.probe && self.reply.is_closed() {
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

struct State {
    queues: [VecDeque<Job>; 3],
    len: usize,
    /// Tokens queued per priority (for the expected wait).
    tokens: [usize; 3],
    /// Tokens formed into batches and not yet finished (handed over or running).
    in_flight_tokens: usize,
    closed: bool,
    /// Why a worker thread ended without a shutdown request; admission is then refused.
    stopped: Option<String>,
    /// Why the backend is declared faulty; admission answers UNAVAILABLE until a batch succeeds.
    fault: Option<String>,
    consecutive_faults: u32,
    /// The replies owed by each batch formed and not finished (handed over or running), by
    /// batch id: the watchdog and an abort can answer them (UNAVAILABLE) while the batch is
    /// stuck on the backend or behind it; a late result then finds nobody to answer.
    owed: std::collections::BTreeMap<u64, Vec<Reply>>,
    next_batch: u64,
    /// The batch on the backend now, and since when.
    running: Option<(Instant, u64)>,
    probe_queued: bool,
    /// Seconds per token, a moving average over batches.
    secs_per_token: Option<f64>,
    limits: Limits,
    backend_name: &'static str,
}

impl State {
    fn new(limits: Limits, backend_name: &'static str) -> State {
        State {
            queues: Default::default(),
            len: 0,
            tokens: [0; 3],
            in_flight_tokens: 0,
            closed: false,
            stopped: None,
            fault: None,
            consecutive_faults: 0,
            owed: Default::default(),
            next_batch: 0,
            running: None,
            probe_queued: false,
            secs_per_token: None,
            limits,
            backend_name,
        }
    }

    fn pop(&mut self, q: usize) -> Option<Job> {
        let j = self.queues[q].pop_front()?;
        self.len -= 1;
        self.tokens[q] -= j.ids.len();
        Some(j)
    }

    /// Drops queued jobs nobody waits for or whose deadline has passed (answering those), so
    /// they hold no place in a full queue and no share of the expected wait.
    fn purge_departed(&mut self, now: Instant) {
        for q in 0..3 {
            let before = self.queues[q].len();
            let kept: VecDeque<Job> = std::mem::take(&mut self.queues[q])
                .into_iter()
                .filter_map(|j| j.still_wanted(now))
                .collect();
            self.len -= before - kept.len();
            self.tokens[q] = kept.iter().map(|j| j.ids.len()).sum();
            self.queues[q] = kept;
        }
    }

    /// Empties the queues (the caller answers the jobs, outside the lock).
    fn take_all(&mut self) -> Vec<Job> {
        let jobs: Vec<Job> = self.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
        self.len = 0;
        self.tokens = [0; 3];
        self.probe_queued = false;
        metrics::gauge!(m::QUEUE_DEPTH).set(0.0);
        jobs
    }

    /// Every reply owed by a formed batch (the caller answers them, outside the lock).
    fn take_owed(&mut self) -> Vec<Reply> {
        std::mem::take(&mut self.owed)
            .into_values()
            .flatten()
            .collect()
    }

    /// Declares the backend faulty; returns the queued jobs, to be answered UNAVAILABLE.
    fn declare_faulty(&mut self, why: String) -> Vec<Job> {
        if self.fault.is_none() {
            tracing::error!(%why, "backend declared faulty: refusing work until a probe batch succeeds");
        }
        self.fault = Some(why);
        metrics::gauge!(m::BACKEND_HEALTHY).set(0.0);
        self.take_all()
    }
}

fn unavailable(jobs: Vec<Job>, why: &str) {
    for j in jobs {
        let _ = j.reply.send(Err(BatchError::Unavailable(why.to_string())));
    }
}

fn unavailable_replies(replies: Vec<Reply>, why: &str) {
    for r in replies {
        let _ = r.send(Err(BatchError::Unavailable(why.to_string())));
    }
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
        let jobs = st.take_all();
        let owed = st.take_owed();
        drop(st);
        self.shared.ready.notify_all();
        let why = format!("encoder unavailable: {why}");
        unavailable(jobs, &why);
        unavailable_replies(owed, &why);
    }
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    max_consecutive_faults: u32,
    watchdog: Option<Duration>,
    max_queue_delay: Option<Duration>,
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
    device: Device,
    dim: usize,
}

/// A job once it is in a batch: its reply is owed in the shared state (`State::owed`).
struct Meta {
    deadline: Option<Instant>,
    enqueued: Instant,
    probe: bool,
}

/// A batch handed to the backend thread, with its id in `State::owed`.
type Formed = (PackedBatch, Vec<Meta>, u64);

impl Batcher {
    /// Starts the forming and backend threads; an error if the OS refuses a thread.
    pub fn start(backend: Box<dyn Backend>, limits: Limits) -> Result<Batcher, BatchError> {
        Self::start_with(backend, limits, Options::default())
    }

    /// [`Self::start`] with health checks, a wait bound and a fallback.
    pub fn start_with(
        backend: Box<dyn Backend>,
        limits: Limits,
        opts: Options,
    ) -> Result<Batcher, BatchError> {
        let device = backend.device();
        let dim = backend.dim();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(limits, backend.name())),
            ready: Condvar::new(),
            max_consecutive_faults: opts.max_consecutive_faults,
            watchdog: opts.watchdog,
            max_queue_delay: opts.max_queue_delay,
        });
        metrics::gauge!(m::BACKEND_HEALTHY).set(1.0);
        let fallback = opts.fallback;
        let (tx, rx) = sync_channel::<Formed>(1);
        let spawn_err =
            |e: std::io::Error| BatchError::Internal(format!("starting a batcher thread: {e}"));
        let guard = ExitGuard {
            shared: shared.clone(),
            thread: "backend",
        };
        let s = shared.clone();
        let exec = std::thread::Builder::new()
            .name("tiergate-backend".into())
            .spawn(move || {
                let _guard = guard;
                run_batches(&s, backend, fallback, rx)
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
        let mut threads = vec![former, exec];
        if shared.watchdog.is_some() || shared.max_consecutive_faults > 0 {
            let s = shared.clone();
            // Without it nothing notices a hung batch or re-probes a faulty backend; the
            // batcher still serves, so a refused thread is only logged.
            match std::thread::Builder::new()
                .name("tiergate-watchdog".into())
                .spawn(move || watch(&s))
            {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "no watchdog thread"),
            }
        }
        Ok(Batcher {
            shared,
            threads: Mutex::new(threads),
            device,
            dim,
        })
    }

    /// Why the backend is not fit to serve now (declared faulty, or a worker stopped).
    pub fn health(&self) -> Result<(), String> {
        let st = self.shared.lock();
        match (&st.stopped, &st.fault) {
            (Some(why), _) | (None, Some(why)) => Err(why.clone()),
            (None, None) => Ok(()),
        }
    }

    /// The expected wait of a new job of this priority before its batch starts.
    pub fn expected_wait(&self, priority: Priority) -> Duration {
        expected_wait(&self.shared.lock(), priority, Instant::now())
    }

    /// Answers everything queued or running UNAVAILABLE and refuses new work: the end of a
    /// drain that ran out of time. A running batch's result, if it ever comes, is dropped.
    pub fn abort(&self, why: &str) {
        let mut st = self.shared.lock();
        st.closed = true;
        let jobs = st.take_all();
        let running = st.take_owed();
        drop(st);
        self.shared.ready.notify_all();
        unavailable(jobs, why);
        unavailable_replies(running, why);
    }

    /// Why the batcher stopped serving on its own (a worker thread ended), if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().stopped.clone()
    }

    /// The backend serving now (a fallback replaces the first after it failed).
    pub fn backend_name(&self) -> &'static str {
        self.shared.lock().backend_name
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn limits(&self) -> Limits {
        self.shared.lock().limits
    }

    pub fn queue_depth(&self) -> usize {
        self.shared.lock().len
    }

    /// Admits one sequence; answers at once with RESOURCE_EXHAUSTED if the queue is full or
    /// the expected wait is too long, UNAVAILABLE if the backend is faulty or shutting down.
    pub fn submit(
        &self,
        ids: Vec<u32>,
        type_ids: Vec<u32>,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<oneshot::Receiver<Result<JobOutput, BatchError>>, BatchError> {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(BatchError::DeadlineExceeded);
        }
        let (reply, rx) = oneshot::channel();
        let mut st = self.shared.lock();
        let max_tokens = st.limits.max_batch_tokens;
        if ids.is_empty() || ids.len() > max_tokens {
            return Err(BatchError::InvalidInput(format!(
                "sequence of {} tokens cannot be batched (limit {max_tokens})",
                ids.len(),
            )));
        }
        if st.closed {
            return Err(BatchError::Unavailable(match &st.stopped {
                Some(why) => format!("encoder unavailable: {why}"),
                None => "server is shutting down".into(),
            }));
        }
        if let Some(why) = &st.fault {
            return Err(BatchError::Unavailable(format!(
                "encoder unhealthy ({why}); retry on another replica"
            )));
        }
        let now = Instant::now();
        // A wait too long to add to `now` (an estimate gone infinite) misses every deadline
        // rather than panicking.
        let misses_deadline =
            |w: Duration| deadline.is_some_and(|d| now.checked_add(w).is_none_or(|t| t >= d));
        let too_long = |w: Duration| self.shared.max_queue_delay.filter(|&max| w > max);
        let mut wait = expected_wait(&st, priority, now);
        // Before refusing for a full queue or a long wait, drop the work of clients that left
        // or whose deadline passed: it would never be computed, so it holds no place.
        if st.len >= st.limits.max_queue || misses_deadline(wait) || too_long(wait).is_some() {
            st.purge_departed(now);
            wait = expected_wait(&st, priority, now);
            metrics::gauge!(m::QUEUE_DEPTH).set(st.len as f64);
        }
        // The deadline first: the more specific reason.
        if misses_deadline(wait) {
            metrics::counter!(m::DROPPED, "reason" => "deadline_wait", "stage" => "queue")
                .increment(1);
            return Err(BatchError::Overloaded(format!(
                "expected queue wait {} ms exceeds the request's deadline",
                wait.as_millis()
            )));
        }
        if let Some(max) = too_long(wait) {
            metrics::counter!(m::DROPPED, "reason" => "queue_delay", "stage" => "queue")
                .increment(1);
            return Err(BatchError::Overloaded(format!(
                "expected queue wait {} ms exceeds batch.max_queue_delay_ms = {}",
                wait.as_millis(),
                max.as_millis()
            )));
        }
        // A full queue sheds its newest job of a lower priority to make room, if it has one.
        let mut displaced = None;
        if st.len >= st.limits.max_queue {
            let Some(q) = (priority as usize + 1..3)
                .rev()
                .find(|&q| !st.queues[q].is_empty())
            else {
                return Err(BatchError::Overloaded(format!(
                    "queue full ({} waiting); retry with backoff",
                    st.len
                )));
            };
            if let Some(j) = st.queues[q].pop_back() {
                st.len -= 1;
                st.tokens[q] -= j.ids.len();
                displaced = Some(j);
            }
        }
        st.tokens[priority as usize] += ids.len();
        st.queues[priority as usize].push_back(Job {
            ids,
            type_ids,
            deadline,
            enqueued: now,
            reply,
            probe: false,
        });
        st.len += 1;
        metrics::gauge!(m::QUEUE_DEPTH).set(st.len as f64);
        drop(st);
        self.shared.ready.notify_one();
        if let Some(j) = displaced {
            metrics::counter!(m::DROPPED, "reason" => "displaced", "stage" => "queue").increment(1);
            let _ = j.reply.send(Err(BatchError::Overloaded(
                "displaced from a full queue by higher-priority work; retry with backoff".into(),
            )));
        }
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
        let window = self.limits().max_queue.max(1);
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

    /// [`Self::shutdown`], waiting at most `limit`: a thread still running then (a hung
    /// backend) is left behind, so the process can exit. True if every thread ended.
    pub fn shutdown_within(&self, limit: Duration) -> bool {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let t0 = Instant::now();
        while threads.iter().any(|t| !t.is_finished()) && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut all = true;
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                all = false; // detached: dropping the handle does not wait
            }
        }
        all
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Picks the queue to serve next: the front job with the earliest enqueue time plus AGING per
/// level below High (ties to the higher priority). A lower-priority job is served first only
/// once it has waited that much longer than the higher one; under overload, when every front
/// has waited long, the order stays High, Normal, Low rather than turning over.
fn next_queue(st: &State) -> Option<usize> {
    (0..3)
        .filter_map(|q| {
            st.queues[q]
                .front()
                .map(|j| (j.enqueued + AGING * q as u32, q))
        })
        .min()
        .map(|(_, q)| q)
}

/// The tokens that `next_queue` serves before a job of `priority` enqueued at `now` (all of
/// its own and higher priorities; lower ones that waited long enough to go first), and those
/// formed and not finished, at the measured time per token. Zero until a batch has been
/// measured.
fn expected_wait(st: &State, priority: Priority, now: Instant) -> Duration {
    let Some(spt) = st.secs_per_token else {
        return Duration::ZERO;
    };
    let p = priority as usize;
    let mut ahead: usize = st.tokens[..=p].iter().sum::<usize>() + st.in_flight_tokens;
    for q in p + 1..3 {
        // Queues are in enqueue order: the jobs ahead are a prefix.
        let before = now.checked_sub(AGING * (q - p) as u32);
        ahead += st.queues[q]
            .iter()
            .take_while(|j| before.is_some_and(|b| j.enqueued <= b))
            .map(|j| j.ids.len())
            .sum::<usize>();
    }
    Duration::try_from_secs_f64(ahead as f64 * spt).unwrap_or(Duration::MAX)
}

fn form_batches(shared: &Shared, tx: SyncSender<Formed>) {
    loop {
        let mut jobs: Vec<Job> = Vec::new();
        let mut tokens = 0usize;
        let formed = {
            let mut st = shared.lock();
            while st.len == 0 && !st.closed {
                st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.len == 0 && st.closed {
                return; // dropping tx ends the backend thread
            }
            let now = Instant::now();
            let lim = st.limits;
            while jobs.len() < lim.max_batch_requests {
                let Some(q) = next_queue(&st) else { break };
                let fits = st.queues[q]
                    .front()
                    .is_some_and(|j| tokens + j.ids.len() <= lim.max_batch_tokens);
                if !fits {
                    break;
                }
                let Some(job) = st.pop(q) else {
                    break;
                };
                if let Some(job) = job.still_wanted(now) {
                    tokens += job.ids.len();
                    jobs.push(job);
                }
            }
            metrics::gauge!(m::QUEUE_DEPTH).set(st.len as f64);
            if jobs.is_empty() {
                continue;
            }
            let batch = pack(&jobs);
            let id = st.next_batch;
            st.next_batch += 1;
            st.in_flight_tokens += tokens;
            let (metas, replies): (Vec<Meta>, Vec<Reply>) = jobs
                .into_iter()
                .map(|j| {
                    let meta = Meta {
                        deadline: j.deadline,
                        enqueued: j.enqueued,
                        probe: j.probe,
                    };
                    (meta, j.reply)
                })
                .unzip();
            st.owed.insert(id, replies);
            (batch, metas, id)
        };
        if let Err(e) = tx.send(formed) {
            // The backend thread is gone: nobody will answer this batch but us.
            let owed = shared.lock().owed.remove(&e.0 .2).unwrap_or_default();
            unavailable_replies(owed, "encoder unavailable: the backend thread stopped");
            return;
        }
    }
}

/// The sequences of `keep` (indices into `b`), packed again.
fn repack(b: &PackedBatch, keep: &[usize]) -> PackedBatch {
    let mut out = PackedBatch::new();
    for &i in keep {
        let r = b.seq(i);
        out.push(&b.ids[r.clone()], &b.type_ids[r]);
    }
    out
}

fn pack(jobs: &[Job]) -> PackedBatch {
    let mut b = PackedBatch::new();
    for j in jobs {
        b.push(&j.ids, &j.type_ids);
    }
    b
}

/// How a batch went wrong on the backend's side (the `kind` of `tiergate_backend_faults_total`).
fn fault_kind(e: &BackendError, panicked: bool) -> Option<&'static str> {
    match e {
        BackendError::InvalidBatch(_) => None,
        _ if panicked => Some("panic"),
        _ => Some("error"),
    }
}

fn run_batches(
    shared: &Shared,
    mut backend: Box<dyn Backend>,
    mut fallback: Option<Fallback>,
    rx: Receiver<Formed>,
) {
    let dim = backend.dim();
    for (batch, metas, id) in rx {
        let formed_tokens = batch.tokens();
        let probe = metas.iter().any(|m| m.probe);
        // Clients may have left, or deadlines passed, while this batch waited for the backend;
        // an abort may have answered it already.
        let now = Instant::now();
        let mut st = shared.lock();
        let replies = st.owed.remove(&id).unwrap_or_default();
        let (mut keep, mut kept) = (Vec::new(), Vec::new());
        for (i, (meta, reply)) in metas.iter().zip(replies).enumerate() {
            if !meta.probe && reply.is_closed() {
                metrics::counter!(m::DROPPED, "reason" => "client_gone", "stage" => "queue")
                    .increment(1);
                continue;
            }
            if meta.deadline.is_some_and(|d| d <= now) {
                metrics::counter!(m::DROPPED, "reason" => "deadline", "stage" => "queue")
                    .increment(1);
                let _ = reply.send(Err(BatchError::DeadlineExceeded));
                continue;
            }
            keep.push(i);
            kept.push(reply);
        }
        if kept.is_empty() {
            st.in_flight_tokens -= formed_tokens;
            if probe {
                st.probe_queued = false;
            }
            continue;
        }
        let batch = if keep.len() == metas.len() {
            batch
        } else {
            repack(&batch, &keep)
        };
        let enqueued: Vec<Instant> = keep.iter().map(|&i| metas[i].enqueued).collect();
        let t0 = Instant::now();
        st.owed.insert(id, kept);
        st.running = Some((t0, id));
        drop(st);
        metrics::histogram!(m::BATCH_SIZE).record(keep.len() as f64);
        metrics::histogram!(m::BATCH_TOKENS).record(batch.tokens() as f64);
        let mut result = embed_once(&mut *backend, &batch, dim);
        // Failed batches in a row are counted; past the limit a fallback takes over (and this
        // batch runs again on it) or the backend is declared faulty.
        if let Some(kind) = failure(&result) {
            metrics::counter!(m::BACKEND_FAULTS, "kind" => kind).increment(1);
            let mut st = shared.lock();
            st.consecutive_faults += 1;
            let tripped = shared.max_consecutive_faults > 0
                && st.consecutive_faults >= shared.max_consecutive_faults;
            drop(st);
            if let Some(fb) = fallback.take_if(|_| tripped) {
                match (fb.build)() {
                    Ok(b) => {
                        tracing::error!(
                            from = backend.name(),
                            to = b.name(),
                            "the backend failed {} batches in a row; falling back",
                            shared.max_consecutive_faults
                        );
                        metrics::counter!(m::BACKEND_FALLBACK, "reason" => "runtime_fault")
                            .increment(1);
                        backend = b;
                        let mut st = shared.lock();
                        st.backend_name = backend.name();
                        st.limits = fb.limits;
                        st.consecutive_faults = 0;
                        drop(st);
                        result = embed_once(&mut *backend, &batch, dim);
                        if let Some(kind) = failure(&result) {
                            metrics::counter!(m::BACKEND_FAULTS, "kind" => kind).increment(1);
                            shared.lock().consecutive_faults += 1;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the fallback backend failed to start")
                    }
                }
            }
        }
        let inference = t0.elapsed();
        metrics::histogram!(m::INFERENCE_SECONDS).record(inference.as_secs_f64());
        let mut st = shared.lock();
        st.in_flight_tokens -= formed_tokens;
        st.running = None;
        let replies = st.owed.remove(&id).unwrap_or_default();
        if probe {
            st.probe_queued = false;
        }
        let mut to_refuse = Vec::new();
        match failure(&result) {
            None if result.is_ok() => {
                // Tiny batches (warm-up, probes, a lone short request) are mostly fixed cost
                // and, the first one, lazy initialisation: their time per token would make
                // admission think a queue of real batches is many times longer than it is.
                // (At most the budget: a smaller one would never time a batch.)
                if batch.tokens() >= MIN_TIMED_TOKENS.min(st.limits.max_batch_tokens) {
                    let spt = inference.as_secs_f64() / batch.tokens() as f64;
                    st.secs_per_token = Some(match st.secs_per_token {
                        Some(old) => old + EWMA_WEIGHT * (spt - old),
                        None => spt,
                    });
                }
                st.consecutive_faults = 0;
                if let Some(why) = st.fault.take() {
                    tracing::warn!(%why, "backend recovered: a batch succeeded");
                    metrics::gauge!(m::BACKEND_HEALTHY).set(1.0);
                }
            }
            Some(_)
                if shared.max_consecutive_faults > 0
                    && st.consecutive_faults >= shared.max_consecutive_faults =>
            {
                let why = format!("{} failed batches in a row", st.consecutive_faults);
                to_refuse = st.declare_faulty(why);
            }
            _ => {}
        }
        drop(st);
        unavailable(to_refuse, "encoder unhealthy; retry on another replica");
        // Empty when the watchdog or an abort already answered them.
        let size = replies.len();
        match result {
            Ok(emb) => {
                for ((reply, e), enq) in
                    replies.into_iter().zip(emb.chunks_exact(dim)).zip(enqueued)
                {
                    if e.iter().any(|v| !v.is_finite()) {
                        let _ = reply.send(Err(BatchError::Backend(
                            "the encoder produced a non-finite embedding".into(),
                        )));
                        continue;
                    }
                    let queue = t0.duration_since(enq);
                    metrics::histogram!(m::QUEUE_SECONDS).record(queue.as_secs_f64());
                    let _ = reply.send(Ok(JobOutput {
                        embedding: e.to_vec(),
                        queue,
                        inference,
                        batch_size: size,
                    }));
                }
            }
            Err((e, _)) => {
                tracing::error!(error = %e, jobs = size, "batch failed");
                for r in replies {
                    let _ = r.send(Err(e.clone()));
                }
            }
        }
    }
}

type Embedded = Result<Vec<f32>, (BatchError, Option<&'static str>)>;

/// One batch on the backend: a panic is this batch's error, a wrong output size a fault.
fn embed_once(backend: &mut dyn Backend, batch: &PackedBatch, dim: usize) -> Embedded {
    let (out, panicked) = match catch_unwind(AssertUnwindSafe(|| backend.embed(batch))) {
        Ok(r) => (r, false),
        Err(_) => (Err(BackendError::Fault("backend panicked".into())), true),
    };
    let emb = out.map_err(|e| {
        let kind = fault_kind(&e, panicked);
        (BatchError::from(e), kind)
    })?;
    if emb.len() != batch.len() * dim {
        return Err((
            BatchError::Backend(format!(
                "backend returned {} floats for {} x {dim}",
                emb.len(),
                batch.len()
            )),
            Some("output_size"),
        ));
    }
    Ok(emb)
}

/// The fault kind of a batch that failed on the backend's side. Non-finite output counts: its
/// requests are refused (the others of the batch still served), and a backend that keeps
/// producing it is declared faulty.
fn failure(r: &Embedded) -> Option<&'static str> {
    match r {
        Err((_, kind)) => *kind,
        Ok(emb) if emb.iter().any(|v| !v.is_finite()) => Some("nan"),
        Ok(_) => None,
    }
}

/// The watchdog: declares a batch running past the limit hung (its requests and the queue
/// are answered UNAVAILABLE), and puts a probe batch through a faulty backend so a recovery
/// is noticed without client traffic.
fn watch(shared: &Shared) {
    let mut last_probe = Instant::now();
    loop {
        std::thread::sleep(WATCH_EVERY);
        let mut st = shared.lock();
        if st.closed {
            return;
        }
        let mut refuse = Vec::new();
        let mut replies = Vec::new();
        if let (Some(limit), Some((since, id))) = (shared.watchdog, st.running) {
            let owed = st.owed.get(&id).is_some_and(|r| !r.is_empty());
            if owed && since.elapsed() > limit {
                // The batches formed behind the hung one (handed over, or held by the forming
                // thread) would wait on it as long: they are answered too.
                replies = st.take_owed();
                metrics::counter!(m::BACKEND_FAULTS, "kind" => "hang").increment(1);
                refuse = st.declare_faulty(format!(
                    "a batch ran past the watchdog ({} ms)",
                    limit.as_millis()
                ));
            }
        }
        let probe = st.fault.is_some()
            && st.running.is_none()
            && !st.probe_queued
            && last_probe.elapsed() >= PROBE_EVERY;
        if probe {
            let ids: Vec<u32> = vec![101, 7592, 2088, 102];
            let (reply, _) = oneshot::channel();
            st.tokens[0] += ids.len();
            st.queues[0].push_back(Job {
                type_ids: vec![0; ids.len()],
                ids,
                deadline: None,
                enqueued: Instant::now(),
                reply,
                probe: true,
            });
            st.len += 1;
            st.probe_queued = true;
            last_probe = Instant::now();
        }
        drop(st);
        if probe {
            shared.ready.notify_one();
        }
        let why = "encoder unhealthy: a batch hung; retry on another replica";
        unavailable(refuse, why);
        unavailable_replies(replies, why);
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
            probe: false,
        };
        (j, rx)
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::new(
                Limits {
                    max_batch_tokens: 64,
                    max_batch_requests: 4,
                    max_queue: 8,
                },
                "test",
            )),
            ready: Condvar::new(),
            max_consecutive_faults: 0,
            watchdog: None,
            max_queue_delay: None,
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

    /// Queues fronted by jobs enqueued `ago` before now, one per priority (None: empty).
    fn fronts(ago: [Option<u64>; 3]) -> (Arc<Shared>, Instant) {
        let shared = shared();
        let now = Instant::now();
        for (q, ms) in ago.iter().enumerate() {
            if let Some(ms) = ms {
                let (mut j, _) = job(q as u32);
                j.enqueued = now - Duration::from_millis(*ms);
                let mut st = shared.lock();
                st.tokens[q] += j.ids.len();
                st.queues[q].push_back(j);
                st.len += 1;
            }
        }
        (shared, now)
    }

    #[test]
    fn priorities_age_without_turning_over() {
        let pick = |ago| next_queue(&fronts(ago).0.lock());
        // Under overload every front has waited long: the oldest level-adjusted one goes,
        // never Low merely for having aged (it used to be served first).
        assert_eq!(pick([None, Some(2000), Some(300)]), Some(1));
        assert_eq!(pick([Some(0), Some(2000), Some(2100)]), Some(1));
        assert_eq!(pick([Some(0), None, Some(400)]), Some(0));
        // A Low job that waited more than two AGING longer than High goes first.
        assert_eq!(pick([Some(0), None, Some(600)]), Some(2));
        assert_eq!(pick([Some(100), Some(300), None]), Some(0));
        assert_eq!(pick([Some(100), Some(400), None]), Some(1));
        assert_eq!(pick([None, None, None]), None);
    }

    #[test]
    fn the_expected_wait_counts_lower_jobs_that_go_first() {
        let (shared, now) = fronts([Some(0), Some(0), Some(600)]);
        let mut st = shared.lock();
        st.secs_per_token = Some(1.0);
        let tokens = |d: Duration| d.as_secs_f64().round() as usize;
        // High waits for High and for the Low job older than two AGING, not for Normal.
        assert_eq!(tokens(expected_wait(&st, Priority::High, now)), 6);
        assert_eq!(tokens(expected_wait(&st, Priority::Normal, now)), 9);
        assert_eq!(tokens(expected_wait(&st, Priority::Low, now)), 9);
        st.in_flight_tokens = 4;
        assert_eq!(tokens(expected_wait(&st, Priority::High, now)), 10);
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
