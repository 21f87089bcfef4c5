//! OpenAI chat-completion bodies: what `model` asks for, the turns Route reads, the answer
//! Verify reads, and cost from `usage` at catalog prices. Bodies stay `serde_json::Value`
//! so fields tiergate does not read reach the upstream unchanged.
#![forbid(unsafe_code)]
use serde_json::Value;

use super::status::GatewayError;
use crate::service::MAX_MESSAGES;

/// What a request's `model` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    /// tiergate chooses, under the named policy if any (`auto:<name>`).
    Auto(Option<String>),
    /// A catalog model by name: called as asked.
    Named(String),
}

pub fn ask(model: &str, auto_model: &str) -> Ask {
    match model.strip_prefix(auto_model) {
        Some("") => Ask::Auto(None),
        Some(rest) => match rest.strip_prefix(':') {
            Some(name) => Ask::Auto(Some(name.to_string())),
            None => Ask::Named(model.to_string()),
        },
        None => Ask::Named(model.to_string()),
    }
}

/// The body as a JSON object, with its `model`.
pub fn parse(bytes: &[u8]) -> Result<(Value, String), GatewayError> {
    let body = super::json::bounded(bytes)
        .map_err(|e| GatewayError::BadRequest(format!("the body {e}")))?;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| GatewayError::BadRequest("`model` (a string) is required".into()))?
        .to_string();
    Ok((body, model))
}

/// The chat turns as (role, text); text parts of multi-part content are joined, other
/// parts (images, audio) are not read.
pub fn turns(body: &Value) -> Result<Vec<(String, String)>, GatewayError> {
    let bad = |m: &str| GatewayError::BadRequest(m.to_string());
    let msgs = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`messages` (an array) is required"))?;
    if msgs.is_empty() {
        return Err(bad("`messages` is empty"));
    }
    if msgs.len() > MAX_MESSAGES {
        return Err(bad(&format!(
            "{} messages; at most {MAX_MESSAGES}",
            msgs.len()
        )));
    }
    msgs.iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            Ok((role.to_string(), text_of(m.get("content"))))
        })
        .collect()
}

fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

