//! Plumbing shared by every stand-in: the accept loop, call recording, fault injection and the
//! `/__devstack/*` control endpoints.
//!
//! The serve loop is written by hand on top of hyper-util instead of `axum::serve`, because a
//! "dropped" request must close the connection without writing any response. hyper does exactly
//! that when the service future fails, which `axum::serve` (infallible services only) cannot express.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// Requests under this prefix steer the stand-in; they are neither recorded nor subject to faults.
pub(crate) const CONTROL_PREFIX: &str = "/__devstack/";

/// One request as a stand-in received it.
#[derive(Clone, Debug, Serialize)]
pub struct RecordedCall {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case; repeated headers are joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// Parsed JSON, the raw text as `Value::String` when it is not JSON, `Null` when empty.
    pub body: Value,
    /// Set when an injected fault answered this request: `"status 503"` or `"dropped"`.
    pub fault: Option<String>,
    /// When its body had arrived (what a benchmark measures waits to).
    pub at: std::time::SystemTime,
}

impl RecordedCall {
    /// The value of a header (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// Injected failures and latency for one stand-in. Rules are consumed in the order they were added.
#[derive(Default)]
pub struct Faults {
    state: Mutex<FaultState>,
}

#[derive(Default)]
struct FaultState {
    rules: Vec<FaultRule>,
    latency: Duration,
}

struct FaultRule {
    action: FaultAction,
    method: Option<String>,
    path_contains: String,
    remaining: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultAction {
    Fail(u16),
    Drop,
}

impl FaultAction {
    fn describe(self) -> String {
        match self {
            FaultAction::Fail(status) => format!("status {status}"),
            FaultAction::Drop => "dropped".to_owned(),
        }
    }
}

impl Faults {
    /// The next `count` requests answer `status` with a JSON error body.
    pub fn fail_next(&self, count: u32, status: u16) {
        self.fail_next_matching(None, "", count, status);
    }

    /// Like [`Faults::fail_next`], restricted to requests with this method (any if `None`) whose path
    /// contains `path_contains`.
    pub fn fail_next_matching(&self, method: Option<&str>, path_contains: &str, count: u32, status: u16) {
        self.add(FaultAction::Fail(status), method, path_contains, count);
    }

    /// The next `count` requests: the connection is closed without any response.
    pub fn drop_next(&self, count: u32) {
        self.drop_next_matching(None, "", count);
    }

    /// Like [`Faults::drop_next`], restricted to matching requests.
    pub fn drop_next_matching(&self, method: Option<&str>, path_contains: &str, count: u32) {
        self.add(FaultAction::Drop, method, path_contains, count);
    }

    /// Delay added before every answer (including injected failures).
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    pub fn latency(&self) -> Duration {
        self.state.lock().unwrap().latency
    }

    /// Forget every pending fault and the latency.
    pub fn reset(&self) {
        *self.state.lock().unwrap() = FaultState::default();
    }

    fn add(&self, action: FaultAction, method: Option<&str>, path_contains: &str, count: u32) {
        if count == 0 {
            return;
        }
        self.state.lock().unwrap().rules.push(FaultRule {
            action,
            method: method.map(str::to_ascii_uppercase),
            path_contains: path_contains.to_owned(),
            remaining: count,
        });
    }

