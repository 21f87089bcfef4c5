//! Seeded hashing and the row filters every offline command shares.
#![forbid(unsafe_code)]

/// Deterministic 64-bit mix (splitmix64): seeded shuffles and splits without a rand crate.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

pub fn hash_str(seed: u64, s: &str) -> u64 {
    mix(str_hash(s) ^ seed)
}

/// Which half (0 or 1) of a traffic's prompts `prompt_id` falls in: the halves `consensus`
/// cross-fits over and `calibrate` recommends a Route floor over.
pub fn half_of(prompt_id: &str) -> usize {
    (hash_str(0x6861_6c66, prompt_id) & 1) as usize
}

/// What `s.hash(&mut DefaultHasher::new())` gave when the committed splits, folds and figures
/// were made (SipHash-1-3, zero keys, over the bytes and a 0xff terminator), written out here
/// because std may change DefaultHasher's algorithm between releases: a Rust upgrade must not
/// move a training split, a calibration fold or a cache key.
pub fn str_hash(s: &str) -> u64 {
    let mut st = Sip13::default();
    st.write(s.as_bytes());
    st.write(&[0xff]);
    st.finish()
}

/// SipHash-1-3 with keys (0, 0), streaming.
struct Sip13 {
    v: [u64; 4],
    tail: u64,
    ntail: usize,
    len: usize,
}

impl Default for Sip13 {
    fn default() -> Self {
        Sip13 {
            v: [
                0x736f_6d65_7073_6575,
                0x646f_7261_6e64_6f6d,
                0x6c79_6765_6e65_7261,
                0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            len: 0,
        }
    }
}

impl Sip13 {
    fn round(&mut self) {
        let v = &mut self.v;
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    fn block(&mut self, m: u64) {
        self.v[3] ^= m;
        self.round();
        self.v[0] ^= m;
    }

    fn write(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        for &b in bytes {
            self.tail |= u64::from(b) << (8 * self.ntail);
            self.ntail += 1;
            if self.ntail == 8 {
                let m = self.tail;
                self.block(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
    }

    fn finish(mut self) -> u64 {
        let b = ((self.len as u64 & 0xff) << 56) | self.tail;
        self.block(b);
        self.v[2] ^= 0xff;
        for _ in 0..3 {
            self.round();
        }
        self.v.iter().fold(0, |a, x| a ^ x)
    }
}

/// Outputs built to flatter a judge (AlpacaEval's gamed, verbose and concise variants): the
/// replay leaves them out of its tiers, and the model card reports how far the verifier
/// over-rates them.
pub fn judge_gaming(model: &str) -> bool {
    model == "gpt4_gamed" || judge_biased(model)
}

/// Outputs whose grade rides the judge's length bias (the verbose and concise variants): the
/// verifier does not learn from them, so it cannot learn to love them. `gpt4_gamed`'s outputs,
/// ten-character heads of answers that the judge failed (score 0.02 on dev), are graded
/// honestly and are what a verifier must learn to fail: it trains on them.
pub fn judge_biased(model: &str) -> bool {
    model.ends_with("_verbose") || model.ends_with("_concise")
}

#[cfg(test)]
mod tests {
    /// The values every committed split, fold and figure was made with (checked, when this
    /// was written, against std's DefaultHasher for every length 1..300 and multi-byte text).
    #[test]
    fn string_hashes_stay_what_the_figures_were_made_with() {
        for (s, raw, seeded) in [
            ("", 0x3040_6ea5_23c5_3def_u64, 0x1f33_4d70_80d8_e912_u64),
            ("mmlu_pro/100", 0xd8cf_2317_02e1_2175, 0x07c6_d5ce_9ecd_2a35),
            (
                "routerbench_0shot/arc-challenge.test.0",
                0x0ff1_0522_e891_3797,
                0x2e54_2b06_620a_a143,
            ),
            (
                "héllo wörld ✓",
                0x0802_75f8_4867_c39b,
                0xe6d9_af57_4694_ab7f,
            ),
        ] {
            assert_eq!(super::str_hash(s), raw, "{s:?}");
            assert_eq!(super::hash_str(0x5eed, s), seeded, "{s:?}");
        }
    }
}
