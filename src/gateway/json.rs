//! JSON the gateway reads (clients' bodies, providers' replies), parsed only within a bound
//! on its number of values. A leaf: every gateway file may use it.
#![forbid(unsafe_code)]
use serde_json::Value;

/// Most JSON values a body may hold (commas and openings outside strings, which bound it).
/// A parsed value takes tens of bytes, against two for `0,` in the body, so a body of bare
/// numbers (`[0,0,…]`) would take many times its size in memory; chat bodies, tools and
/// schemas included, hold far fewer: their text is in strings.
pub const MAX_VALUES: usize = 200_000;

/// How many commas, `[` and `{` the JSON text holds outside strings, counting no further
/// than `limit + 1`.
fn structure_count(bytes: &[u8], limit: usize) -> usize {
    let (mut n, mut in_str, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_str = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_str = true,
                b',' | b'[' | b'{' => {
                    n += 1;
                    if n > limit {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    n
}

/// JSON text parsed, unless it holds more than [`MAX_VALUES`] values (refused before
/// parsing). Every JSON body the gateway reads goes through here: clients' requests and
/// providers' replies alike (a reply is read whole, up to `gateway.max_body_bytes`).
pub fn bounded(bytes: &[u8]) -> Result<Value, String> {
    if structure_count(bytes, MAX_VALUES) > MAX_VALUES {
        return Err(format!("holds more than {MAX_VALUES} JSON values"));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("is not JSON: {e}"))
}
