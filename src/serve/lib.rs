//! `streamrecon serve`: the pipeline as a network service. One pipeline (and one model memory)
//! per session; clients push frames over HTTP and read results back; every endpoint but
//! `/health` needs the bearer token. API: `docs/api.md`.
//!
//! Sessions are live: frames are latest-wins with counted drops, queues are bounded, and a slow
//! client only slows itself. Each session writes its outputs (trajectory, points, run.json, an
//! .rrd recording) to `DATA_DIR/<id>/`. A session either takes frames from its client or reads a
//! camera/stream URL on the server (only those in the allowlist). Sessions not closed by their
//! client (server stopped or killed) are resumed when the server starts again.

mod frames;
mod metrics;
mod nats;
mod session;
mod stream;
mod web_viewer;

pub use nats::{run_worker, serve_door, NatsConfig, WorkerConfig};
pub use web_viewer::view;

use session::{create_session, read_request, start_session};

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde::Deserialize;
use serde_json::json;

use streamrecon_core::error::{Error, Result};
use streamrecon_pipeline::source::PushedFrame;
use streamrecon_pipeline::{self as pipeline, FrameResult, RunCounters, RunOptions};

/// The request a session was made with, kept in its folder so it can be resumed.
const SESSION_FILE: &str = "session.json";
/// Written into a session's folder when its client closes it (it is not resumed then).
const CLOSED_FILE: &str = "closed";
/// Engine snapshots (vggt) and trajectory checkpoints every this many frames by default.
pub const SNAPSHOT_EVERY: u64 = 100;
/// Points per result unless the session asks otherwise.
const RESULT_POINTS: usize = 500;

/// A session id from a client: `s` and digits only (it names a folder).
fn valid_id(id: &str) -> std::result::Result<&str, ApiError> {
    let ok = id.len() > 1 && id.starts_with('s') && id[1..].bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(id)
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a session id"),
        ))
    }
}

/// Results kept per session for clients to read.
const RESULT_RING: usize = 10_000;
/// Results that keep their points and depth (older ones keep the pose only).
const DETAIL_KEPT: usize = 64;
/// Frames a live session queues at its door: a new one replaces the one waiting (latest wins),
/// so a frame never waits behind another there.
const FRAME_QUEUE: usize = 1;
/// Frames a lossless session queues at its door before uploads wait.
const FRAME_QUEUE_LOSSLESS: usize = 2;
/// Largest accepted frame upload.
const MAX_FRAME_BYTES: usize = 32 << 20;

/// How to run the service.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The options sessions start from: what a request leaves out, and the files (weights) a
    /// session may use; without `weights`, sessions run flowvo only.
    pub options: RunOptions,
    pub bind: SocketAddr,
    pub token: String,
    pub max_sessions: usize,
    pub data_dir: PathBuf,
    /// Server-side sources sessions may read: exact strings, or prefixes ending in `*`
    /// (`rtsp://10.0.0.5/*`, `camera:*`). Empty: none.
    pub allow_sources: Vec<String>,
    /// Also stream every session to this rerun viewer (`rerun+http://…/proxy`).
    pub connect: Option<String>,
    /// Engine snapshot and trajectory checkpoint cadence, frames (and at every session's end).
    pub snapshot_every: u64,
}

impl ServeConfig {
    fn source_allowed(&self, source: &str) -> bool {
        self.allow_sources
            .iter()
            .any(|a| match a.strip_suffix('*') {
                Some(prefix) => source.starts_with(prefix),
                None => a == source,
            })
    }
}

