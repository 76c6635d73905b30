//! `streamrecon serve --nats URL`: a front door with the embedded server's HTTP API that keeps
//! no session state: sessions are records in the broker, frames are published to the session's
//! subject, results read back from its results subject, outputs from the outputs store. Any
//! front door serves any session.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::HeaderMap as NatsHeaders;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;

use streamrecon_core::error::Result;

use super::{
    frames_subject, results_subject, sorted_keys, unix_now, Broker, NatsConfig, SessionRecord,
    SessionState, END_HEADER,
};
use crate::session::CreateSession;
use crate::{
    auth, check_token, frame_headers, is_recording_part, json_errors, listen, lock, page_routes,
    runtime, valid_id, ApiError, ServeConfig, Since, DOWNLOADS, MAX_FRAME_BYTES, RAW_RGB,
};

/// Results one poll returns at most (the client asks again from the last `seq`).
const RESULTS_PER_POLL: usize = 1_000;
/// How long a close waits for the session's worker to finish its frames and outputs.
const CLOSE_WAIT: Duration = Duration::from_mins(10);

struct Door {
    config: ServeConfig,
    broker: Broker,
    /// The open sessions, as the sessions bucket's watch says (from every record's last value
    /// on): an upload to one of them needs no read of its record. `None` once the watch broke:
    /// every upload reads the record.
    open: Arc<Mutex<Option<HashSet<String>>>>,
}

type Shared = Arc<Door>;

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

impl Door {
    async fn record(&self, id: &str) -> std::result::Result<(SessionRecord, u64), ApiError> {
        valid_id(id)?;
        self.broker
            .record(id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no session {id}")))
    }

    /// The session's record says closed (all its results published); false when it cannot
    /// be read.
    async fn is_closed(&self, id: &str) -> bool {
        self.record(id)
            .await
            .is_ok_and(|(r, _)| r.state == SessionState::Closed)
    }

    /// The session takes frames: known open from the watch, or its record says so.
    async fn takes_frames(&self, id: &str) -> std::result::Result<bool, ApiError> {
        valid_id(id)?;
        let known = lock(&self.open)
            .as_ref()
            .is_some_and(|open| open.contains(id));
        if known {
            return Ok(true);
        }
        Ok(self.record(id).await?.0.state == SessionState::Open)
    }
}

/// Keeps `open` up to date from the sessions bucket's watch until it breaks; then drops it.
async fn watch_open(
    sessions: async_nats::jetstream::kv::Store,
    open: Arc<Mutex<Option<HashSet<String>>>>,
) {
    use async_nats::jetstream::kv::Operation;
    let watch = sessions.watch_with_history(">").await;
    let Ok(mut watch) = watch else {
        lock(&open).take();
        return;
    };
    while let Some(Ok(e)) = watch.next().await {
        let is_open = e.operation == Operation::Put
            && serde_json::from_slice::<SessionRecord>(&e.value)
                .is_ok_and(|r| r.state == SessionState::Open);
        let mut guard = lock(&open);
        let Some(set) = guard.as_mut() else { return };
        if is_open {
            set.insert(e.key);
        } else {
            set.remove(&e.key);
        }
    }
    log::warn!("the sessions watch ended: every upload reads its session's record");
    lock(&open).take();
}

/// Runs a front door until `shutdown` resolves.
///
/// # Errors
/// NATS cannot be reached or the address cannot be bound.
pub fn serve_door(
    config: &ServeConfig,
    nats: &NatsConfig,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    runtime("door", 2)?.block_on(async move {
        let broker = Broker::connect(nats, "streamrecon-door").await?;
        let open = Arc::new(Mutex::new(Some(HashSet::new())));
        tokio::spawn(watch_open(broker.sessions.clone(), open.clone()));
        let state = Arc::new(Door {
            config: config.clone(),
            broker,
            open,
        });
        listen(config.bind, router(state), on_bound, shutdown).await
    })
}

fn router(state: Shared) -> Router {
    let token: Arc<str> = Arc::from(state.config.token.as_str());
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/sessions", post(create_session).get(list_sessions))
        .route("/sessions/{id}", get(session_status).delete(close_session))
        .route("/sessions/{id}/frames", post(push_frame))
        .route("/sessions/{id}/results", get(session_results))
        .route("/sessions/{id}/files/{name}", get(download))
        .route("/sessions/{id}/events", get(session_events))
        .route("/sessions/{id}/stream", get(stream_upgrade))
        .route("/sessions/{id}/live.rrd", get(live_recording))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FRAME_BYTES + 1))
        .route_layer(middleware::from_fn_with_state(token, auth));
    page_routes()
        .route(
            "/sessions/{id}/token/{token}/live.rrd",
            get(live_recording_with_token),
        )
        .merge(api)
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// A new session id: `s` and 12 digits from the clock; the bucket refuses one that exists.
fn new_id(attempt: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "s{:012}",
        (nanos / 1_000 + u128::from(attempt) * 7_919) % 1_000_000_000_000
    )
}

