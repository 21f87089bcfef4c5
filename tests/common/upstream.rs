//! A stand-in for an OpenAI-compatible provider on loopback: fixed answers per model id,
//! SSE streams, and failures on request. A request's `stub` field (passed through by the
//! gateway like any field it does not read) says what to do: `{"case": name, "answer":
//! {model: text}, "choices": {model: the reply's whole choices array}, "fail": {model:
//! status}, "delay_ms": {model: ms}, "break_stream": {model: true or "mid"}, "values": {model:
//! n}}` (a stream that breaks off after its first frame, or inside it; a reply padded with n
//! bare values). Every call is recorded.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// Token counts every reply reports, so costs are known in advance.
pub const PROMPT_TOKENS: u64 = 1000;
pub const COMPLETION_TOKENS: u64 = 100;

#[derive(Debug, Clone)]
pub struct Call {
    pub case: String,
    /// The body's `model` (the provider id the gateway sent).
    pub model: String,
    pub auth: Option<String>,
    pub body: Value,
    /// The body as it arrived.
    pub raw: Bytes,
    pub headers: HeaderMap,
}

pub struct Stub {
    pub name: String,
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
}

/// The answer a model gives unless the request says otherwise.
pub fn default_answer(stub: &str, model: &str) -> String {
    format!("{model} via {stub}: the answer is 4.")
}

/// The exact SSE bytes a stream of `model` from stub `stub` consists of, frame by frame.
pub fn sse_frames(stub: &str, model: &str) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    };
    vec![
        chunk(
            json!({"role": "assistant", "content": "Hello"}),
            Value::Null,
        ),
        chunk(
            json!({"content": format!(" from {model} via {stub}")}),
            Value::Null,
        ),
        chunk(json!({}), json!("stop")),
        "data: [DONE]\n\n".to_string(),
    ]
}

impl Stub {
    pub async fn start(name: &str) -> Stub {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let state = (name.to_string(), calls.clone());
        let app = axum::Router::new()
            .fallback(axum::routing::post(handle))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stub");
        let addr = listener.local_addr().expect("stub addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("stub server");
        });
        Stub {
            name: name.to_string(),
            addr,
            calls,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The calls made for one case, in order.
    pub fn calls(&self, case: &str) -> Vec<Call> {
        let all = self.calls.lock().expect("calls lock");
        all.iter().filter(|c| c.case == case).cloned().collect()
    }

    /// Provider ids called for one case, in order.
    pub fn models(&self, case: &str) -> Vec<String> {
        self.calls(case).into_iter().map(|c| c.model).collect()
    }
}

type State = (String, Arc<Mutex<Vec<Call>>>);

async fn handle(
    axum::extract::State((name, calls)): axum::extract::State<State>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = body;
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or("").to_string();
    let stub = &body["stub"];
    calls.lock().expect("calls lock").push(Call {
        case: stub["case"].as_str().unwrap_or("").to_string(),
        model: model.clone(),
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: body.clone(),
        raw,
        headers: headers.clone(),
    });
    if let Some(ms) = stub["delay_ms"][&model].as_u64() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = stub["fail"][&model].as_u64() {
        let status = StatusCode::from_u16(code as u16).expect("status");
        let err = json!({"error": {"message": format!("{model} via {name} failing with {code}"),
            "type": "stub_error"}});
        // As providers do, a rate limit says when to come back.
        return (
            status,
            [
                ("content-type", "application/json"),
                ("retry-after", "7"),
                ("x-ratelimit-remaining-requests", "0"),
            ],
            err.to_string(),
        )
            .into_response();
    }
    if body["stream"].as_bool() == Some(true) {
        let mut frames: Vec<Result<Bytes, std::io::Error>> = sse_frames(&name, &model)
            .into_iter()
            .map(|f| Ok(Bytes::from(f)))
            .collect();
        let cut = &stub["break_stream"][&model];
        if cut.as_bool() == Some(true) || cut == "mid" {
            frames.truncate(1);
            if cut == "mid" {
                // Half of the first frame: the break comes inside it.
                let half = sse_frames(&name, &model)[0].len() / 2;
                frames[0] = Ok(Bytes::from(
                    sse_frames(&name, &model)[0][..half].to_string(),
                ));
            }
            frames.push(Err(std::io::Error::other("stub breaks the stream")));
        }
        // The break comes after a pause, so the first frame (and the headers) are out first.
        let stream = futures::StreamExt::then(futures::stream::iter(frames), |f| async move {
            if f.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            f
        });
        return (
            [("content-type", "text/event-stream")],
            Body::from_stream(stream),
        )
            .into_response();
    }
    let answer = match (
        stub["answer"][&model].as_str(),
        stub["answer_bytes"][&model].as_u64(),
    ) {
        (Some(a), _) => a.to_string(),
        // A long answer (for the buffer limits in front of the processor).
        (None, Some(n)) => "x".repeat(n as usize),
        (None, None) => default_answer(&name, &model),
    };
    let mut reply = json!({"id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
        "model": model, "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": answer}}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}});
    if let Some(choices) = stub["choices"].get(&model) {
        reply["choices"] = choices.clone();
    }
    // A reply padded with that many bare values (a provider gone wrong; the gateway refuses
    // to parse one past its value limit).
    if let Some(n) = stub["values"][&model].as_u64() {
        reply["padding"] = json!(vec![0u8; n as usize]);
    }
    ([("content-type", "application/json")], reply.to_string()).into_response()
}