pub fn is_stream(body: &Value) -> bool {
    body.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

/// The body without streaming (`stream`, `stream_options` removed): a consensus reads whole
/// answers before anything is sent, then streams the one that ships ([`as_sse`]).
pub fn without_stream(body: &Value) -> Value {
    let mut b = body.clone();
    if let Some(o) = b.as_object_mut() {
        // (shift, not swap: the other keys keep their order)
        o.shift_remove("stream");
        o.shift_remove("stream_options");
    }
    b
}

/// Whether a streaming request asked for `usage` (`stream_options.include_usage`).
pub fn wants_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A whole chat completion as the server-sent events a streaming client expects, as OpenAI
/// sends them: per choice, one chunk with its answer and one with its finish reason; then,
/// if the request asked for it (`include_usage`), a chunk with no choices and `usage`; then
/// `[DONE]`.
pub fn as_sse(reply: &Value, include_usage: bool) -> Vec<u8> {
    let get = |k: &str| reply.get(k).cloned().unwrap_or(Value::Null);
    let chunk = |choices: Value| {
        serde_json::json!({
            "id": get("id"), "object": "chat.completion.chunk", "created": get("created"),
            "model": get("model"), "choices": choices,
        })
    };
    let choices: &[Value] = reply
        .get("choices")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let mut events = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        let index = c.get("index").cloned().unwrap_or_else(|| i.into());
        let msg = c.get("message");
        let content = msg
            .and_then(|m| m.get("content"))
            .cloned()
            .unwrap_or(Value::Null);
        let mut delta = serde_json::json!({"role": "assistant", "content": content});
        // A tool call streams as deltas that carry their position (`index`), as providers send.
        if let Some(calls) = msg
            .and_then(|m| m.get("tool_calls"))
            .and_then(Value::as_array)
        {
            let indexed = calls.iter().enumerate().map(|(i, c)| {
                let mut c = c.clone();
                if let Some(o) = c.as_object_mut() {
                    o.insert("index".into(), i.into());
                }
                c
            });
            delta["tool_calls"] = Value::Array(indexed.collect());
        }
        if let Some(r) = msg.and_then(|m| m.get("refusal")).filter(|r| !r.is_null()) {
            delta["refusal"] = r.clone();
        }
        let finish = c
            .get("finish_reason")
            .cloned()
            .filter(|f| !f.is_null())
            .unwrap_or_else(|| Value::String("stop".into()));
        events.push(chunk(serde_json::json!([
            {"index": index, "delta": delta, "finish_reason": null}
        ])));
        events.push(chunk(serde_json::json!([
            {"index": index, "delta": {}, "finish_reason": finish}
        ])));
    }
    if include_usage {
        let mut last = chunk(serde_json::json!([]));
        last["usage"] = get("usage");
        events.push(last);
    }
    let mut out = Vec::new();
    for c in events {
        out.extend_from_slice(b"data: ");
        // Serialising a Value cannot fail (its keys are strings).
        out.extend(serde_json::to_vec(&c).unwrap_or_default());
        out.extend_from_slice(b"\n\n");
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

/// The body to send with `model` replaced.
pub fn with_model(body: &Value, model: &str) -> Vec<u8> {
    let mut b = body.clone();
    if let Some(o) = b.as_object_mut() {
        o.insert("model".into(), Value::String(model.into()));
    }
    // Serialising a Value cannot fail (its keys are strings).
    serde_json::to_vec(&b).unwrap_or_default()
}

/// The first choice's text, if the reply has one (tool calls have none).
pub fn answer(reply: &Value) -> Option<&str> {
    reply.pointer("/choices/0/message/content")?.as_str()
}

/// What Verify reads of a reply: the first choice's text; "" where there is nothing at all
/// (`content` null or absent, and no tool call or refusal: an answer with nothing in it,
/// which must not ship unread); None for anything else without a text (a tool call, a
/// structured refusal, content in parts), which ships as it came, unverified.
pub fn verifiable(reply: &Value) -> Option<&str> {
    if let Some(text) = answer(reply) {
        return Some(text);
    }
    let msg = reply.pointer("/choices/0/message");
    let has = |k: &str| msg.and_then(|m| m.get(k)).is_some_and(|c| !c.is_null());
    let nothing = !["content", "tool_calls", "function_call", "refusal"]
        .iter()
        .any(|k| has(k));
    nothing.then_some("")
}

/// Whether the provider cut the first choice at a token limit the request did not set:
/// `finish_reason` "length" with neither `max_tokens` nor `max_completion_tokens` in the
/// body. Such an answer stops mid-way, and the verifier reads its head like a whole answer
/// (models/EVAL.md, "Answers cut short"), so the cascade treats it as empty. An answer cut at
/// the client's own limit is the length asked for, and is verified as any other.
pub fn cut_short(body: &Value, reply: &Value) -> bool {
    let capped = ["max_tokens", "max_completion_tokens"]
        .iter()
        .any(|k| body.get(*k).is_some_and(|v| !v.is_null()));
    !capped
        && reply
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
            == Some("length")
}

/// Token counts of one call: the reply's `usage`, else ceil(bytes / 4) of the prompt and
/// the answer (the catalog's own rule).
pub fn tokens(reply: &Value, prompt_bytes: usize) -> (u64, u64) {
    let n = |k: &str| {
        reply
            .pointer(&format!("/usage/{k}"))
            .and_then(Value::as_u64)
    };
    let proxy = |b: usize| b.div_ceil(4) as u64;
    (
        n("prompt_tokens").unwrap_or_else(|| proxy(prompt_bytes)),
        n("completion_tokens").unwrap_or_else(|| proxy(answer(reply).map_or(0, str::len))),
    )
}

/// USD at per-million-token prices.
pub fn cost((prompt, completion): (u64, u64), in_usd: f64, out_usd: f64) -> f64 {
    (prompt as f64 * in_usd + completion as f64 * out_usd) / 1e6
}

/// The reply as the client gets it: `model` is the catalog name that answered and
/// `usage.cost` what the whole request cost (OpenRouter's field).
pub fn finish(mut reply: Value, model: &str, total_cost: f64) -> Value {
    if let Some(o) = reply.as_object_mut() {
        o.insert("model".into(), Value::String(model.into()));
        let usage = o
            .entry("usage")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(u) = usage.as_object_mut() {
            u.insert("cost".into(), serde_json::json!(total_cost));
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A body of bare values is refused before it is parsed; the same count of commas inside
    /// a string (a long prompt) is not a structure and parses.
    #[test]
    fn a_body_of_countless_values_is_refused_before_parsing() {
        let n = super::super::json::MAX_VALUES + 10;
        let many = format!(r#"{{"model":"auto","x":[{}0]}}"#, "0,".repeat(n));
        let e = parse(many.as_bytes())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("JSON values"), "{e}");
        let text = format!(
            r#"{{"model":"auto","messages":[{{"role":"user","content":"{}\\\" ,"}}]}}"#,
            ",".repeat(n)
        );
        let (body, model) = parse(text.as_bytes()).expect("commas in a string are text");
        assert_eq!(model, "auto");
        assert!(turns(&body).expect("turns")[0].1.len() > n);
    }

    /// Key order is meaning to a provider: Structured Outputs answer in the schema's order (a
    /// `reasoning` field before `answer`), and tools' parameters read in theirs. A body passed
    /// on keeps its keys where the client put them.
    #[test]
    fn a_body_passed_on_keeps_its_key_order() {
        let raw = r#"{"stream":true,"model":"auto","response_format":{"type":"json_schema",
            "json_schema":{"name":"r","schema":{"type":"object","properties":{
            "reasoning":{"type":"string"},"answer":{"type":"string"}}}}},
            "stream_options":{"include_usage":true},"messages":[{"role":"user","content":"q"}]}"#;
        let body: Value = serde_json::from_str(raw).unwrap();
        let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
        let sent: Value = serde_json::from_slice(&with_model(&body, "m")).unwrap();
        let props = "/response_format/json_schema/schema/properties";
        assert_eq!(keys(sent.pointer(props).unwrap()), ["reasoning", "answer"]);
        assert_eq!(
            keys(&sent),
            [
                "stream",
                "model",
                "response_format",
                "stream_options",
                "messages"
            ]
        );
        assert_eq!(sent["model"], "m");
        let whole = without_stream(&body);
        assert_eq!(keys(&whole), ["model", "response_format", "messages"]);
    }

    fn events(sse: &[u8]) -> Vec<Value> {
        let sse = std::str::from_utf8(sse).unwrap();
        let events: Vec<&str> = sse
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "{sse}");
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    #[test]
    fn a_whole_reply_streams_as_openai_streams_it() {
        let reply = json!({"id": "c1", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "B"},
                "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": "C"},
                "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "cost": 0.5}});
        // Every choice (n = 2), each its answer then its finish; usage only when asked for,
        // in a last chunk without choices.
        let e = events(&as_sse(&reply, true));
        assert_eq!(e.len(), 5);
        assert_eq!(e[0]["object"], "chat.completion.chunk");
        assert_eq!(e[0]["id"], "c1");
        assert_eq!(e[0]["choices"][0]["delta"]["content"], "B");
        assert!(e[0]["choices"][0]["finish_reason"].is_null());
        assert_eq!(e[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(e[2]["choices"][0]["index"], 1);
        assert_eq!(e[2]["choices"][0]["delta"]["content"], "C");
        assert_eq!(e[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(e[4]["choices"], json!([]));
        assert_eq!(e[4]["usage"]["cost"], 0.5);
        assert!(e[..4].iter().all(|c| c.get("usage").is_none()));
        assert_eq!(events(&as_sse(&reply, false)).len(), 4, "no usage chunk");
        assert!(wants_usage(
            &json!({"stream_options": {"include_usage": true}})
        ));
        assert!(!wants_usage(&json!({"stream": true})));
        let body = json!({"model": "x", "stream": true, "stream_options": {"include_usage": true}});
        assert_eq!(without_stream(&body), json!({"model": "x"}));
    }

    #[test]
    fn an_answer_cut_at_a_limit_the_request_did_not_set_is_cut_short() {
        let reply = |finish: &str| json!({"choices": [{"finish_reason": finish, "message": {"content": "To cook a"}}]});
        let body = json!({"model": "auto", "messages": []});
        assert!(cut_short(&body, &reply("length")));
        assert!(!cut_short(&body, &reply("stop")));
        assert!(!cut_short(&body, &json!({"choices": []})));
        for cap in ["max_tokens", "max_completion_tokens"] {
            let mut capped = body.clone();
            capped[cap] = json!(64);
            assert!(
                !cut_short(&capped, &reply("length")),
                "{cap}: the client's own limit"
            );
            capped[cap] = Value::Null;
            assert!(
                cut_short(&capped, &reply("length")),
                "{cap}: null sets no limit"
            );
        }
    }

    #[test]
    fn model_names_what_to_do() {
        assert_eq!(ask("auto", "auto"), Ask::Auto(None));
        assert_eq!(ask("auto:cheap", "auto"), Ask::Auto(Some("cheap".into())));
        assert_eq!(ask("autopilot", "auto"), Ask::Named("autopilot".into()));
        assert_eq!(ask("gpt-5.5", "auto"), Ask::Named("gpt-5.5".into()));
    }

    #[test]
    fn turns_costs_and_the_finished_reply() {
        let body = json!({"model": "auto", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "2+2?"}, {"type": "image_url"}]}
        ]});
        let t = turns(&body).unwrap();
        assert_eq!(t[1], ("user".to_string(), "2+2?".to_string()));
        assert!(turns(&json!({"model": "auto", "messages": []})).is_err());
        let reply = json!({"model": "p", "choices": [{"message": {"content": "4"}}],
                           "usage": {"prompt_tokens": 1000, "completion_tokens": 10}});
        assert_eq!(answer(&reply), Some("4"));
        assert_eq!(verifiable(&reply), Some("4"));
        let null = json!({"choices": [{"message": {"role": "assistant", "content": null}}]});
        assert_eq!(
            verifiable(&null),
            Some(""),
            "no text and no tool call: empty"
        );
        let tool = json!({"choices": [{"message": {"content": null,
            "tool_calls": [{"id": "c", "type": "function"}]}}]});
        assert_eq!(verifiable(&tool), None, "a tool call is not verified");
        let refusal = json!({"choices": [{"message": {"content": null, "refusal": "no"}}]});
        assert_eq!(
            verifiable(&refusal),
            None,
            "a structured refusal ships as it came"
        );
        let parts = json!({"choices": [{"message": {"content": [{"type": "text", "text": "4"}]}}]});
        assert_eq!(verifiable(&parts), None, "content in parts is not read");
        // Streamed whole (a consensus asked to stream), the tool call goes in the first delta
        // with its index.
        let sse = String::from_utf8(as_sse(&tool, false)).unwrap();
        let first: Value = serde_json::from_str(
            sse.lines()
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .unwrap(),
        )
        .unwrap();
        let call = &first["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (call["index"].clone(), call["id"].clone()),
            (json!(0), json!("c"))
        );
        assert_eq!(tokens(&reply, 0), (1000, 10));
        assert_eq!(tokens(&json!({}), 9), (3, 0));
        assert!((cost((1000, 10), 1.0, 10.0) - 0.0011).abs() < 1e-15);
        let out = finish(reply, "gemini-2.5-flash", 0.5);
        assert_eq!(out["model"], "gemini-2.5-flash");
        assert_eq!(out["usage"]["cost"], 0.5);
        assert_eq!(out["usage"]["prompt_tokens"], 1000);
        let sent: Value = serde_json::from_slice(&with_model(&body, "x")).unwrap();
        assert_eq!(sent["model"], "x");
        assert_eq!(sent["messages"], body["messages"]);
    }
}