async fn create_session(
    State(door): State<Shared>,
    body: Option<Json<CreateSession>>,
) -> std::result::Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let req = body.map(|b| b.0).unwrap_or_default();
    req.check_for_nats()?;
    // The same checks as the embedded server, before the session exists.
    let options = req
        .run_options(&door.config.options)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    options
        .pipeline_config()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let record = SessionRecord {
        request: req,
        state: SessionState::Open,
        created_unix: unix_now(),
        summary: None,
    };
    let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
    for attempt in 0..10 {
        let id = new_id(attempt);
        if door
            .broker
            .sessions
            .create(&id, value.clone())
            .await
            .is_ok()
        {
            log::info!("session {id} created");
            return Ok((StatusCode::CREATED, Json(json!({ "id": id }))));
        }
    }
    Err(unavailable("could not create a session record"))
}

async fn push_frame(
    State(door): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let seq = publish_frame(&door, &id, header, body).await?;
    Ok(Json(json!({ "stream_seq": seq })))
}

/// Checks a frame (session open, size, headers) and publishes it to the session's frames;
/// its stream sequence once the broker has stored it.
async fn publish_frame<'a>(
    door: &Door,
    id: &str,
    header: impl Fn(&str) -> Option<&'a str>,
    body: Bytes,
) -> std::result::Result<u64, ApiError> {
    if !door.takes_frames(id).await? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("session {id} is closed"),
        ));
    }
    let limit = MAX_FRAME_BYTES.min(door.broker.max_payload.saturating_sub(4096));
    if body.len() > limit {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "frame of {} bytes (limit {limit}: the NATS server's max_payload)",
                body.len()
            ),
        ));
    }
    // Checked here so the client hears of a bad header or what is plainly not an image; the
    // worker decodes it.
    let (raw, _) = frame_headers(&header)?;
    crate::frames::check_undecoded(&body, raw)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.0))?;
    let mut h = NatsHeaders::new();
    for name in ["content-type", "x-width", "x-height", "x-timestamp"] {
        if let Some(v) = header(name) {
            h.insert(name, v);
        }
    }
    let ack = door
        .broker
        .js
        .publish_with_headers(frames_subject(id), h, body)
        .await
        .map_err(unavailable)?
        .await
        .map_err(|e| {
            unavailable(format!(
                "the broker did not take the frame ({e}); try again"
            ))
        })?;
    Ok(ack.sequence)
}