struct Session {
    id: String,
    /// fx, fy, cx, cy of the pushed frames, if the client gave them.
    intrinsics: Option<[f64; 4]>,
    started: Instant,
    tx: Mutex<Option<Sender<PushedFrame>>>,
    /// A receiver clone, to drop the oldest queued frame when a new one arrives.
    rx_drop: Receiver<PushedFrame>,
    results: Arc<Mutex<VecDeque<FrameResult>>>,
    /// Changes with every result put in `results` (its `seq`) and once more when the session
    /// closes: followers wait on it instead of polling the ring.
    newest: Arc<tokio::sync::watch::Sender<u64>>,
    /// Moves results from the pipeline into `results`; ends after the pipeline.
    collector: Mutex<Option<JoinHandle<()>>>,
    /// The session's frame counts: the door's (received, dropped at the door) and the
    /// pipeline's, one set.
    counters: RunCounters,
    pipeline: Mutex<Option<JoinHandle<std::result::Result<serde_json::Value, String>>>>,
    summary: Mutex<Option<serde_json::Value>>,
    /// Ends a server-side source's reading (pushed streams end when `tx` is dropped).
    stop: Arc<AtomicBool>,
    /// Size of the session's frames, fixed by the first one.
    size: Mutex<Option<(u32, u32)>>,
    /// The last accepted frame's `x-timestamp`: the next must be later.
    last_timestamp: Mutex<Option<f64>>,
    /// The server-side source, if the session reads one.
    source: Option<String>,
    /// The frame number a resumed session continued at.
    resumed_at: Option<u64>,
    /// Uploads wait for room rather than dropping frames.
    lossless: bool,
    /// The .rrd this run writes, if it records.
    recording: Option<PathBuf>,
}

impl Session {
    /// A session that is not running: one left by an earlier server.
    fn stopped(id: String, summary: serde_json::Value) -> Self {
        let (_, rx) = bounded::<PushedFrame>(1);
        Self {
            id,
            intrinsics: None,
            started: Instant::now(),
            tx: Mutex::new(None),
            rx_drop: rx,
            results: Arc::new(Mutex::new(VecDeque::new())),
            newest: Arc::new(tokio::sync::watch::Sender::new(0)),
            collector: Mutex::new(None),
            counters: RunCounters::default(),
            pipeline: Mutex::new(None),
            summary: Mutex::new(Some(summary)),
            stop: Arc::new(AtomicBool::new(true)),
            size: Mutex::new(None),
            last_timestamp: Mutex::new(None),
            source: None,
            resumed_at: None,
            lossless: false,
            recording: None,
        }
    }

    fn running(&self) -> bool {
        lock(&self.pipeline).is_some()
    }

    /// Its pipeline has ended (closed, or its source ran out), so its files grow no more.
    fn finished(&self) -> bool {
        match lock(&self.pipeline).as_ref() {
            Some(h) => h.is_finished(),
            // Taken by a close that is still joining it: finished once its summary is in.
            None => lock(&self.summary).is_some(),
        }
    }
}

struct AppState {
    config: ServeConfig,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

/// An error a handler answers with: status and message.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicked holder leaves consistent data here (counters, queues): keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AppState {
    fn session(&self, id: &str) -> std::result::Result<Arc<Session>, ApiError> {
        lock(&self.sessions)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no session {id}")))
    }
}

async fn auth(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    match check_token(given, &token) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The bearer token a request gave (its header, or a viewer link's path) against the service's.
fn check_token(given: &str, expected: &str) -> std::result::Result<(), ApiError> {
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn push_frame(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let s = state.session(&id)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("frame of {} bytes (limit {MAX_FRAME_BYTES})", body.len()),
        ));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (raw, timestamp) = frame_headers(header)?;
    let (received, dropped) = ingest(&s, body, raw, timestamp).await?;
    Ok(Json(json!({ "received": received, "dropped": dropped })))
}

/// A raw RGB frame's width and height (`None`: an encoded image).
type RawSize = Option<(u32, u32)>;

/// What a frame upload's headers say: its size when it is raw RGB (`x-width`, `x-height`) and
/// its `x-timestamp`, checked.
fn frame_headers<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
) -> std::result::Result<(RawSize, Option<f64>), ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let timestamp = match header("x-timestamp") {
        Some(v) => Some(
            v.parse::<f64>()
                .ok()
                .filter(|t| (0.0..=MAX_TIMESTAMP_S).contains(t))
                .ok_or_else(|| {
                    bad(format!(
                        "x-timestamp must be seconds from 0 to {MAX_TIMESTAMP_S:e}, got {}",
                        v.chars().take(40).collect::<String>()
                    ))
                })?,
        ),
        None => None,
    };
    let raw = match header("content-type") {
        Some(t) if t.starts_with(RAW_RGB) => {
            let dim = |name: &str| {
                header(name)
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "a {RAW_RGB} frame needs x-width and x-height headers"
                        ))
                    })
            };
            Some((dim("x-width")?, dim("x-height")?))
        }
        _ => None,
    };
    Ok((raw, timestamp))
}

