//! Text paths: the WordPiece table (the GPU tokenizer's reference) against the `tokenizers`
//! crate, the GPU path's pack / per-byte / stitch layout, the service tokenizer's truncation
//! invariants on any Unicode text, and grpc-timeout parsing.
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use tiergate::model::wordpiece::WordPieceTable;
use tiergate::model::{Encoded, TextTokenizer, TruncSide};
use tiergate::server::parse_grpc_timeout;

fn tokenizer_json() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/base/tokenizer.json")
}

fn table() -> &'static WordPieceTable {
    static T: OnceLock<WordPieceTable> = OnceLock::new();
    T.get_or_init(|| {
        WordPieceTable::from_file(&tokenizer_json()).expect("run scripts/setup-model.sh")
    })
}

/// (fast path, `tokenizers` only), both at `max` tokens: small limits make truncation common.
fn tokenizers(max: usize) -> (TextTokenizer, TextTokenizer) {
    let t = || TextTokenizer::from_file(&tokenizer_json(), max, max + 16).expect("tokenizer");
    (t(), t().crate_only())
}

/// ASCII text as prompts have it: words, numbers, punctuation, whitespace and control bytes,
/// long words (past WordPiece's 100 characters), and the special tokens' spellings.
fn ascii_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,200}",
        "[\\x00-\\x7f]{0,120}",
        "([a-z]{1,12}|[A-Z][a-z]{0,8}|[0-9]{1,6}|[!-/:-@\\[-`{-~]|[ \t\n\r]{1,3}|##|\\[UNK\\]|\\[CLS\\]){0,60}",
        "[a-zA-Z]{90,130}( [a-z]{1,5}){0,3}",
    ]
}

/// Any Unicode, and text mixing ASCII words with accents, CJK, emoji, combining marks and
/// zero-width characters (the `tokenizers` crate's normalizer path).
fn unicode_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "([a-z]{1,10}|[àéîõüßçñ]{1,4}|[漢字文本]{1,3}|[🙂🚀]|\u{301}|\u{200b}|\u{fffd}|[ \n]|[0-9]{1,4}|[.,!?]){0,80}",
        ascii_text(),
    ]
}

#[test]
fn wordpiece_equals_the_tokenizers_crate_on_generated_ascii() {
    let (_, hf) = tokenizers(512);
    let t = table();
    super::engine::run("wordpiece_vs_tokenizers", 3000, ascii_text(), |text| {
        let want = hf
            .raw_ids(&text)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        match t.encode_ascii(&text) {
            Some(ours) => prop_assert_eq!(ours, want),
            // Declined only for what the GPU path leaves to the crate: added tokens.
            None => prop_assert!(!t.accepts(&text)),
        }
        Ok(())
    });
}

/// The GPU kernel's layout, computed on the CPU: texts packed into one buffer, each byte's
/// word tokens written at that byte, gathered back per text = each text's own ids.
#[test]
fn packed_per_byte_tokens_stitch_back_to_each_text() {
    let t = table();
    let texts = prop::collection::vec(ascii_text(), 1..6);
    super::engine::run("wordpiece_pack_stitch", 1000, texts, |texts| {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (buf, spans) = t.pack(&refs);
        let mut ids = vec![0u32; buf.len() + 1];
        let mut counts = vec![0u8; buf.len()];
        for i in 0..buf.len() {
            let w = t.word_at(&buf, i);
            prop_assert!(w.len() <= 255, "{} tokens at byte {i}", w.len());
            prop_assert!(i + w.len() <= ids.len(), "tokens overrun the buffer at {i}");
            ids[i..i + w.len()].copy_from_slice(&w);
            counts[i] = w.len() as u8;
        }
        let got = WordPieceTable::stitch(&spans, &ids, &counts);
        prop_assert_eq!(got.len(), refs.len());
        for (text, g) in refs.iter().zip(got) {
            prop_assert_eq!(g, t.encode_ascii(text), "text {:?}", text);
        }
        Ok(())
    });
}

/// `[CLS] … [SEP]` within `limit`, truncation reported exactly, kept tokens a head and a
/// tail of the full encoding in order.
fn check_limited(
    e: &Encoded,
    raw: &[u32],
    limit: usize,
    ends: (u32, u32),
) -> Result<(), TestCaseError> {
    let n = e.ids.len();
    prop_assert!(n >= 2 && n <= limit, "{n} ids, limit {limit}");
    prop_assert_eq!((e.ids[0], e.ids[n - 1]), ends);
    prop_assert_eq!(e.type_ids.len(), n);
    prop_assert_eq!(e.full_len, raw.len() + 2);
    prop_assert_eq!(e.truncated, e.full_len > limit);
    let body = &e.ids[1..n - 1];
    if !e.truncated {
        prop_assert_eq!(body, raw);
    } else {
        prop_assert_eq!(body.len(), limit - 2);
        // Some split of the body is a prefix and a suffix of the raw ids.
        prop_assert!(
            (0..=body.len()).any(|h| raw.starts_with(&body[..h]) && raw.ends_with(&body[h..])),
            "kept tokens are not a head and a tail"
        );
    }
    Ok(())
}

