//! `streamrecon serve`: the pipeline as a network service. One pipeline (and one model memory)
//! per session; clients push frames over HTTP and read results back; every endpoint but
//! `/health` needs the bearer token. API: `docs/api.md`.
//!
//! Sessions are live: frames are latest-wins with counted drops, queues are bounded, and a slow
//! client only slows itself. Each session writes its outputs (trajectory, points, run.json, an
//! .rrd recording) to `DATA_DIR/<id>/`.

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
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::geometry::flowvo::{AdaptiveKeyframes, FlowVoConfig};
use crate::geometry::stabilize::StabilizeConfig;
use crate::geometry::vggt::VggtEngineConfig;
use crate::models::vggt::memory::MemoryUpdate;
use crate::pipeline::{self, FrameResult, GeometryChoice, PipelineConfig};
use crate::source::{PushedFrame, Source, SourceOptions};
use crate::viewer::RerunTarget;

/// The request a session was made with, kept in its folder so it can be resumed.
const SESSION_FILE: &str = "session.json";
/// Engine snapshots (vggt) every this many frames, and at the end of every session.
const SNAPSHOT_EVERY: u64 = 100;

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
/// Frames queued per session before the oldest is dropped.
const FRAME_QUEUE: usize = 4;
/// Largest accepted frame upload.
const MAX_FRAME_BYTES: usize = 32 << 20;

/// How to run the service.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The `vggt` engine sessions may ask for (`None`: flowvo only).
    pub vggt: Option<VggtEngineConfig>,
    pub bind: SocketAddr,
    pub token: String,
    pub max_sessions: usize,
    pub data_dir: PathBuf,
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
    received: AtomicU64,
    dropped: AtomicU64,
    pipeline: Mutex<Option<JoinHandle<std::result::Result<serde_json::Value, String>>>>,
    summary: Mutex<Option<serde_json::Value>>,
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

