//! The HTTP JSON API (axum).
//!
//! [`router`] builds the whole API over an [`ApiState`]: the store behind a
//! mutex, the [`NodeHooks`] through which the running node answers what only
//! it knows (peers, network metrics) and hears of every local write, and the
//! [`ApiConfig`] (token, allowed `Host` names, limits). [`serve`] runs it on a
//! listener until a shutdown future resolves.
//!
//! Every request passes, in order: the `Host` check (no DNS rebinding from a
//! browser) and `Origin` check (no cross-site writes), the bearer-token check
//! (everything but `/health`, when the config requires a token), then the
//! route, with a body limit and a timeout on every route that neither streams
//! nor long-polls. No CORS headers are sent, so a browser page of another
//! origin cannot read an answer.
//!
//! Store calls run on tokio's blocking pool (`spawn_blocking`), one lock
//! acquisition per call; streaming routes (import, export, the changes feed)
//! take the lock once per batch, so other requests interleave.
//!
//! One module per group of routes: [`records`], [`collisions`], [`feed`],
//! [`io`] (import and export), [`ops`] (health, status, peers, metrics).

pub mod collisions;
pub mod error;
pub mod feed;
pub mod io;
pub mod node;
pub mod ops;
pub mod records;
pub mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use entente_model::RecordId;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::ApiError;

use crate::store::{SharedStore, Store};

/// Default address of the API.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";
/// Largest JSON body accepted by the record, collision and peer routes.
pub const BODY_LIMIT_BYTES: usize = 1 << 20;
/// Longest a non-streaming request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A peer as the node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer id.
    pub id: String,
    /// Addresses known for it.
    pub addrs: Vec<String>,
    /// Connected now.
    pub connected: bool,
    /// On the block list.
    pub blocked: bool,
    /// How far the peer is behind this node's feed (this node's feed
    /// sequence minus the peer's checkpoint as of its latest pull), when
    /// known.
    pub lag: Option<u64>,
    /// Its replication handshake completed.
    #[serde(default)]
    pub syncing: bool,
    /// Its node id (after the handshake).
    #[serde(default)]
    pub node_id: Option<String>,
    /// On the allow-list.
    #[serde(default)]
    pub allowed: bool,
    /// Dialed (and redialed) by this node.
    #[serde(default)]
    pub static_peer: bool,
    /// This node's checkpoint in the peer's feed.
    #[serde(default)]
    pub checkpoint: Option<u64>,
    /// Milliseconds since this node last caught up with the peer's feed.
    #[serde(default)]
    pub last_sync_ms_ago: Option<u64>,
}

/// Network and sync counters for `/metrics` and `/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetMetrics {
    /// Remote changes applied.
    pub applied_changes: u64,
    /// Bytes received from peers.
    pub bytes_in: u64,
    /// Bytes sent to peers.
    pub bytes_out: u64,
    /// Records from peers the store refused (quarantined).
    pub records_rejected: u64,
    /// Records of collections this node does not replicate that a peer
    /// sent anyway (dropped, never stored).
    pub records_ignored: u64,
}

/// A refusal of a hook call: a stable code, a message, an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct HookError {
    /// HTTP status.
    pub status: u16,
    /// Stable code (`NO_NETWORK`, `UNKNOWN_PEER`, `BAD_ADDRESS`, …).
    pub code: String,
    /// For people.
    pub message: String,
}

impl From<HookError> for ApiError {
    fn from(e: HookError) -> ApiError {
        ApiError::new(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &e.code,
            e.message,
        )
    }
}

/// What only the running node knows. The API calls these from tokio's
/// blocking pool (except `local_change`, which must not block: queue and
/// return).
pub trait NodeHooks: Send + Sync + std::fmt::Debug {
    /// A local write changed `id`; its heads are now `heads` (hex). Called
    /// after every local write the API makes, so the sync engine can push.
    fn local_change(&self, id: &RecordId, heads: &[String]);
    /// Known peers.
    fn peers(&self) -> Vec<PeerInfo>;
    /// Dials and remembers a peer address.
    fn add_peer(&self, addr: &str) -> Result<PeerInfo, HookError>;
    /// Forgets a peer (and disconnects it).
    fn remove_peer(&self, id: &str) -> Result<(), HookError>;
    /// Refuses a peer from now on.
    fn block(&self, id: &str) -> Result<(), HookError>;
    /// Lifts a block.
    fn unblock(&self, id: &str) -> Result<(), HookError>;
    /// Sync and network counters.
    fn metrics(&self) -> NetMetrics;
    /// Whether a network runs at all.
    fn networked(&self) -> bool;
    /// Compares this node's data with connected peer `id`'s and repairs the
    /// records that differ; answers when the run ended (may take a while:
    /// a scan of both stores' record metadata, and the repair fetches).
    /// The default answers `NO_NETWORK`.
    fn verify(&self, id: &str) -> Result<crate::sync::VerifyReport, HookError> {
        let _ = id;
        Err(no_network())
    }
}

