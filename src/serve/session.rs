//! Sessions: what `POST /sessions` asks for, and starting a session's pipeline.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use crossbeam_channel::bounded;
use serde::{Deserialize, Serialize};
use serde_json::json;

use streamrecon_pipeline::options::{FlowEngineName, GeometryEngineName, PATH_OPTIONS};
use streamrecon_pipeline::source::{PushedFrame, Source, SourceOptions, SourceSpec};
use streamrecon_pipeline::{
    self as pipeline, FrameResult, PipelineConfig, ResultDetail, RunCounters, RunOptions,
};
use streamrecon_viewer::RerunTarget;

use super::{
    lock, valid_id, ApiError, AppState, Session, Shared, DETAIL_KEPT, FRAME_QUEUE,
    FRAME_QUEUE_LOSSLESS, RESULT_POINTS, RESULT_RING, SESSION_FILE,
};

/// Longest session name, characters.
const MAX_NAME_CHARS: usize = 200;

/// `POST /sessions` body; every field optional. Besides the service's own fields, any key of
/// [`RunOptions`] (the options `streamrecon run` takes, by the same names) over the server's;
/// unknown keys are refused.
#[derive(Deserialize, Serialize, Default, Clone)]
pub(crate) struct CreateSession {
    pub(crate) name: Option<String>,
    /// Continue an earlier session (its id) from its last engine snapshot, with its settings.
    pub(crate) resume: Option<String>,
    /// Read frames on the server from this camera (`camera:N`) or stream URL (allowlist only)
    /// instead of taking them from the client.
    pub(crate) source: Option<String>,
    /// Points per result (default 500; 0 = none).
    result_points: Option<usize>,
    /// Depth in each result, sampled every n-th pixel (default: no depth).
    result_depth_stride: Option<u32>,
    /// Keep every pushed frame: uploads wait for room instead of dropping the oldest (for
    /// recorded sequences; live clients want the default, latest-wins).
    lossless: Option<bool>,
    /// Live sessions fed by their client: frames in the pipeline's stages at once (default 1:
    /// the lowest latency; more pipelines the stages for a fast camera on an idle machine).
    in_flight: Option<usize>,
    /// Write the session's rerun recording (default true; false saves its share of the CPU,
    /// about a sixth of a session's under load, and its disk).
    record: Option<bool>,
    /// Every other key: a run option.
    #[serde(flatten)]
    options: serde_json::Map<String, serde_json::Value>,
}

impl CreateSession {
    /// The run options this request asks for: its keys over the server's options. Sessions run
    /// flowvo unless they ask for `"geometry": "vggt"`; files (weights, model configs) are the
    /// server's to name. The values are validated where they become a pipeline
    /// (`RunOptions::pipeline_config`).
    pub(crate) fn run_options(
        &self,
        server: &RunOptions,
    ) -> std::result::Result<RunOptions, String> {
        if let Some(k) = self
            .options
            .keys()
            .find(|k| PATH_OPTIONS.contains(&k.as_str()))
        {
            if k == "intrinsics_file" {
                return Err(
                    "intrinsics_file names a file on the server: a session's client sends \
                     undistorted frames (and `intrinsics`)"
                        .into(),
                );
            }
            return Err(format!(
                "{k} names a file on the server: the server's to set (`serve --{}`)",
                k.replace('_', "-")
            ));
        }
        let Ok(serde_json::Value::Object(mut merged)) = serde_json::to_value(server) else {
            return Err("the server's options do not serialise".into());
        };
        merged.extend(self.options.clone());
        let mut o: RunOptions = serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| format!("bad session options: {e}"))?;
        if o.geometry == Some(GeometryEngineName::Vggt) {
            if o.weights.is_none() {
                return Err("this server has no vggt weights (start it with --weights)".into());
            }
        } else {
            o.geometry = Some(GeometryEngineName::Flowvo);
            o.weights = None;
            o.model_config = None;
        }
        let learned_flow = matches!(
            o.flow,
            FlowEngineName::Videoflow | FlowEngineName::Streamflow
        );
        if learned_flow && o.flow_weights.is_none() {
            return Err(format!(
                "this server has no {} weights (start it with --flow-weights)",
                if o.flow == FlowEngineName::Videoflow {
                    "VideoFlow"
                } else {
                    "StreamFlow"
                }
            ));
        }
        if self.in_flight == Some(0) {
            return Err("in_flight must be 1 or more".into());
        }
        if self.result_depth_stride == Some(0) {
            return Err("result_depth_stride must be 1 or more".into());
        }
        Ok(o)
    }
}

