//! The WordPiece reference that the GPU tokenizer mirrors (model::wordpiece) against the
//! `tokenizers` crate on real prompts and answers: the same ids for every ASCII text.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tiergate::model::tokenize::TextTokenizer;
use tiergate::model::wordpiece::WordPieceTable;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn ascii_wordpiece_equals_the_tokenizers_crate_on_dev_prompts_and_answers() {
    let path = root().join("models/base/tokenizer.json");
    let table = WordPieceTable::from_file(&path).expect("run scripts/setup-model.sh");
    let hf = TextTokenizer::from_file(&path, 512, 512)
        .unwrap()
        .crate_only();
    let rows = tiergate::eval::data::read_rows(&root().join("../shared/data/dev.jsonl.gz"))
        .expect("../shared/data/dev.jsonl.gz");
    let mut seen = HashSet::new();
    let (mut checked, mut declined, mut tokens) = (0usize, 0usize, 0usize);
    for r in &rows {
        for text in [Some(r.prompt.as_str()), r.response.as_deref()]
            .into_iter()
            .flatten()
        {
            if !seen.insert(text) {
                continue;
            }
            let Some(ours) = table.encode_ascii(text) else {
                declined += 1;
                continue;
            };
            let want = hf.raw_ids(text).unwrap();
            assert_eq!(ours, want, "text: {text:?}");
            checked += 1;
            tokens += ours.len();
        }
    }
    println!("{checked} ASCII texts ({tokens} tokens) equal; {declined} left to tokenizers");
    // Most of the data is ASCII: the GPU path must cover it, or it is pointless.
    assert!(
        checked > 4 * declined && checked > 5000,
        "{checked} vs {declined}"
    );
}

#[test]
fn edge_texts_equal_the_tokenizers_crate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/base/tokenizer.json");
    let table = WordPieceTable::from_file(&path).expect("run scripts/setup-model.sh");
    let hf = TextTokenizer::from_file(&path, 512, 512)
        .unwrap()
        .crate_only();
    let long = "x".repeat(100) + " " + &"y".repeat(101);
    for text in [
        "",
        "   ",
        "Hello,World!!",
        "a\u{1}b\u{7f}c\u{b}d\u{c}e",
        "tab\tnew\nline\rcr",
        "x__y--z...",
        "ISN'T it 3.14159?",
        "unaffable transformers tokenization",
        "#include <stdio.h>\nint main(){return 0;}",
        long.as_str(),
        "qqqqqqqqzzzzzzzkkkkk",
    ] {
        let want = hf.raw_ids(text).unwrap();
        assert_eq!(table.encode_ascii(text), Some(want), "text: {text:?}");
    }
}

/// The service's tokenizer takes the ASCII fast path: what it encodes (truncation, pairs,
/// special tokens) is what the tokenizers crate alone gives, on real prompts and answers.
#[test]
fn text_tokenizer_with_the_fast_path_encodes_like_the_crate() {
    use tiergate::model::tokenize::TruncSide;
    let path = root().join("models/base/tokenizer.json");
    let fast = TextTokenizer::from_file(&path, 256, 384).unwrap();
    assert!(fast.has_fast_path());
    let slow = TextTokenizer::from_file(&path, 256, 384)
        .unwrap()
        .crate_only();
    let rows = tiergate::eval::data::read_rows(&root().join("../shared/data/dev.jsonl.gz"))
        .expect("../shared/data/dev.jsonl.gz");
    let same = |a: &tiergate::model::tokenize::Encoded, b: &tiergate::model::tokenize::Encoded| {
        a.ids == b.ids
            && a.type_ids == b.type_ids
            && a.truncated == b.truncated
            && a.full_len == b.full_len
    };
    for r in rows.iter().step_by(7).take(3000) {
        let answer = r.response.as_deref().unwrap_or("");
        for side in [TruncSide::HeadTail, TruncSide::Tail] {
            let (x, y) = (
                fast.encode_single(&r.prompt, side).unwrap(),
                slow.encode_single(&r.prompt, side).unwrap(),
            );
            assert!(same(&x, &y), "{:?}", r.prompt);
        }
        let (x, y) = (
            fast.encode_answer(answer, 128).unwrap(),
            slow.encode_answer(answer, 128).unwrap(),
        );
        assert!(same(&x, &y), "{answer:?}");
        let (x, y) = (
            fast.encode_pair(&r.prompt, answer).unwrap(),
            slow.encode_pair(&r.prompt, answer).unwrap(),
        );
        assert!(same(&x, &y), "{:?}", r.prompt);
    }
}