    /// Consume one use of the first rule matching this request, if any.
    fn take(&self, method: &str, path: &str) -> Option<FaultAction> {
        let mut state = self.state.lock().unwrap();
        let rule = state.rules.iter_mut().find(|rule| {
            rule.remaining > 0
                && rule.method.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(method))
                && path.contains(&rule.path_contains)
        })?;
        rule.remaining -= 1;
        let action = rule.action;
        state.rules.retain(|rule| rule.remaining > 0);
        Some(action)
    }
}

/// What the serve loop shares with the control endpoints and with [`StandIn`].
pub(crate) struct Shared {
    name: &'static str,
    calls: Mutex<Vec<RecordedCall>>,
    faults: Faults,
    /// Body of an injected failure, in the dialect of the service being imitated.
    fault_body: fn(u16) -> Value,
}

/// A running stand-in: a real HTTP server on 127.0.0.1 plus its in-memory state `S`.
/// Cheap to clone; all clones refer to the same server.
pub struct StandIn<S> {
    inner: Arc<Inner<S>>,
}

struct Inner<S> {
    addr: SocketAddr,
    state: S,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl<S> Clone for StandIn<S> {
    fn clone(&self) -> Self {
        StandIn {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> fmt::Debug for StandIn<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandIn")
            .field("name", &self.inner.shared.name)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl<S> StandIn<S> {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Every request received so far (control endpoints excepted), in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.inner.shared.calls.lock().unwrap().clone()
    }

    /// Calls with this method (case-insensitive; `""` or `"*"` for any) whose path contains
    /// `path_contains`.
    pub fn calls_to(&self, method: &str, path_contains: &str) -> Vec<RecordedCall> {
        self.inner
            .shared
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|call| {
                (method.is_empty() || method == "*" || call.method.eq_ignore_ascii_case(method))
                    && call.path.contains(path_contains)
            })
            .cloned()
            .collect()
    }

    pub fn clear_calls(&self) {
        self.inner.shared.calls.lock().unwrap().clear();
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.shared.faults
    }

    pub fn state(&self) -> &S {
        &self.inner.state
    }

    /// Stop accepting connections and close the open ones. Other clones see a dead server.
    pub async fn shutdown(self) {
        // `send_replace` succeeds even if every receiver is gone already.
        self.inner.shutdown.send_replace(true);
        let task = self.inner.accept_task.lock().unwrap().take();
        if let Some(task) = task {
            // The accept loop only ends by this signal; a JoinError would mean it panicked,
            // which is not worth surfacing during teardown.
            let _ = task.await;
        }
    }
}

/// Bind `127.0.0.1:port` (0 = random) and serve `app` plus the control endpoints.
pub(crate) async fn spawn<S>(
    name: &'static str,
    port: u16,
    state: S,
    app: Router,
    fault_body: fn(u16) -> Value,
) -> anyhow::Result<StandIn<S>> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|err| anyhow::anyhow!("{name}: cannot bind 127.0.0.1:{port}: {err}"))?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        name,
        calls: Mutex::new(Vec::new()),
        faults: Faults::default(),
        fault_body,
    });
    let app = app.merge(control_routes(Arc::clone(&shared)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let accept_task = tokio::spawn(accept_loop(listener, app, Arc::clone(&shared), shutdown_rx));
    tracing::debug!(stand_in = name, %addr, "listening");
    Ok(StandIn {
        inner: Arc::new(Inner {
            addr,
            state,
            shared,
            shutdown,
            accept_task: Mutex::new(Some(accept_task)),
        }),
    })
}

async fn accept_loop(listener: TcpListener, app: Router, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Typically EMFILE; back off briefly rather than spin.
                    tracing::warn!(stand_in = shared.name, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = shutdown_requested(shutdown.clone()) => return,
        };
        let app = app.clone();
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let name = shared.name;
            let service = hyper::service::service_fn(move |req| handle(app.clone(), Arc::clone(&shared), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = conn => {
                    if let Err(err) = result {
                        // Expected for dropped requests and for clients that hang up.
                        tracing::debug!(stand_in = name, %peer, %err, "connection ended with an error");
                    }
                }
                () = shutdown_requested(shutdown) => {}
            }
        });
    }
}

/// Resolves once shutdown is requested; never if the [`StandIn`] was dropped without `shutdown`,
/// so that a forgotten handle does not take the server down under a running test.
async fn shutdown_requested(mut shutdown: watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The error a service returns to make hyper close the connection without answering.
#[derive(Debug)]
struct DroppedByFault;

impl fmt::Display for DroppedByFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by an injected fault")
    }
}

impl std::error::Error for DroppedByFault {}