/// Hooks for a node without a network (`entente api`, tests): no peers,
/// every peer admin call answers `NO_NETWORK` (503).
#[derive(Debug, Default)]
pub struct StandaloneHooks;

fn no_network() -> HookError {
    HookError {
        status: 503,
        code: "NO_NETWORK".into(),
        message: "this node runs without a network: peers cannot be managed".into(),
    }
}

impl NodeHooks for StandaloneHooks {
    fn local_change(&self, _id: &RecordId, _heads: &[String]) {}
    fn peers(&self) -> Vec<PeerInfo> {
        Vec::new()
    }
    fn add_peer(&self, _addr: &str) -> Result<PeerInfo, HookError> {
        Err(no_network())
    }
    fn remove_peer(&self, _id: &str) -> Result<(), HookError> {
        Err(no_network())
    }
    fn block(&self, _id: &str) -> Result<(), HookError> {
        Err(no_network())
    }
    fn unblock(&self, _id: &str) -> Result<(), HookError> {
        Err(no_network())
    }
    fn metrics(&self) -> NetMetrics {
        NetMetrics::default()
    }
    fn networked(&self) -> bool {
        false
    }
}

/// Access rules and limits.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The bearer token; required on every route but `/health` when
    /// `require_token`.
    pub token: Option<String>,
    /// Whether the token is checked.
    pub require_token: bool,
    /// `Host` header values accepted (`host` or `host:port`, lower-case);
    /// empty accepts any (only sensible with a token).
    pub allowed_hosts: Vec<String>,
    /// Largest JSON body (bytes).
    pub body_limit: usize,
    /// Timeout of non-streaming requests.
    pub timeout: Duration,
}

impl ApiConfig {
    /// The rules for an API bound to `addr`: on a loopback address the token
    /// is required only if `always_require_token`; on any other address it is
    /// always required (and must be given). The `Host` header must name the
    /// bound address, or `localhost` on loopback; on an unspecified address
    /// (`0.0.0.0`) any host is accepted, the token guarding access.
    pub fn for_addr(
        addr: SocketAddr,
        token: Option<String>,
        always_require_token: bool,
    ) -> Result<ApiConfig, String> {
        let loopback = addr.ip().is_loopback();
        let require_token = always_require_token || !loopback;
        if require_token && token.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "the API on {addr} requires a token, and none was given"
            ));
        }
        let port = addr.port();
        let mut allowed_hosts = Vec::new();
        if !addr.ip().is_unspecified() {
            let ip = match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            };
            allowed_hosts.push(ip.clone());
            allowed_hosts.push(format!("{ip}:{port}"));
            if loopback {
                for h in ["localhost", "127.0.0.1", "[::1]"] {
                    allowed_hosts.push(h.to_string());
                    allowed_hosts.push(format!("{h}:{port}"));
                }
            }
        }
        Ok(ApiConfig {
            token,
            require_token,
            allowed_hosts,
            body_limit: BODY_LIMIT_BYTES,
            timeout: REQUEST_TIMEOUT,
        })
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The store (short calls, on the blocking pool); `None` once the node
    /// closed it (requests then answer `NODE_STOPPED`).
    pub store: SharedStore,
    /// What only the running node knows.
    pub hooks: Arc<dyn NodeHooks>,
    /// Access rules and limits.
    pub config: Arc<ApiConfig>,
    feed: Arc<watch::Sender<u64>>,
}

impl ApiState {
    /// State over a store of its own (no running node: `entente api`,
    /// tests, benchmarks).
    pub fn new(store: Store, hooks: Arc<dyn NodeHooks>, config: ApiConfig) -> Self {
        let seq = store.feed_seq();
        Self::shared(
            Arc::new(Mutex::new(Some(store))),
            Arc::new(watch::Sender::new(seq)),
            hooks,
            config,
        )
    }

    /// State over a store shared with a running node, and the feed-sequence
    /// channel the node updates after it applies remote changes (so
    /// long-polling feed readers wake up for those too).
    pub fn shared(
        store: SharedStore,
        feed: Arc<watch::Sender<u64>>,
        hooks: Arc<dyn NodeHooks>,
        config: ApiConfig,
    ) -> Self {
        ApiState {
            store,
            hooks,
            config: Arc::new(config),
            feed,
        }
    }

