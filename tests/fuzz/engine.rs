//! What every proptest target shares: a fixed seed per target (CI runs the same inputs every
//! time), the case count from `TIERGATE_FUZZ_CASES` (to run longer), no failure files, and a
//! count of the inputs tried, printed per target.
use std::cell::Cell;
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases per target when set (every target, this binary); else each target's default.
pub const ENV: &str = "TIERGATE_FUZZ_CASES";

pub fn cases(default: u32) -> u32 {
    match std::env::var(ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{ENV}={v:?} is not a count")),
        Err(_) => default,
    }
}

/// Runs `test` on `cases(default)` inputs drawn from `strategy`; a failure or a panic in the
/// code under test is shrunk to a small input and fails the test with it.
pub fn run<S>(
    name: &str,
    default: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let n = cases(default);
    // FNV-1a of the name, spread over the seed: each target its own fixed stream.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut seed = [0u8; 32];
    for (i, c) in seed.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(h.rotate_left(16 * i as u32) ^ i as u64).to_le_bytes());
    }
    let config = Config {
        cases: n,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let tried = Cell::new(0u64);
    let t0 = Instant::now();
    let res = runner.run(&strategy, |v| {
        tried.set(tried.get() + 1);
        test(v)
    });
    match res {
        Ok(()) => println!(
            "fuzz {name}: {} inputs, 0 crashes ({:.1} s)",
            tried.get(),
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => panic!(
            "fuzz {name}: failed ({} inputs run, seeded): {e}",
            tried.get()
        ),
    }
}