/// Decodes a frame and queues it for a session's pipeline (latest-wins, or waiting for room
/// when the session is lossless); returns the session's received and dropped counts.
async fn ingest(
    s: &Session,
    body: Bytes,
    raw: Option<(u32, u32)>,
    timestamp: Option<f64>,
) -> std::result::Result<(u64, u64), ApiError> {
    // The frame's latency counts from here: decoding and the door's queue are the service's.
    let arrived = Instant::now();
    let id = &s.id;
    let tx = lock(&s.tx).clone().ok_or_else(|| {
        let why = if s.source.is_some() {
            "reads its frames on the server"
        } else {
            "is closed"
        };
        ApiError(StatusCode::CONFLICT, format!("session {id} {why}"))
    })?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    // The session's size is known from its first frame: later ones are checked against it
    // from their header, before decoding.
    let session_size = *lock(&s.size);
    // Decoding off the async workers: a large JPEG takes milliseconds.
    let image = tokio::task::spawn_blocking(move || match raw {
        Some((w, h)) => frames::check_session_size((w, h), session_size)
            .map_err(frames::FrameError)
            .and_then(|()| frames::decode_raw(body.to_vec(), w, h)),
        None => frames::decode_encoded(&body, session_size),
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| bad(e.0))?;
    let dims = image.dimensions();
    {
        // One size per session: the engines keep per-pixel state. Two first frames decoded at
        // once are settled here.
        let mut size = lock(&s.size);
        frames::check_session_size(dims, *size).map_err(bad)?;
        size.get_or_insert(dims);
    }
    if let Some(t) = timestamp {
        // Time runs forward in a stream: the trajectory and its evaluation match by time.
        let mut last = lock(&s.last_timestamp);
        if let Some(prev) = *last {
            if t <= prev {
                return Err(bad(format!(
                    "x-timestamp {t} is not after the previous frame's {prev}"
                )));
            }
        }
        *last = Some(t);
    }
    let intrinsics = s
        .intrinsics
        .map(|[fx, fy, cx, cy]| streamrecon_core::frame::Intrinsics {
            fx,
            fy,
            cx,
            cy,
            width: dims.0,
            height: dims.1,
        });
    let mut frame = PushedFrame {
        arrived,
        image,
        timestamp,
        intrinsics,
    };
    s.counters.received.fetch_add(1, Ordering::Relaxed);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match tx.try_send(frame) {
            Ok(()) => break,
            Err(TrySendError::Full(f)) if s.lossless => {
                if waited >= LOSSLESS_WAIT {
                    return Err(ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("session {id} has had no room for {LOSSLESS_WAIT:?}; try again"),
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                waited += std::time::Duration::from_millis(5);
                frame = f;
            }
            Err(TrySendError::Full(f)) => {
                // Latest wins: the oldest queued frame makes room.
                if s.rx_drop.try_recv().is_ok() {
                    s.counters.dropped_at_door.fetch_add(1, Ordering::Relaxed);
                }
                frame = f;
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("session {id} has stopped (see its status)"),
                ))
            }
        }
    }
    let n = s.counters.get();
    Ok((n.received, n.dropped()))
}

/// Latest accepted `x-timestamp`, seconds (Unix time in the year 2286).
const MAX_TIMESTAMP_S: f64 = 1e10;

/// How long a lossless upload waits for room in its session's queue.
const LOSSLESS_WAIT: std::time::Duration = std::time::Duration::from_mins(1);