#[test]
fn tokenizer_truncation_holds_its_invariants_on_any_text() {
    let small = tokenizers(24);
    let big = tokenizers(256);
    let input = (unicode_text(), unicode_text(), 0usize..600, any::<bool>());
    super::engine::run(
        "tokenizer_truncation",
        1500,
        input,
        |(text, answer, limit, use_big)| {
            let (fast, slow) = if use_big { &big } else { &small };
            let max = fast.max_tokens();
            let empty = fast
                .encode_single("", TruncSide::Head)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ends = (empty.ids[0], empty.ids[1]);
            // The crate may refuse a text (a typed error), never panic; the fast path agrees.
            let (Ok(raw), Ok(slow_raw)) = (fast.raw_ids(&text), slow.raw_ids(&text)) else {
                return Ok(());
            };
            prop_assert_eq!(&raw, &slow_raw, "fast path and crate differ");
            for side in [TruncSide::HeadTail, TruncSide::Head, TruncSide::Tail] {
                let e = fast
                    .encode_single(&text, side)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_limited(&e, &raw, max, ends)?;
                if e.truncated && side == TruncSide::Head {
                    prop_assert!(raw.starts_with(&e.ids[1..e.ids.len() - 1]));
                }
                if e.truncated && side == TruncSide::Tail {
                    prop_assert!(raw.ends_with(&e.ids[1..e.ids.len() - 1]));
                }
            }
            let a = fast
                .encode_answer(&text, limit)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_limited(
                &a,
                &raw,
                limit.clamp(3, max.max(fast.max_pair_tokens())),
                ends,
            )?;
            if let Ok(p) = fast.encode_pair(&text, &answer) {
                let n = p.ids.len();
                prop_assert!(n <= fast.max_pair_tokens(), "pair of {n}");
                prop_assert_eq!(p.ids.iter().filter(|&&i| i == ends.1).count() >= 2, true);
                prop_assert_eq!(p.type_ids.first(), Some(&0));
                prop_assert_eq!(p.type_ids.last(), Some(&1));
                prop_assert!(
                    p.type_ids.windows(2).all(|w| w[0] <= w[1]),
                    "type ids 0 then 1"
                );
            }
            Ok(())
        },
    );
}

fn unit_of(u: char) -> Duration {
    match u {
        'H' => Duration::from_secs(3600),
        'M' => Duration::from_secs(60),
        'S' => Duration::from_secs(1),
        'm' => Duration::from_millis(1),
        'u' => Duration::from_micros(1),
        _ => Duration::from_nanos(1),
    }
}

/// Well-formed by the gRPC over HTTP/2 spec: 1 to 8 ASCII digits, then one of HMSmun.
fn well_formed(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() >= 2
        && b.len() <= 9
        && b[..b.len() - 1].iter().all(u8::is_ascii_digit)
        && b"HMSmun".contains(&b[b.len() - 1])
}

#[test]
fn grpc_timeout_round_trips_valid_values_and_rejects_the_rest() {
    let valid = (
        0u64..100_000_000,
        prop::sample::select(vec!['H', 'M', 'S', 'm', 'u', 'n']),
    );
    super::engine::run("grpc_timeout_valid", 5000, valid, |(n, u)| {
        let d = parse_grpc_timeout(&format!("{n}{u}"));
        prop_assert_eq!(d, Some(unit_of(u) * n as u32));
        // Leading zeros are digits too.
        prop_assert_eq!(
            parse_grpc_timeout(&format!("{n:08}{u}")),
            Some(unit_of(u) * n as u32)
        );
        Ok(())
    });
    let any_text = prop_oneof![
        any::<String>(),
        "[-+ 0-9]{0,11}[HMSmunxh ]?",
        "[0-9]{9,20}[HMSmun]",
        "[0-9]{1,8}[HMSmun][0-9a-z]{1,3}",
    ];
    super::engine::run("grpc_timeout_any", 20_000, any_text, |v| {
        let d = parse_grpc_timeout(&v);
        prop_assert_eq!(d.is_some(), well_formed(&v), "{:?} → {:?}", v, d);
        Ok(())
    });
}
