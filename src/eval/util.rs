//! Seeded hashing and the row filters every offline command shares.
#![forbid(unsafe_code)]
use std::hash::{Hash, Hasher};

/// Deterministic 64-bit mix (splitmix64): seeded shuffles and splits without a rand crate.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

pub fn hash_str(seed: u64, s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    mix(h.finish() ^ seed)
}

/// Outputs built to flatter a judge (AlpacaEval's gamed, verbose and concise variants): the
/// verifier does not learn from them, so it cannot learn to love them.
pub fn judge_gaming(model: &str) -> bool {
    model == "gpt4_gamed" || model.ends_with("_verbose") || model.ends_with("_concise")
}