pub(super) async fn create_session(
    State(state): State<Shared>,
    body: Option<Json<CreateSession>>,
) -> std::result::Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut req = body.map(|b| b.0).unwrap_or_default();
    let mut resume = None;
    if let Some(old) = req.resume.clone() {
        let dir = state.config.data_dir.join(valid_id(&old)?);
        let saved = read_request(&dir).ok_or_else(|| {
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
    if let Some(src) = &req.source {
        if !state.config.source_allowed(src) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "this source is not in the server's allowlist (serve --allow-source)".into(),
            ));
        }
    }
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("s{n:04}");
    let out = state.config.data_dir.join(&id);
    // Opening a server-side source and starting threads block: off the async workers.
    let ret = id.clone();
    tokio::task::spawn_blocking(move || start_session(&state, &id, &out, &req, resume, None))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok((StatusCode::CREATED, Json(json!({ "id": ret }))))
}

/// The request a session folder was made with.
pub(super) fn read_request(dir: &std::path::Path) -> Option<CreateSession> {
    std::fs::read(dir.join(SESSION_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Starts a session's pipeline writing into `out`; `resume` continues from an engine snapshot
/// (`resumed_at`: its frame number, for a session continued under its own id).
pub(super) fn start_session(
    state: &AppState,
    id: &str,
    out: &std::path::Path,
    req: &CreateSession,
    resume: Option<PathBuf>,
    resumed_at: Option<u64>,
) -> std::result::Result<(), ApiError> {
    let internal = |e: String| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e);
    if let Some(name) = &req.name {
        // The name is logged and shown: short, one line.
        if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "name must be at most {MAX_NAME_CHARS} characters with no control characters \
                     (got {} bytes)",
                    name.len()
                ),
            ));
        }
    }
    let options = req
        .run_options(&state.config.options)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let base = options
        .pipeline_config()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let running = lock(&state.sessions)
        .values()
        .filter(|s| s.running())
        .count();
    if running >= state.config.max_sessions {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{running} sessions running (--max-sessions {})",
                state.config.max_sessions
            ),
        ));
    }
    let label = format!(
        "session {id}{}",
        req.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    let lossless = req.lossless == Some(true);
    let (tx, rx) = bounded::<PushedFrame>(if lossless {
        FRAME_QUEUE_LOSSLESS
    } else {
        FRAME_QUEUE
    });
    let source = if let Some(src) = &req.source {
        let spec = match SourceSpec::parse(src) {
            Ok(spec) if spec.is_live() => spec,
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("{label}: source must be camera:N or a stream URL"),
                ))
            }
        };
        // Opening a camera can take a while; it is a session's start, not a hot path.
        Source::open(&spec, options.source_options()).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("{label}: the source does not open: {e}"),
            )
        })?
    } else {
        // The client's intrinsics travel with each pushed frame (`Session::intrinsics`).
        let read = SourceOptions {
            intrinsics: None,
            ..options.source_options()
        };
        let pushed = Source::pushed(&label, rx.clone(), read);
        if lossless {
            pushed.lossless()
        } else {
            pushed
        }
    };
    let counters = RunCounters::default();
    let (res_tx, res_rx) = bounded::<FrameResult>(256);
    let results = Arc::new(Mutex::new(VecDeque::new()));
    let newest = Arc::new(tokio::sync::watch::Sender::new(0));
    let collector = {
        let (results, newest) = (results.clone(), newest.clone());
        std::thread::Builder::new()
            .name(format!("results-{id}"))
            .spawn(move || {
                for (seq, mut r) in (1..).zip(res_rx) {
                    r.seq = seq;
                    let mut q = lock(&results);
                    if q.len() == RESULT_RING {
                        q.pop_front();
                    }
                    q.push_back(r);
                    // Points and depth only for the latest results: the ring stays small.
                    if q.len() > DETAIL_KEPT {
                        let i = q.len() - 1 - DETAIL_KEPT;
                        q[i].strip_detail();
                    }
                    drop(q);
                    newest.send_replace(seq);
                }
                // A closed session keeps its poses only.
                lock(&results)
                    .iter_mut()
                    .for_each(FrameResult::strip_detail);
            })
            .map_err(|e| internal(e.to_string()))?
    };
    let recording = (req.record != Some(false)).then(|| out.join(recording_name(out)));
    let config = PipelineConfig {
        out_dir: Some(out.to_path_buf()),
        rerun: if recording.is_none() {
            RerunTarget::default()
        } else {
            RerunTarget {
                save: recording.clone(),
                connect: state.config.connect.clone(),
                // A resumed session's parts are one recording in the viewer.
                recording_id: Some(id.to_string()),
                ..RerunTarget::default()
            }
        },
        result_detail: ResultDetail {
            points: req.result_points.unwrap_or(RESULT_POINTS),
            depth_stride: req.result_depth_stride.unwrap_or(0),
        },
        results: Some(res_tx),
        counters: Some(counters.clone()),
        // Live sessions: one frame in the stages at a time, so a result is about the frame just
        // sent and a machine that cannot keep up drops frames at the doors, not late everywhere.
        // A server-side camera or stream is read on regardless (its newest frame replaces the
        // waiting one inside): one left unread would hand over stale, buffered frames.
        channel_capacity: if lossless { 4 } else { 1 },
        in_flight: (!lossless && req.source.is_none()).then(|| req.in_flight.unwrap_or(1)),
        snapshot_every: if options.snapshot_every > 0 {
            options.snapshot_every
        } else {
            state.config.snapshot_every.max(1)
        },
        resume,
        ..base
    };
    streamrecon_core::io_util::create_dir(out).map_err(|e| internal(e.to_string()))?;
    let saved = serde_json::to_vec_pretty(req).unwrap_or_default();
    streamrecon_core::io_util::write_bytes_atomic(&out.join(SESSION_FILE), &saved)
        .map_err(|e| internal(e.to_string()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
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
            .map_err(|e| internal(e.to_string()))?
    };
    let server_side = req.source.is_some();
    let session = Arc::new(Session {
        intrinsics: options.intrinsics,
        id: id.to_string(),
        started: Instant::now(),
        // A server-side source takes no frames from the client.
        tx: Mutex::new((!server_side).then_some(tx)),
        rx_drop: rx,
        results,
        newest,
        collector: Mutex::new(Some(collector)),
        counters,
        pipeline: Mutex::new(Some(handle)),
        summary: Mutex::new(None),
        stop,
        size: Mutex::new(None),
        last_timestamp: Mutex::new(None),
        source: req.source.clone(),
        resumed_at,
        lossless,
        recording,
    });
    lock(&state.sessions).insert(id.to_string(), session);
    log::info!("{label} started, outputs in {}", out.display());
    Ok(())
}

/// `recording.rrd`, or `recording-N.rrd` for the N-th continuation of a session (earlier
/// recordings are kept).
fn recording_name(out: &std::path::Path) -> String {
    if !out.join("recording.rrd").exists() {
        return "recording.rrd".into();
    }
    (1..10_000)
        .map(|n| format!("recording-{n}.rrd"))
        .find(|name| !out.join(name).exists())
        .unwrap_or_else(|| "recording.rrd".into())
}
