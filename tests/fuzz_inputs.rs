//! Fuzzing of what a client controls, on stable Rust and in every test run: seeded random
//! texts built from the pieces the parsers look for (option lines, `answer is`, `####`,
//! `\boxed{`, brackets, digits, multi-byte and control characters, long runs) through the
//! answer parsers, the verifier's form features and the tokenizer. Each must return, never
//! panic, and keep its invariants (features finite, token limits held). A failing case
//! prints its seed and text.
//!
//! Beside it, proptest targets (seeded, shrinking) for the rest of what a client or a file
//! controls: heads, overlay and config files (fuzz/files.rs), WordPiece against the
//! `tokenizers` crate, truncation and grpc-timeout (fuzz/tokens.rs), and whole Route / Verify
//! requests against a running server (fuzz/requests.rs). `TIERGATE_FUZZ_CASES=N` runs N
//! inputs per target instead of the defaults (README "Fuzzing").
use std::path::Path;

use tiergate::model::answer::{chosen, final_answer, options, text_features};
use tiergate::model::heads::form_features;
use tiergate::model::{TextTokenizer, TruncSide};

mod common;
#[path = "fuzz/engine.rs"]
mod engine;
#[path = "fuzz/files.rs"]
mod files;
#[path = "fuzz/requests.rs"]
mod requests;
#[path = "fuzz/tokens.rs"]
mod tokens;

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "A) ",
    "B. ",
    "(C) ",
    "J) ",
    "Options: [\"1\", \"2\", \"x\"",
    "Options: [",
    "]",
    "Answer: B\n",
    "answer is",
    "The answer is (",
    "answer:",
    "####",
    "\\boxed{",
    "}",
    "**",
    "$",
    "(",
    ")",
    "[",
    "{",
    " ",
    "\n",
    "\r\n",
    "\t",
    "\0",
    "\u{7f}",
    "-",
    ".",
    ",",
    "0",
    "7",
    "42",
    "-3.50",
    "1,200",
    "é",
    "ß",
    "漢字",
    "🙂",
    "\u{200b}",
    "\u{fffd}",
    "a",
    "Z",
    "the",
    "I think",
    "A good",
];

fn text(rng: &mut Rng) -> String {
    let mut s = String::new();
    let parts = rng.below(60);
    for _ in 0..parts {
        let p = PIECES[rng.below(PIECES.len())];
        // Now and then a long run of one piece (repetition, deep nesting, huge numbers).
        let times = if rng.below(20) == 0 {
            1 + rng.below(200)
        } else {
            1
        };
        for _ in 0..times {
            s.push_str(p);
        }
    }
    s
}

#[test]
fn client_text_never_panics_the_parsers_or_the_tokenizer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = TextTokenizer::from_file(&root.join("models/base/tokenizer.json"), 256, 512)
        .expect("tokenizer (run scripts/setup-model.sh)");
    let mut rng = Rng(0x7469_6572_6761_7465);
    let n = engine::cases(5000);
    for case in 0..n {
        let seed = rng.0;
        let (prompt, answer) = (text(&mut rng), text(&mut rng));
        let ctx = || format!("case {case} seed {seed:#x}: prompt {prompt:?} answer {answer:?}");
        let opts = options(&prompt);
        assert!(opts.len() <= 1 << 16, "{}", ctx());
        let (pick, distinct) = chosen(&answer);
        assert!(pick.is_none() || distinct >= 1, "{}", ctx());
        if let Some(k) = final_answer(&prompt, &answer) {
            assert!(
                k.starts_with("option:") || k.starts_with("number:"),
                "{k}: {}",
                ctx()
            );
        }
        assert!(
            text_features(&prompt, &answer)
                .iter()
                .all(|x| x.is_finite()),
            "{}",
            ctx()
        );
        let form = form_features(&answer, prompt.chars().count(), rng.below(2) == 0);
        assert!(form.iter().all(|x| x.is_finite()), "{}", ctx());
        for side in [TruncSide::HeadTail, TruncSide::Head] {
            if let Ok(e) = tok.encode_single(&prompt, side) {
                assert!(e.ids.len() <= 256, "{} ids: {}", e.ids.len(), ctx());
            }
        }
        if let Ok(e) = tok.encode_answer(&answer, 128) {
            assert!(e.ids.len() <= 128, "{} ids: {}", e.ids.len(), ctx());
        }
    }
    println!("fuzz answer_parsers_and_tokenizer: {n} inputs, 0 crashes");
}