/// Content type of a raw frame: `width × height × 3` bytes of RGB, with `x-width`/`x-height`.
pub(crate) const RAW_RGB: &str = "image/x-raw-rgb";

fn status_json(s: &Session) -> serde_json::Value {
    let results = lock(&s.results);
    let elapsed = s.started.elapsed().as_secs_f64();
    let n = s.counters.get();
    json!({
        "id": s.id,
        "running": s.running(),
        "source": s.source,
        "resumed_at": s.resumed_at,
        "recording": s.recording.is_some(),
        "frames_received": n.received,
        "frames_dropped": n.dropped(),
        "frames_dropped_at_door": n.dropped_at_door,
        "frames_dropped_inside": n.dropped_inside,
        "frames_skipped": n.skipped,
        "frames_processed": n.processed,
        "fps": if elapsed > 0.0 { n.processed as f64 / elapsed } else { 0.0 },
        "last": results.back(),
        "summary": *lock(&s.summary),
    })
}

async fn session_status(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let s = state.session(&id)?;
    Ok(Json(status_json(&s)))
}

#[derive(Deserialize)]
struct Since {
    /// Frame index: results of this frame and later ones.
    #[serde(default)]
    since: u64,
    /// Result number: results made after the one numbered so (a held frame's pose comes
    /// after the results of later frames, so a client that polls follows `seq`).
    after_seq: Option<u64>,
}

impl Since {
    fn wants(&self, r: &FrameResult) -> bool {
        r.index >= self.since && self.after_seq.is_none_or(|a| r.seq > a)
    }
}