/// `GET /sessions/{id}/stream`: the embedded server's WebSocket (see `stream.rs`): frames in as
/// binary messages, each result out as a text message as it is published, errors as
/// `{"error": …}` text messages; closed after the last result of a closed session.
async fn stream_upgrade(
    State(door): State<Shared>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> std::result::Result<Response, ApiError> {
    door.record(&id).await?;
    // Results published from now on, as the embedded server sends them.
    let results = results_from(&door.broker, &id, DeliverPolicy::New).await?;
    Ok(ws
        .max_message_size(MAX_FRAME_BYTES + crate::stream::HEADER)
        .on_upgrade(move |socket| follow(door, id, results, socket)))
}

async fn follow(door: Shared, id: String, mut results: pull::Ordered, mut socket: WebSocket) {
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                None | Some(Err(_) | Ok(Message::Close(_))) => break,
                Some(Ok(Message::Binary(b))) => {
                    if let Err(e) = publish_message(&door, &id, b).await {
                        let text = json!({ "error": e }).to_string();
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(_)) => {}
            },
            next = tokio::time::timeout(Duration::from_millis(500), results.next()) => {
                match next {
                    Ok(Some(Ok(m))) => {
                        let text = match result_json(&m, 0) {
                            Some(v) => v.to_string(),
                            // A frame the worker could not decode: said as the embedded
                            // server says it.
                            None => match serde_json::from_slice::<serde_json::Value>(&m.payload) {
                                Ok(v) if v.get("error").is_some() => v.to_string(),
                                _ => continue,
                            },
                        };
                        // A client that stops reading stalls only this connection.
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    Ok(Some(Err(_)) | None) => {
                        let text = json!({ "error": "the results stream ended" }).to_string();
                        let _ = socket.send(Message::Text(text.into())).await;
                        break;
                    }
                    // Quiet: a closed session has published all its results before it reads
                    // as closed.
                    Err(_) => {
                        if door.is_closed(&id).await {
                            let _ = socket.send(Message::Close(None)).await;
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// A WebSocket frame message published as an HTTP upload's would be.
async fn publish_message(door: &Door, id: &str, b: Bytes) -> std::result::Result<(), String> {
    let (timestamp, raw, frame) = crate::stream::parse(b)?;
    let timestamp = timestamp.map(|t| t.to_string());
    let (width, height) = raw.map(|(w, h)| (w.to_string(), h.to_string())).unzip();
    let header = |name: &str| match name {
        "content-type" => raw.map(|_| RAW_RGB),
        "x-width" => width.as_deref(),
        "x-height" => height.as_deref(),
        "x-timestamp" => timestamp.as_deref(),
        _ => None,
    };
    publish_frame(door, id, header, frame)
        .await
        .map(|_| ())
        .map_err(|e| e.1)
}

async fn session_results(
    State(door): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> std::result::Result<Json<Vec<serde_json::Value>>, ApiError> {
    door.record(&id).await?;
    Ok(Json(read_results(&door.broker, &id, &q).await?))
}

/// The session's results after `q.after_seq` (their `seq` is the results stream's sequence),
/// of frames from `q.since` on.
async fn read_results(
    broker: &Broker,
    id: &str,
    q: &Since,
) -> std::result::Result<Vec<serde_json::Value>, ApiError> {
    let mut messages = results_consumer(broker, id, q.after_seq).await?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while out.len() < RESULTS_PER_POLL {
        let wait = deadline.saturating_duration_since(Instant::now());
        // An empty subject delivers nothing: a short wait says so.
        let first_wait = if out.is_empty() {
            Duration::from_millis(150)
        } else {
            wait
        };
        let Ok(Some(Ok(m))) = tokio::time::timeout(first_wait.min(wait), messages.next()).await
        else {
            break;
        };
        let Ok(pending) = m.info().map(|i| i.pending) else {
            break;
        };
        out.extend(result_json(&m, q.since));
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// A consumer of the session's results after `after_seq` (all without it).
async fn results_consumer(
    broker: &Broker,
    id: &str,
    after_seq: Option<u64>,
) -> std::result::Result<pull::Ordered, ApiError> {
    let from = match after_seq {
        Some(a) => DeliverPolicy::ByStartSequence {
            start_sequence: a + 1,
        },
        None => DeliverPolicy::All,
    };
    results_from(broker, id, from).await
}

/// A consumer of the session's results, delivered as `from` says.
async fn results_from(
    broker: &Broker,
    id: &str,
    from: DeliverPolicy,
) -> std::result::Result<pull::Ordered, ApiError> {
    let consumer = broker
        .results
        .create_consumer(pull::OrderedConfig {
            filter_subject: results_subject(id),
            deliver_policy: from,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    consumer.messages().await.map_err(unavailable)
}

/// A result message as the client sees it: `seq` is its stream sequence; `None` for a frame
/// before `since` or a message that is not a result.
fn result_json(m: &async_nats::jetstream::Message, since: u64) -> Option<serde_json::Value> {
    let seq = m.info().ok()?.stream_sequence;
    let mut v: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
    // A frame the worker refused is published as `{"error": …}`, without an index.
    if v.get("index")?.as_u64()? < since {
        return None;
    }
    v["seq"] = json!(seq);
    Some(v)
}

/// `GET /sessions/{id}/events?since=N&after_seq=S`: the session's results as server-sent events
/// (`event: result`), as the embedded server sends them; the stream ends after the last result
/// of a closed session.
async fn session_events(
    State(door): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> std::result::Result<
    Sse<impl futures_util::Stream<Item = std::result::Result<Event, std::convert::Infallible>>>,
    ApiError,
> {
    door.record(&id).await?;
    let messages = results_consumer(&door.broker, &id, q.after_seq).await?;
    let since = q.since;
    let stream = futures_util::stream::unfold(
        (door, id, messages),
        move |(door, id, mut messages)| async move {
            loop {
                match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                    Ok(Some(Ok(m))) => {
                        let Some(v) = result_json(&m, since) else {
                            continue;
                        };
                        let event = Event::default()
                            .event("result")
                            .json_data(&v)
                            .unwrap_or_else(|_| Event::default().comment("unserialisable result"));
                        return Some((Ok(event), (door, id, messages)));
                    }
                    Ok(Some(Err(_)) | None) => return None,
                    // Quiet: a closed session has published all its results before it reads
                    // as closed, so the stream ends.
                    Err(_) => {
                        if door.is_closed(&id).await {
                            return None;
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn status_json(door: &Door, id: &str) -> std::result::Result<serde_json::Value, ApiError> {
    let (record, _) = door.record(id).await?;
    let lease = door.broker.lease(id).await.map_err(unavailable)?;
    let last = door
        .broker
        .results
        .get_last_raw_message_by_subject(&results_subject(id))
        .await
        .ok()
        .and_then(|m| {
            let mut v: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
            v.get("index")?;
            v["seq"] = json!(m.sequence);
            Some(v)
        });
    Ok(json!({
        "id": id,
        "state": record.state,
        "running": lease.is_some() && record.state != SessionState::Closed,
        "worker": lease.as_ref().map(|l| l.worker.clone()),
        "resumed_at": lease.as_ref().and_then(|l| l.resumed_at),
        "frames_received": lease.as_ref().map(|l| l.frames_received),
        "frames_processed": lease.as_ref().map(|l| l.frames_processed),
        "frames_dropped": lease.as_ref().map(|l| l.frames_dropped),
        "name": record.request.name,
        "created_unix": record.created_unix,
        "last": last,
        "summary": record.summary,
    }))
}

async fn session_status(
    State(door): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(status_json(&door, &id).await?))
}

async fn list_sessions(
    State(door): State<Shared>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let ids = sorted_keys(&door.broker.sessions, "sessions")
        .await
        .map_err(unavailable)?;
    let mut out = Vec::new();
    for id in ids {
        if let Ok(v) = status_json(&door, &id).await {
            out.push(v);
        }
    }
    Ok(Json(json!(out)))
}

/// Marks the session closing, ends its frames, and waits for its worker to write the outputs.
async fn close_session(
    State(door): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Json<serde_json::Value>, ApiError> {
    let (mut record, revision) = door.record(&id).await?;
    // Made before the record changes, so the worker's `closed` is not missed.
    let mut changes = door.broker.sessions.watch(&id).await.ok();
    if record.state == SessionState::Open {
        record.state = SessionState::Closing;
        let v: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
        // A second close at the same time finds the record changed and only waits.
        if door.broker.sessions.update(&id, v, revision).await.is_ok() {
            let mut h = NatsHeaders::new();
            h.insert(END_HEADER, "1");
            door.broker
                .js
                .publish_with_headers(frames_subject(&id), h, Bytes::new())
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)?;
        }
    }
    let started = Instant::now();
    loop {
        let (r, _) = door.record(&id).await?;
        if r.state == SessionState::Closed {
            return Ok(Json(json!({ "id": id, "summary": r.summary })));
        }
        if started.elapsed() > CLOSE_WAIT {
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "session {id} is closing: no worker finished it within {CLOSE_WAIT:?} \
                     (see its status)"
                ),
            ));
        }
        // The next change of the record; a second at most, in case the watch missed it.
        match &mut changes {
            Some(w) => {
                if let Ok(None | Some(Err(_))) =
                    tokio::time::timeout(Duration::from_secs(1), w.next()).await
                {
                    changes = None;
                }
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn download(
    State(door): State<Shared>,
    Path((id, name)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    door.record(&id).await?;
    if !DOWNLOADS.contains(&name.as_str()) && !is_recording_part(&name) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no file {name}; files: {}", DOWNLOADS.join(", ")),
        ));
    }
    // Passed on as it is read: a long session's recording is gigabytes.
    let object = door
        .broker
        .outputs
        .get(format!("{id}/{name}"))
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("{name} is not written yet (outputs appear when the session closes)"),
            )
        })?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(object));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

impl CreateSession {
    /// What a NATS front door cannot do: a server-side camera belongs to one machine, and
    /// resuming is the workers' own business.
    fn check_for_nats(&self) -> std::result::Result<(), ApiError> {
        if self.source.is_some() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "source: server-side cameras and streams are not served through NATS (run \
                 `streamrecon serve` without --nats on the camera's machine)"
                    .into(),
            ));
        }
        if self.resume.is_some() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "resume: sessions on NATS continue by themselves on another worker".into(),
            ));
        }
        Ok(())
    }
}

/// `GET /sessions/{id}/live.rrd`: the session's recording as its worker writes it, passed on
/// from the worker holding the session (workers serve it with `--bind`). After a failover the
/// new worker's recording continues in a new part: ask again.
async fn live_recording(
    State(door): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    door.record(&id).await?;
    let lease = door.broker.lease(&id).await.map_err(unavailable)?;
    let Some(lease) = lease else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no worker holds session {id} now (not started, between workers, or closed: a \
                 closed session's recording is among its files)"
            ),
        ));
    };
    let Some(base) = lease.http else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "worker {} serves no live recordings (start workers with --bind and \
                 --token-file)",
                lease.worker
            ),
        ));
    };
    pass_on(
        &format!("{base}/sessions/{id}/live.rrd"),
        &door.config.token,
    )
    .await
}

async fn live_recording_with_token(
    State(door): State<Shared>,
    Path((id, token)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    check_token(&token, &door.config.token)?;
    live_recording(State(door), Path(id)).await
}

/// A GET to a worker's `http://` URL with the bearer token; its answer (status, headers and a
/// body that streams as the worker sends it).
async fn pass_on(url: &str, token: &str) -> std::result::Result<Response, ApiError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!("the session's worker at {url}: {e}"),
        )
    };
    let uri: hyper::Uri = url.parse().map_err(|e| unreachable(&e))?;
    let (Some(host), Some("http")) = (uri.host(), uri.scheme_str()) else {
        return Err(unreachable(&"not an http:// URL"));
    };
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let req = hyper::Request::get(uri.path())
        .header(header::HOST, authority)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(axum::body::Body::empty())
        .map_err(|e| unreachable(&e))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let (parts, body) = res.into_parts();
    Ok(Response::from_parts(parts, axum::body::Body::new(body)))
}