async fn handle(app: Router, shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, DroppedByFault> {
    if req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(route(app, req.map(Body::new)).await);
    }

    // The body is buffered so that it can be recorded and then replayed to the router.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(Body::new(body), usize::MAX).await {
        Ok(bytes) => bytes,
        // The client went away while sending; there is nobody to answer.
        Err(_) => return Err(DroppedByFault),
    };
    let path = parts.uri.path().to_owned();
    let fault = shared.faults.take(parts.method.as_str(), &path);
    tracing::info!(stand_in = shared.name, method = %parts.method, %path, ?fault, "request");
    shared.calls.lock().unwrap().push(RecordedCall {
        method: parts.method.as_str().to_owned(),
        path,
        query: parts.uri.query().map(str::to_owned),
        headers: header_map(&parts.headers),
        body: body_value(&bytes),
        fault: fault.map(FaultAction::describe),
        at: std::time::SystemTime::now(),
    });

    if fault == Some(FaultAction::Drop) {
        return Err(DroppedByFault);
    }
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(FaultAction::Fail(status)) = fault {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok((code, Json((shared.fault_body)(code.as_u16()))).into_response());
    }
    Ok(route(app, Request::from_parts(parts, Body::from(bytes))).await)
}

async fn route(app: Router, req: Request<Body>) -> Response<Body> {
    match app.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_owned())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    map
}

fn body_value(bytes: &Bytes) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Default body of an injected failure: FastAPI-style, like the Python services it imitates.
pub(crate) fn detail_fault_body(status: u16) -> Value {
    json!({ "detail": format!("devstack: injected fault (status {status})") })
}

fn control_routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/__devstack/calls",
            get(list_calls_endpoint).delete(clear_calls_endpoint),
        )
        .route("/__devstack/faults", post(faults_endpoint))
        .route("/__devstack/reset", post(reset_endpoint))
        .with_state(shared)
}

async fn list_calls_endpoint(State(shared): State<Arc<Shared>>) -> Json<Vec<RecordedCall>> {
    Json(shared.calls.lock().unwrap().clone())
}

async fn clear_calls_endpoint(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.calls.lock().unwrap().clear();
    StatusCode::NO_CONTENT
}

/// Body of `POST /__devstack/faults`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FaultsRequest {
    fail_next: Option<u32>,
    status: Option<u16>,
    drop_next: Option<u32>,
    latency_ms: Option<u64>,
    method: Option<String>,
    path_contains: Option<String>,
}

async fn faults_endpoint(State(shared): State<Arc<Shared>>, Json(req): Json<FaultsRequest>) -> StatusCode {
    let path_contains = req.path_contains.as_deref().unwrap_or("");
    let method = req.method.as_deref();
    if let Some(count) = req.fail_next {
        let status = req.status.unwrap_or(503);
        shared.faults.fail_next_matching(method, path_contains, count, status);
    }
    if let Some(count) = req.drop_next {
        shared.faults.drop_next_matching(method, path_contains, count);
    }
    if let Some(ms) = req.latency_ms {
        shared.faults.set_latency(Duration::from_millis(ms));
    }
    StatusCode::NO_CONTENT
}

async fn reset_endpoint(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.faults.reset();
    shared.calls.lock().unwrap().clear();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_rules_are_consumed_in_order_and_filtered() {
        let faults = Faults::default();
        faults.fail_next_matching(Some("post"), "/tokens", 1, 500);
        faults.drop_next(1);
        assert_eq!(faults.take("GET", "/tokens"), Some(FaultAction::Drop));
        assert_eq!(faults.take("POST", "/a/tokens"), Some(FaultAction::Fail(500)));
        assert_eq!(faults.take("POST", "/a/tokens"), None);
    }

    #[test]
    fn bodies_are_recorded_as_json_text_or_null() {
        assert_eq!(body_value(&Bytes::new()), Value::Null);
        assert_eq!(body_value(&Bytes::from_static(b"{\"a\":1}")), json!({"a": 1}));
        assert_eq!(body_value(&Bytes::from_static(b"hi")), json!("hi"));
    }
}