async fn session_results(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> std::result::Result<Json<Vec<FrameResult>>, ApiError> {
    let s = state.session(&id)?;
    let r = lock(&s.results)
        .iter()
        .filter(|r| q.wants(r))
        .cloned()
        .collect();
    Ok(Json(r))
}

/// `GET /sessions/{id}/events?since=N`: results as server-sent events (`event: result`, JSON
/// data), in the order they were made, as they arrive; the stream ends after the last result of
/// a closed session.
async fn session_events(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> std::result::Result<
    Sse<impl futures_util::Stream<Item = std::result::Result<Event, std::convert::Infallible>>>,
    ApiError,
> {
    let s = state.session(&id)?;
    let newest = s.newest.subscribe();
    let stream =
        futures_util::stream::unfold((s, q, newest), |(s, mut q, mut newest)| async move {
            loop {
                // Seen before the ring is read: a result put in after it wakes the wait below.
                newest.borrow_and_update();
                let (found, open) = {
                    let ring = lock(&s.results);
                    let found = ring.iter().find(|r| q.wants(r)).cloned();
                    // Open until the pipeline has been joined (its last results are in the ring).
                    (found, lock(&s.summary).is_none())
                };
                if let Some(r) = found {
                    let event = Event::default()
                        .event("result")
                        .json_data(&r)
                        .unwrap_or_else(|_| Event::default().comment("unserialisable result"));
                    q.after_seq = Some(r.seq);
                    return Some((Ok(event), (s, q, newest)));
                }
                if !open {
                    return None;
                }
                wait_for_result(&mut newest).await;
            }
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Until the session's next result (or its close); at most a second, so a follower that
/// missed a change looks at the ring again.
async fn wait_for_result(newest: &mut tokio::sync::watch::Receiver<u64>) {
    let wait = std::time::Duration::from_secs(1);
    if let Ok(Err(_)) = tokio::time::timeout(wait, newest.changed()).await {
        // The session is gone: nothing more will come; the caller sees it closed.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
}

/// Ends a session's stream and waits for its outputs.
fn close(s: &Session) -> serde_json::Value {
    // A pushed stream ends when its sender goes (queued frames are still processed); a
    // server-side source is told to stop reading.
    lock(&s.tx).take();
    if s.source.is_some() {
        s.stop.store(true, Ordering::SeqCst);
    }
    let handle = lock(&s.pipeline).take();
    if let Some(h) = handle {
        let summary = match h.join() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => json!({ "error": e }),
            Err(_) => json!({ "error": "the session's pipeline panicked" }),
        };
        // Every result is in the ring before the session reads as closed.
        if let Some(c) = lock(&s.collector).take() {
            let _ = c.join();
        }
        *lock(&s.summary) = Some(summary);
        // Followers learn it is closed.
        s.newest.send_modify(|_| {});
    }
    lock(&s.summary).clone().unwrap_or(serde_json::Value::Null)
}

async fn close_session(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let s = state.session(&id)?;
    // Closed by its client: finished, not to be resumed by a restarted server.
    let marker = state.config.data_dir.join(&s.id).join(CLOSED_FILE);
    let summary = tokio::task::spawn_blocking(move || {
        let summary = close(&s);
        if let Err(e) =
            streamrecon_core::io_util::write_bytes_atomic(&marker, b"closed by the client\n")
        {
            log::error!("{e}");
        }
        summary
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({ "id": id, "summary": summary })))
}

/// Files a client may download from a session's folder.
const DOWNLOADS: [&str; 6] = [
    "trajectory.txt",
    "poses_kitti.txt",
    "points.ply",
    "intrinsics.json",
    "run.json",
    "recording.rrd",
];

/// `recording-N.rrd`: a resumed session's later recordings.
fn is_recording_part(name: &str) -> bool {
    recording_part(name).is_some()
}

/// N of `recording-N.rrd`.
fn recording_part(name: &str) -> Option<u32> {
    name.strip_prefix("recording-")
        .and_then(|r| r.strip_suffix(".rrd"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
}

async fn download(
    State(state): State<Shared>,
    Path((id, name)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    let s = state.session(&id)?;
    if !DOWNLOADS.contains(&name.as_str()) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no file {name}; files: {}", DOWNLOADS.join(", ")),
        ));
    }
    let path = state.config.data_dir.join(&s.id).join(&name);
    let not_yet = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{name} is not written yet (outputs appear when the session closes)"),
        )
    };
    // Only the regular files the run wrote: a link put in the folder is not followed.
    let regular = tokio::fs::symlink_metadata(&path)
        .await
        .is_ok_and(|m| m.file_type().is_file());
    if !regular {
        return Err(not_yet());
    }
    let bytes = tokio::fs::read(&path).await.map_err(|_| not_yet())?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn list_sessions(State(state): State<Shared>) -> Json<serde_json::Value> {
    let sessions: Vec<Arc<Session>> = lock(&state.sessions).values().cloned().collect();
    let mut v: Vec<serde_json::Value> = sessions.iter().map(|s| status_json(s)).collect();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!(v))
}

/// A NATS worker's own routes, for front doors and scrapers: its sessions' live recordings
/// and its metrics (token needed), `/health`.
fn worker_router(state: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics::page))
        .route("/sessions/{id}/live.rrd", get(web_viewer::live_recording))
        .route_layer(middleware::from_fn_with_state(
            Arc::<str>::from(state.config.token.as_str()),
            auth,
        ))
        .route("/health", get(|| async { "ok" }))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// What needs no token, here and at a NATS front door: `/health`, the page (it holds no data:
/// it asks for the token and sends it with every API call) and rerun's web viewer.
fn page_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/", get(|| async { Html(streamrecon_viewer::WEB_PAGE) }))
        .route("/viewer", get(web_viewer::to_folder))
        .route("/viewer/", get(web_viewer::index))
        .route("/viewer/{file}", get(web_viewer::file))
}

/// The service's routes.
fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics::page))
        .route("/sessions", post(create_session).get(list_sessions))
        .route("/sessions/{id}", get(session_status).delete(close_session))
        .route("/sessions/{id}/frames", post(push_frame))
        .route("/sessions/{id}/results", get(session_results))
        .route("/sessions/{id}/events", get(session_events))
        .route("/sessions/{id}/stream", get(stream::upgrade))
        .route("/sessions/{id}/files/{name}", get(download))
        .route("/sessions/{id}/live.rrd", get(web_viewer::live_recording))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FRAME_BYTES + 1))
        .route_layer(middleware::from_fn_with_state(
            Arc::<str>::from(state.config.token.as_str()),
            auth,
        ));
    page_routes()
        // The browser's viewer cannot send a header: its link carries the token in the path.
        .route(
            "/sessions/{id}/token/{token}/live.rrd",
            get(web_viewer::live_recording_with_token),
        )
        .merge(api)
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// axum's own rejections (malformed JSON, a wrong content type, a body over the limit, an
/// unknown route) answer in plain text; the API's errors are JSON, so those are wrapped:
/// `{"error": "<the text>"}`, the status kept.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let mut res = (status, Json(json!({ "error": message }))).into_response();
    for (k, v) in &parts.headers {
        res.headers_mut().entry(k).or_insert_with(|| v.clone());
    }
    res
}