/// One of the frame counts a lease carries.
type LeaseCount = fn(&super::Lease) -> u64;

/// `GET /metrics`: Prometheus text for the whole service as the broker knows it: sessions by
/// state, each live worker's sessions and room, each held session's frame counts (from its lease, renewed every
/// third of the lease time) and the frames waiting in the broker. Per-stage latencies are each
/// worker's own `/metrics` (`worker --bind`).
async fn metrics(State(door): State<Shared>) -> std::result::Result<String, ApiError> {
    use std::fmt::Write as _;
    let ids = sorted_keys(&door.broker.sessions, "sessions")
        .await
        .map_err(unavailable)?;
    let mut states = std::collections::BTreeMap::from([("open", 0), ("closing", 0), ("closed", 0)]);
    let mut held = Vec::new();
    for id in &ids {
        let Ok(Some((record, _))) = door.broker.record(id).await else {
            continue;
        };
        let state = match record.state {
            SessionState::Open => "open",
            SessionState::Closing => "closing",
            SessionState::Closed => "closed",
        };
        *states.entry(state).or_default() += 1;
        if record.state != SessionState::Closed {
            if let Ok(Some(lease)) = door.broker.lease(id).await {
                held.push((id, lease));
            }
        }
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# TYPE streamrecon_sessions gauge");
    for (state, n) in &states {
        let _ = writeln!(out, "streamrecon_sessions{{state=\"{state}\"}} {n}");
    }
    // Every live worker, idle ones too, as each announces itself.
    if let Ok(workers) = door.broker.worker_loads().await {
        let _ = writeln!(out, "# TYPE streamrecon_worker_sessions gauge");
        for (w, l) in &workers {
            let _ = writeln!(
                out,
                "streamrecon_worker_sessions{{worker=\"{w}\"}} {}",
                l.held
            );
        }
        let _ = writeln!(out, "# TYPE streamrecon_worker_max_sessions gauge");
        for (w, l) in &workers {
            let _ = writeln!(
                out,
                "streamrecon_worker_max_sessions{{worker=\"{w}\"}} {}",
                l.max
            );
        }
    }
    let counters: [(&str, LeaseCount); 3] = [
        ("frames_received", |l| l.frames_received),
        ("frames_dropped", |l| l.frames_dropped),
        ("frames_processed", |l| l.frames_processed),
    ];
    for (name, f) in counters {
        let _ = writeln!(out, "# TYPE streamrecon_{name}_total counter");
        for (id, l) in &held {
            let _ = writeln!(
                out,
                "streamrecon_{name}_total{{session=\"{id}\",worker=\"{}\"}} {}",
                l.worker,
                f(l)
            );
        }
    }
    let mut frames = door.broker.frames.clone();
    if let Ok(info) = frames.info().await {
        let _ = writeln!(out, "# TYPE streamrecon_broker_frames gauge");
        let _ = writeln!(out, "streamrecon_broker_frames {}", info.state.messages);
        let _ = writeln!(out, "# TYPE streamrecon_broker_frames_bytes gauge");
        let _ = writeln!(out, "streamrecon_broker_frames_bytes {}", info.state.bytes);
    }
    Ok(out)
}
