//! A backend that injects faults, for tests of what the server does when its encoder fails:
//! the CPU backend, except that each batch first reads a control file and obeys it. Chosen
//! with `backend = "fault"`, which the configuration accepts only while
//! `TIERGATE_FAULT_INJECTION` names the control file, so it cannot be switched on by a config
//! file alone. The file holds one word (re-read every batch):
//!
//! | content        | each batch                                                      |
//! |----------------|-----------------------------------------------------------------|
//! | `ok`, empty, or no file | computes normally                                      |
//! | `error`        | fails (`BackendError::Fault`)                                   |
//! | `panic`        | panics                                                          |
//! | `hang`         | blocks until the file says something else, then obeys that     |
//! | `slow:<ms>`    | sleeps `<ms>` ms, then computes                                 |
//! | `nan`          | computes, with NaN in the first sequence's embedding            |
#![forbid(unsafe_code)]
use std::path::PathBuf;
use std::time::Duration;

use crate::base::{Backend, BackendError, Device, PackedBatch};

/// The environment variable naming the control file; without it `backend = "fault"` is refused.
pub const ENV: &str = "TIERGATE_FAULT_INJECTION";

/// With `TIERGATE_FAULT_FALLBACK=cpu` the fault backend gets a CPU fallback, as `auto` gives
/// CUDA one (tests of the run-time fallback without a GPU).
pub const FALLBACK_ENV: &str = "TIERGATE_FAULT_FALLBACK";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Error,
    Panic,
    Hang,
    Slow(u64),
    Nan,
}

pub struct FaultBackend {
    inner: Box<dyn Backend>,
    control: PathBuf,
}

impl FaultBackend {
    pub fn new(inner: Box<dyn Backend>, control: PathBuf) -> Self {
        FaultBackend { inner, control }
    }

    fn mode(&self) -> Result<Mode, BackendError> {
        let text = match std::fs::read_to_string(&self.control) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Mode::Ok),
            Err(e) => return Err(BackendError::Fault(format!("fault control file: {e}"))),
        };
        let word = text.trim();
        Ok(match word {
            "" | "ok" => Mode::Ok,
            "error" => Mode::Error,
            "panic" => Mode::Panic,
            "hang" => Mode::Hang,
            "nan" => Mode::Nan,
            w => match w.strip_prefix("slow:").and_then(|ms| ms.parse().ok()) {
                Some(ms) => Mode::Slow(ms),
                None => {
                    return Err(BackendError::Fault(format!(
                        "fault control file: unknown mode {:?}",
                        w.chars().take(32).collect::<String>()
                    )))
                }
            },
        })
    }
}

impl Backend for FaultBackend {
    fn name(&self) -> &'static str {
        "fault"
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn max_seq_len(&self) -> usize {
        self.inner.max_seq_len()
    }
    fn numerics(&self) -> &'static str {
        self.inner.numerics()
    }
    fn embed(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, BackendError> {
        let mut mode = self.mode()?;
        while mode == Mode::Hang {
            std::thread::sleep(Duration::from_millis(20));
            mode = self.mode()?;
        }
        match mode {
            Mode::Error => Err(BackendError::Fault("injected fault".into())),
            Mode::Panic => panic!("injected panic"),
            Mode::Slow(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                self.inner.embed(batch)
            }
            Mode::Nan => {
                let mut out = self.inner.embed(batch)?;
                let d = self.inner.dim().min(out.len());
                out[..d].fill(f32::NAN);
                Ok(out)
            }
            Mode::Ok | Mode::Hang => self.inner.embed(batch),
        }
    }
}