/// Runs the service until `shutdown` resolves; then closes every session (their outputs are
/// written) before returning.
///
/// # Errors
/// The address cannot be bound or the data folder cannot be made.
pub fn serve(
    config: &ServeConfig,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    streamrecon_core::io_util::create_dir(&config.data_dir)?;
    let rt = runtime("serve", 2)?;
    let earlier = earlier_sessions(&config.data_dir);
    let next = earlier
        .iter()
        .filter_map(|e| e.id[1..].parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let state = Arc::new(AppState {
        config: config.clone(),
        sessions: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(next),
    });
    resume_earlier(&state, earlier);
    let st = state.clone();
    rt.block_on(listen(config.bind, router(st), on_bound, shutdown))?;
    // Drain: every session's stream ends, its pipeline writes its outputs.
    let sessions: Vec<Arc<Session>> = lock(&state.sessions).values().cloned().collect();
    for s in sessions {
        let summary = close(&s);
        log::info!("session {} closed: {summary}", s.id);
    }
    Ok(())
}

/// The async runtime of a service process: `threads` workers named `name`.
fn runtime(name: &str, threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the {name} runtime: {e}")))
}

/// Serves `app` on `bind` until `shutdown` resolves; `on_bound` hears the address bound.
async fn listen(
    bind: SocketAddr,
    app: Router,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| Error::Invalid(format!("cannot listen on {bind}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    on_bound(addr);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Invalid(format!("service on {addr}: {e}")))
}

/// A session folder left by an earlier server.
struct Earlier {
    id: String,
    dir: PathBuf,
    /// Its client closed it (no resuming).
    closed: bool,
}

/// Session folders in the data folder, in id order.
fn earlier_sessions(dir: &std::path::Path) -> Vec<Earlier> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Earlier> = entries
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_string_lossy().to_string();
            let dir = e.path();
            (valid_id(&id).is_ok() && dir.join(SESSION_FILE).exists()).then(|| Earlier {
                closed: dir.join(CLOSED_FILE).exists(),
                id,
                dir,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Continues, under their own ids, the sessions an earlier server left running (stopped or
/// killed) that have an engine snapshot; the others are listed as stopped, their files
/// downloadable.
fn resume_earlier(state: &AppState, earlier: Vec<Earlier>) {
    for e in earlier {
        let snapshot = e.dir.join(pipeline::SNAPSHOT_FILE);
        let request = read_request(&e.dir);
        if !e.closed && snapshot.exists() {
            if let Some(req) = request {
                let next = streamrecon_geometry::snapshot_next_frame(&snapshot);
                match start_session(state, &e.id, &e.dir, &req, Some(snapshot), next) {
                    Ok(()) => {
                        log::info!(
                            "session {} resumed at frame {}",
                            e.id,
                            next.map_or("?".into(), |n| n.to_string())
                        );
                        continue;
                    }
                    Err(err) => log::error!("session {} not resumed: {}", e.id, err.1),
                }
            }
        }
        let summary = std::fs::read(e.dir.join("run.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        lock(&state.sessions).insert(e.id.clone(), Arc::new(Session::stopped(e.id, summary)));
    }
}
