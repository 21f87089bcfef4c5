//! API tokens: read once at start (a file, an environment variable), kept only as SHA-256
//! hashes, and compared in constant time. The edges (gRPC, the HTTP front) ask [`Tokens`]
//! whether a request's bearer token is known; each answers a miss in its own wire format.
#![forbid(unsafe_code)]
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// Shorter tokens are refused at start: a guessable token is no authentication.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The known tokens, as hashes.
pub struct Tokens {
    hashes: Vec<[u8; 32]>,
}

/// Why a request was not let in; the message names no part of what the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Unknown,
}

impl Denied {
    pub fn message(self) -> &'static str {
        match self {
            Denied::Missing => "missing credentials: send `authorization: Bearer <token>`",
            Denied::Unknown => "the bearer token is not one this server accepts",
        }
    }
}

impl Tokens {
    /// `None` when the configuration names no tokens; an error when it names some but they
    /// cannot be read or none is usable.
    pub fn load(cfg: &AuthConfig) -> Result<Option<Tokens>> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let mut raw = Vec::new();
        if let Some(p) = &cfg.tokens_file {
            raw.extend(read_file(p)?);
        }
        if let Some(var) = &cfg.tokens_env {
            let v = std::env::var(var).with_context(|| {
                format!("auth.tokens_env: environment variable {var} is not set (or not UTF-8)")
            })?;
            raw.extend(
                v.split([',', '\n'])
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from),
            );
        }
        Self::from_tokens(raw.iter().map(String::as_str))
    }

    fn from_tokens<'a>(tokens: impl Iterator<Item = &'a str>) -> Result<Option<Tokens>> {
        let mut hashes = Vec::new();
        for (i, t) in tokens.enumerate() {
            if t.len() < MIN_TOKEN_BYTES {
                bail!(
                    "auth: token {} is shorter than {MIN_TOKEN_BYTES} bytes",
                    i + 1
                );
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "auth: token {} has spaces or non-ASCII bytes (it could never be sent in a header)",
                    i + 1
                );
            }
            hashes.push(hash(t.as_bytes()));
        }
        if hashes.is_empty() {
            bail!("auth: tokens_file / tokens_env are set but hold no token");
        }
        Ok(Some(Tokens { hashes }))
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Checks an `authorization` header value. Every known hash is compared, whatever
    /// matches, so the time taken says nothing about which token is close.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Denied> {
        let token = authorization.and_then(bearer).ok_or(Denied::Missing)?;
        let h = hash(token);
        let mut known = subtle::Choice::from(0);
        for k in &self.hashes {
            known |= k.ct_eq(&h);
        }
        if bool::from(known) {
            Ok(())
        } else {
            Err(Denied::Unknown)
        }
    }
}

fn read_file(p: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("auth.tokens_file: reading {}", p.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

fn hash(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 9110).
fn bearer(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let t = rest.trim_ascii();
    (!t.is_empty()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "tok-aaaaaaaaaaaaaaaa";
    const B: &str = "tok-bbbbbbbbbbbbbbbb";

    #[test]
    fn known_tokens_pass_and_others_are_told_why_not() {
        let t = Tokens::from_tokens([A, B].into_iter()).unwrap().unwrap();
        assert_eq!(t.check(Some(format!("Bearer {A}").as_bytes())), Ok(()));
        assert_eq!(t.check(Some(format!("bearer  {B} ").as_bytes())), Ok(()));
        assert_eq!(t.check(None), Err(Denied::Missing));
        assert_eq!(t.check(Some(A.as_bytes())), Err(Denied::Missing));
        assert_eq!(t.check(Some(b"Bearer ")), Err(Denied::Missing));
        assert_eq!(t.check(Some(b"Basic dXNlcjpwYXNz")), Err(Denied::Missing));
        assert_eq!(
            t.check(Some(format!("Bearer {A}x").as_bytes())),
            Err(Denied::Unknown)
        );
    }

    #[test]
    fn unusable_token_lists_stop_start_up() {
        assert!(Tokens::from_tokens(["short"].into_iter()).is_err());
        assert!(Tokens::from_tokens(["has a space in it ok"].into_iter()).is_err());
        assert!(Tokens::from_tokens(std::iter::empty()).is_err());
        assert!(Tokens::load(&AuthConfig::default()).unwrap().is_none());
        let missing = AuthConfig {
            tokens_file: Some("/nonexistent/tokens".into()),
            tokens_env: None,
        };
        let e = format!("{:#}", Tokens::load(&missing).err().unwrap());
        assert!(e.contains("auth.tokens_file"), "{e}");
    }
}