    /// The same state under other access rules.
    pub fn with_config(mut self, config: ApiConfig) -> Self {
        self.config = Arc::new(config);
        self
    }

    /// Tells long-polling feed readers that the feed moved to `seq`. The API
    /// calls it after its own writes; the node calls it after applying
    /// remote changes.
    pub fn feed_changed(&self, seq: u64) {
        crate::runtime::publish_seq(&self.feed, seq);
    }

    pub(crate) fn subscribe_feed(&self) -> watch::Receiver<u64> {
        self.feed.subscribe()
    }

    /// Runs `f` with the store locked, on the blocking pool.
    pub async fn with_store<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, ApiError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = store
                .lock()
                .map_err(|_| ApiError::internal("the store lock is poisoned"))?;
            let s = guard.as_mut().ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NODE_STOPPED",
                    "the node is shutting down",
                )
            })?;
            f(s)
        })
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
    }

    /// After a local write: tell the node (to push) and the feed readers.
    pub(crate) fn wrote(&self, id: &RecordId, heads: &[String], seq: u64) {
        self.hooks.local_change(id, heads);
        self.feed_changed(seq);
    }
}

/// The whole API.
pub fn router(state: ApiState) -> Router {
    let limit = state.config.body_limit;
    // Routes answered quickly: a body limit and a timeout.
    let short = Router::new()
        .route("/status", get(ops::status))
        .route("/quarantine", get(ops::quarantine))
        .route(
            "/quarantine/{record}",
            axum::routing::delete(ops::release_quarantine),
        )
        .route("/schema", get(ops::schema))
        .route("/metrics", get(ops::metrics))
        .route("/peers", get(ops::peers).post(ops::add_peer))
        .route("/peers/{id}", axum::routing::delete(ops::remove_peer))
        .route("/peers/{id}/block", post(ops::block))
        .route("/peers/{id}/unblock", post(ops::unblock))
        .route(
            "/collections/{collection}/records",
            get(records::list).post(records::create),
        )
        .route(
            "/records/{id}",
            get(records::get)
                .patch(records::update)
                .delete(records::delete),
        )
        .route("/records/{id}/restore", post(records::restore))
        .route("/records/{id}/history", get(records::history))
        .route("/records/{id}/raw", get(records::raw))
        .route("/collisions", get(collisions::list))
        .route("/collisions/{id}", get(collisions::show))
        .route("/collisions/{id}/resolve", post(collisions::resolve))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), timeout));
    // Streaming and long-polling routes: they bound themselves (per-line
    // cap on import, `wait` capped on the feed).
    let long = Router::new()
        .route("/changes", get(feed::changes))
        // Compare and repair scans both stores: no request timeout.
        .route("/peers/{id}/verify", post(ops::verify))
        .route("/import", post(io::import))
        .route("/export", get(io::export))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(short)
        .merge(long)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/health", get(ops::health))
        .layer(middleware::from_fn_with_state(state.clone(), host_check))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves; requests in flight
/// are finished first.
pub async fn serve<F>(listener: TcpListener, state: ApiState, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NO_ROUTE", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this route does not take this method",
    )
}

async fn timeout(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.config.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            "the request took too long",
        )
        .into_response(),
    }
}

/// Host and Origin checks: a page from another site reaching the API through
/// a rebinding DNS name carries that name in `Host`; a cross-site form post
/// carries its own `Origin`.
async fn host_check(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let allowed = &state.config.allowed_hosts;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase)
        .or_else(|| {
            req.uri()
                .authority()
                .map(|a| a.as_str().to_ascii_lowercase())
        });
    if !allowed.is_empty() {
        match &host {
            Some(h) if allowed.iter().any(|a| a == h) => {}
            Some(h) => {
                return ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "BAD_HOST",
                    format!("Host `{h}` is not an address of this API"),
                )
                .into_response();
            }
            None => {
                return ApiError::bad_request("BAD_HOST", "a Host header is required")
                    .into_response();
            }
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
        let origin_host = origin.split("://").nth(1).unwrap_or("");
        if host.as_deref() != Some(origin_host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN_ORIGIN",
                format!("requests from origin `{origin}` are not accepted"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn auth(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if state.config.require_token {
        let expected = state.config.token.as_deref().unwrap_or("");
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "));
        match given {
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "TOKEN_REQUIRED",
                    "this API requires `Authorization: Bearer <token>`",
                )
                .into_response();
            }
            Some(t) if !token::matches(t.trim(), expected) => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "BAD_TOKEN", "wrong token")
                    .into_response();
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Parses a record id from a path.
pub(crate) fn record_id(s: &str) -> Result<RecordId, ApiError> {
    RecordId::parse(s).map_err(ApiError::from)
}