async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), state.config.token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /sessions` body; every field optional.
#[derive(Deserialize, Serialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    name: Option<String>,
    /// Continue an earlier session (its id) from its last engine snapshot, with its settings.
    resume: Option<String>,
    /// `flowvo` (default) or `vggt` (needs `serve --weights`).
    geometry: Option<String>,
    /// vggt: total KV-cache token budget (0 = no pruning).
    total_budget: Option<usize>,
    /// `uniform` (default) or `adaptive`.
    memory_update: Option<String>,
    /// Pinhole intrinsics of the frames at their own resolution: fx, fy, cx, cy.
    intrinsics: Option<[f64; 4]>,
    /// Online trajectory stabilization.
    stabilize: Option<bool>,
}

impl CreateSession {
    /// The pipeline configuration this request asks for.
    fn pipeline(
        &self,
        vggt: Option<&VggtEngineConfig>,
    ) -> std::result::Result<PipelineConfig, String> {
        let adaptive = match self.memory_update.as_deref() {
            None | Some("uniform") => false,
            Some("adaptive") => true,
            Some(other) => {
                return Err(format!(
                    "memory_update must be uniform or adaptive, not {other:?}"
                ))
            }
        };
        let geometry = match self.geometry.as_deref() {
            None | Some("flowvo") => GeometryChoice::FlowVo(FlowVoConfig {
                adaptive: adaptive.then(AdaptiveKeyframes::default),
                ..FlowVoConfig::default()
            }),
            Some("vggt") => {
                let mut c = vggt
                    .ok_or("this server has no vggt weights (start it with --weights)")?
                    .clone();
                if let Some(b) = self.total_budget {
                    c.total_budget = (b > 0).then_some(b);
                }
                if adaptive {
                    c.update = MemoryUpdate::Adaptive {
                        threshold: 0.1,
                        gamma: 0.2,
                    };
                }
                GeometryChoice::Vggt(c)
            }
            Some(other) => return Err(format!("geometry must be flowvo or vggt, not {other:?}")),
        };
        if let Some(k) = self.intrinsics {
            if !(k.iter().all(|v| v.is_finite()) && k[0] > 0.0 && k[1] > 0.0) {
                return Err(
                    "intrinsics must be finite fx, fy, cx, cy with positive focal lengths".into(),
                );
            }
        }
        Ok(PipelineConfig {
            geometry,
            stabilize: self
                .stabilize
                .unwrap_or(false)
                .then(StabilizeConfig::default),
            ..PipelineConfig::default()
        })
    }
}

async fn create_session(
    State(state): State<Shared>,
    body: Option<Json<CreateSession>>,
) -> std::result::Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut req = body.map(|b| b.0).unwrap_or_default();
    let mut resume = None;
    if let Some(old) = req.resume.clone() {
        let dir = state.config.data_dir.join(valid_id(&old)?);
        let saved: CreateSession = std::fs::read(dir.join(SESSION_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                ApiError(StatusCode::NOT_FOUND, format!("no session {old} to resume"))
            })?;
        let snap = dir.join(pipeline::SNAPSHOT_FILE);
        if !snap.exists() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("session {old} left no snapshot (only vggt sessions have one)"),
            ));
        }
        req = CreateSession {
            resume: Some(old),
            ..saved
        };
        resume = Some(snap);
    }
    let base = req
        .pipeline(state.config.vggt.as_ref())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let mut sessions = lock(&state.sessions);
    let running = sessions.values().filter(|s| lock(&s.tx).is_some()).count();
    if running >= state.config.max_sessions {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{running} sessions running (--max-sessions {})",
                state.config.max_sessions
            ),
        ));
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("s{n:04}");
    let out = state.config.data_dir.join(&id);
    let (tx, rx) = bounded::<PushedFrame>(FRAME_QUEUE);
    let (res_tx, res_rx) = bounded::<FrameResult>(256);
    let results = Arc::new(Mutex::new(VecDeque::new()));
    {
        let results = results.clone();
        std::thread::Builder::new()
            .name(format!("results-{id}"))
            .spawn(move || {
                for r in res_rx {
                    let mut q = lock(&results);
                    if q.len() == RESULT_RING {
                        q.pop_front();
                    }
                    q.push_back(r);
                }
            })
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    let config = PipelineConfig {
        out_dir: Some(out.clone()),
        rerun: RerunTarget {
            save: Some(out.join("recording.rrd")),
            ..RerunTarget::default()
        },
        results: Some(res_tx),
        snapshot_every: SNAPSHOT_EVERY,
        resume,
        ..base
    };
    crate::io_util::create_dir(&out)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let saved = serde_json::to_vec_pretty(&req).unwrap_or_default();
    crate::io_util::write_bytes_atomic(&out.join(SESSION_FILE), &saved)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // Closing the session ends its stream; the stop flag is for the pipeline's signature.
    let stop = Arc::new(AtomicBool::new(false));
    let source = Source::pushed(
        &format!(
            "session {id}{}",
            req.name.map(|n| format!(" ({n})")).unwrap_or_default()
        ),
        rx.clone(),
        SourceOptions::default(),
    );
    let handle = {
        std::thread::Builder::new()
            .name(format!("session-{id}"))
            .spawn(move || {
                let outcome = pipeline::run(source, &config, &stop).map_err(|e| e.to_string())?;
                let mut v = serde_json::to_value(&outcome.summary).map_err(|e| e.to_string())?;
                if let Some(e) = outcome.error {
                    v["error"] = json!(e.to_string());
                }
                Ok(v)
            })
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    let session = Arc::new(Session {
        intrinsics: req.intrinsics,
        id: id.clone(),
        started: Instant::now(),
        tx: Mutex::new(Some(tx)),
        rx_drop: rx,
        results,
        received: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        pipeline: Mutex::new(Some(handle)),
        summary: Mutex::new(None),
    });
    sessions.insert(id.clone(), session);
    log::info!("session {id} started, outputs in {}", out.display());
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
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
    let tx = lock(&s.tx)
        .clone()
        .ok_or_else(|| ApiError(StatusCode::CONFLICT, format!("session {id} is closed")))?;
    let timestamp = match headers.get("x-timestamp") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
                .filter(|t| t.is_finite())
                .ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        "x-timestamp must be seconds, a finite number".into(),
                    )
                })?,
        ),
        None => None,
    };
    // Decoding off the async workers: a large JPEG takes milliseconds.
    let image = tokio::task::spawn_blocking(move || image::load_from_memory(&body))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("frame is not a PNG/JPEG image: {e}"),
            )
        })?
        .to_rgb8();
    if image.width() < 16 || image.height() < 16 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "frame of {}x{} is too small (16x16 at least)",
                image.width(),
                image.height()
            ),
        ));
    }
    let intrinsics = s
        .intrinsics
        .map(|[fx, fy, cx, cy]| crate::frame::Intrinsics {
            fx,
            fy,
            cx,
            cy,
            width: image.width(),
            height: image.height(),
        });
    let mut frame = PushedFrame {
        image,
        timestamp,
        intrinsics,
    };
    s.received.fetch_add(1, Ordering::Relaxed);
    loop {
        match tx.try_send(frame) {
            Ok(()) => break,
            Err(TrySendError::Full(f)) => {
                // Latest wins: the oldest queued frame makes room.
                if s.rx_drop.try_recv().is_ok() {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
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
    Ok(Json(json!({
        "received": s.received.load(Ordering::Relaxed),
        "dropped": s.dropped.load(Ordering::Relaxed),
    })))
}

fn status_json(s: &Session) -> serde_json::Value {
    let results = lock(&s.results);
    let elapsed = s.started.elapsed().as_secs_f64();
    let processed = results.back().map_or(0, |r| r.index + 1);
    json!({
        "id": s.id,
        "running": lock(&s.tx).is_some(),
        "frames_received": s.received.load(Ordering::Relaxed),
        "frames_dropped": s.dropped.load(Ordering::Relaxed),
        "frames_processed": processed,
        "fps": if elapsed > 0.0 { processed as f64 / elapsed } else { 0.0 },
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
    #[serde(default)]
    since: u64,
}

async fn session_results(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> std::result::Result<Json<Vec<FrameResult>>, ApiError> {
    let s = state.session(&id)?;
    let r = lock(&s.results)
        .iter()
        .filter(|r| r.index >= q.since)
        .cloned()
        .collect();
    Ok(Json(r))
}

/// `GET /sessions/{id}/events?since=N`: results as server-sent events (`event: result`, JSON
/// data), in order, as they arrive; the stream ends after the last result of a closed session.
async fn session_events(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> std::result::Result<
    Sse<impl futures_util::Stream<Item = std::result::Result<Event, std::convert::Infallible>>>,
    ApiError,
> {
    let s = state.session(&id)?;
    let stream = futures_util::stream::unfold((s, q.since), |(s, next)| async move {
        loop {
            let (found, open) = {
                let ring = lock(&s.results);
                let found = ring.iter().find(|r| r.index >= next).cloned();
                // Open until the pipeline has been joined (its last results are in the ring).
                (found, lock(&s.summary).is_none())
            };
            if let Some(r) = found {
                let event = Event::default()
                    .event("result")
                    .json_data(&r)
                    .unwrap_or_else(|_| Event::default().comment("unserialisable result"));
                return Some((Ok(event), (s, r.index + 1)));
            }
            if !open {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Ends a session's stream and waits for its outputs.
fn close(s: &Session) -> serde_json::Value {
    lock(&s.tx).take();
    let handle = lock(&s.pipeline).take();
    if let Some(h) = handle {
        let summary = match h.join() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => json!({ "error": e }),
            Err(_) => json!({ "error": "the session's pipeline panicked" }),
        };
        *lock(&s.summary) = Some(summary);
    }
    lock(&s.summary).clone().unwrap_or(serde_json::Value::Null)
}

async fn close_session(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let s = state.session(&id)?;
    let summary = tokio::task::spawn_blocking(move || close(&s))
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
    let bytes = tokio::fs::read(&path).await.map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("{name} is not written yet (outputs appear when the session closes)"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn list_sessions(State(state): State<Shared>) -> Json<serde_json::Value> {
    let sessions: Vec<Arc<Session>> = lock(&state.sessions).values().cloned().collect();
    let mut v: Vec<serde_json::Value> = sessions.iter().map(|s| status_json(s)).collect();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!(v))
}

/// Upper bounds of the latency histogram on the metrics page, milliseconds.
const BUCKETS_MS: [f64; 8] = [10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0];

/// A per-session counter of the metrics page.
type Counter = fn(&Session) -> u64;

impl Session {
    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
    fn processed(&self) -> u64 {
        lock(&self.results).back().map_or(0, |r| r.index + 1)
    }
}

async fn metrics(State(state): State<Shared>) -> String {
    use std::fmt::Write;
    let sessions: Vec<Arc<Session>> = lock(&state.sessions).values().cloned().collect();
    let running = sessions.iter().filter(|s| lock(&s.tx).is_some()).count();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# TYPE streamrecon_sessions gauge");
    let _ = writeln!(out, "streamrecon_sessions{{state=\"running\"}} {running}");
    let _ = writeln!(
        out,
        "streamrecon_sessions{{state=\"closed\"}} {}",
        sessions.len() - running
    );
    let counters: [(&str, Counter); 3] = [
        ("frames_received", Session::received),
        ("frames_dropped", Session::dropped),
        ("frames_processed", Session::processed),
    ];
    for (name, f) in counters {
        let _ = writeln!(out, "# TYPE streamrecon_{name}_total counter");
        for s in &sessions {
            let _ = writeln!(
                out,
                "streamrecon_{name}_total{{session=\"{}\"}} {}",
                s.id,
                f(s)
            );
        }
    }
    // End-to-end latency (frame read → result) over the results each session still holds.
    let _ = writeln!(out, "# TYPE streamrecon_result_latency_ms histogram");
    for s in &sessions {
        let ring = lock(&s.results);
        let mut sum = 0.0;
        for &le in &BUCKETS_MS {
            let n = ring.iter().filter(|r| r.latency_ms <= le).count();
            let _ = writeln!(
                out,
                "streamrecon_result_latency_ms_bucket{{session=\"{}\",le=\"{le}\"}} {n}",
                s.id
            );
        }
        for r in ring.iter() {
            sum += r.latency_ms;
        }
        let _ = writeln!(
            out,
            "streamrecon_result_latency_ms_bucket{{session=\"{}\",le=\"+Inf\"}} {}",
            s.id,
            ring.len()
        );
        let _ = writeln!(
            out,
            "streamrecon_result_latency_ms_sum{{session=\"{}\"}} {sum:.1}",
            s.id
        );
        let _ = writeln!(
            out,
            "streamrecon_result_latency_ms_count{{session=\"{}\"}} {}",
            s.id,
            ring.len()
        );
    }
    let _ = writeln!(out, "# TYPE streamrecon_rss_mib gauge");
    let _ = writeln!(out, "streamrecon_rss_mib {:.1}", crate::stats::rss_mib());
    out
}

/// The service's routes.
fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/", get(|| async { Html(crate::viewer::WEB_PAGE) }))
        .route("/metrics", get(metrics))
        .route("/sessions", post(create_session).get(list_sessions))
        .route("/sessions/{id}", get(session_status).delete(close_session))
        .route("/sessions/{id}/frames", post(push_frame))
        .route("/sessions/{id}/results", get(session_results))
        .route("/sessions/{id}/events", get(session_events))
        .route("/sessions/{id}/files/{name}", get(download))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FRAME_BYTES + 1))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(api)
        .with_state(state)
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
    crate::io_util::create_dir(&config.data_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve")
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the service runtime: {e}")))?;
    let earlier = earlier_sessions(&config.data_dir);
    let next = earlier
        .keys()
        .filter_map(|id| id[1..].parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    if !earlier.is_empty() {
        log::info!(
            "{} earlier sessions in {}",
            earlier.len(),
            config.data_dir.display()
        );
    }
    let state = Arc::new(AppState {
        config: config.clone(),
        sessions: Mutex::new(earlier),
        next_id: AtomicU64::new(next),
    });
    let st = state.clone();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|e| Error::Invalid(format!("cannot listen on {}: {e}", config.bind)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        on_bound(addr);
        axum::serve(listener, router(st))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::Invalid(format!("service: {e}")))
    })?;
    // Drain: every session's stream ends, its pipeline writes its outputs.
    let sessions: Vec<Arc<Session>> = lock(&state.sessions).values().cloned().collect();
    for s in sessions {
        let summary = close(&s);
        log::info!("session {} closed: {summary}", s.id);
    }
    Ok(())
}

/// Sessions left in the data folder by an earlier run: listed as closed, their files downloadable,
/// resumable with `{"resume": id}` when they have a snapshot.
fn earlier_sessions(dir: &std::path::Path) -> HashMap<String, Arc<Session>> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if valid_id(&name).is_err() || !e.path().join(SESSION_FILE).exists() {
            continue;
        }
        let summary = std::fs::read(e.path().join("run.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let (_, rx) = bounded::<PushedFrame>(1);
        out.insert(
            name.clone(),
            Arc::new(Session {
                id: name,
                intrinsics: None,
                started: Instant::now(),
                tx: Mutex::new(None),
                rx_drop: rx,
                results: Arc::new(Mutex::new(VecDeque::new())),
                received: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                pipeline: Mutex::new(None),
                summary: Mutex::new(Some(summary)),
            }),
        );
    }
    out
}
