//! rerun's web viewer, served by the binary from the files the pinned rerun release bundles
//! (`/viewer/`, no token: they hold no data), and each session's recording as it is written
//! (`/sessions/{id}/live.rrd`): the viewer opens that URL and shows the session live, since it
//! decodes a recording as its bytes arrive. [`view`] serves one recording file the same way
//! (`streamrecon view`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use tokio::io::AsyncReadExt;

use super::{check_token, ApiError, Shared};
use streamrecon_core::error::{Error, Result};

/// How often a live recording's end is checked for new bytes.
const POLL: Duration = Duration::from_millis(200);
/// How long a new session's recording may take to appear.
const APPEAR_WITHIN: Duration = Duration::from_secs(10);
const CHUNK: usize = 256 << 10;

pub(super) async fn to_folder() -> Redirect {
    // The viewer's page loads its script and wasm by relative paths.
    Redirect::permanent("/viewer/")
}

pub(super) async fn index() -> Response {
    asset("")
}

pub(super) async fn file(Path(name): Path<String>) -> Response {
    asset(&name)
}

fn asset(name: &str) -> Response {
    match streamrecon_viewer::web_viewer_file(name) {
        Some((content_type, bytes)) => (
            [(header::CONTENT_TYPE, content_type)],
            Bytes::from_static(bytes),
        )
            .into_response(),
        None if streamrecon_viewer::web_viewer_file("").is_none() => ApiError(
            StatusCode::NOT_FOUND,
            "this build has no web viewer (it was built without rerun)".into(),
        )
        .into_response(),
        None => ApiError(StatusCode::NOT_FOUND, format!("no viewer file {name}")).into_response(),
    }
}

pub(super) async fn live_recording_with_token(
    State(state): State<Shared>,
    Path((id, token)): Path<(String, String)>,
) -> std::result::Result<Response, ApiError> {
    check_token(&token, &state.config.token)?;
    live_recording(State(state), Path(id)).await
}

/// The session's .rrd from its start, then its new bytes as they are written, until the session
/// has ended and everything is sent.
pub(super) async fn live_recording(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> std::result::Result<Response, ApiError> {
    let s = state.session(&id)?;
    let path = match &s.recording {
        Some(p) => p.clone(),
        None if s.running() => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("session {id} writes no recording (it was made with \"record\": false)"),
            ))
        }
        // A session an earlier server ran: its recording as it was left.
        None => state.config.data_dir.join(&s.id).join("recording.rrd"),
    };
    let waited = std::time::Instant::now();
    let file = loop {
        // Only a regular file the run wrote: a link put in the folder is not followed.
        let regular = tokio::fs::symlink_metadata(&path)
            .await
            .is_ok_and(|m| m.file_type().is_file());
        if regular {
            if let Ok(f) = tokio::fs::File::open(&path).await {
                break f;
            }
        }
        if s.finished() || waited.elapsed() > APPEAR_WITHIN {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("session {id} has no recording yet"),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let body = Body::from_stream(follow(file, move || s.finished()));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// The file's bytes as they come: at its end, waits for more until `finished` says the writer
/// is done, and ends once a read after that finds nothing new.
fn follow(
    file: tokio::fs::File,
    finished: impl Fn() -> bool + Send + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(Some((file, finished)), |state| async move {
        let (mut file, finished) = state?;
        loop {
            let ended = finished();
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) if ended => return None,
                Ok(0) => tokio::time::sleep(POLL).await,
                Ok(n) => {
                    buf.truncate(n);
                    return Some((Ok(Bytes::from(buf)), Some((file, finished))));
                }
                Err(e) => return Some((Err(e), None)),
            }
        }
    })
}

/// Serves one recording in rerun's web viewer until `shutdown` resolves: `/` opens the viewer on
/// it, `/recording.rrd` is the file as it is when asked for. No token: bind it to loopback (the
/// default) unless the recording may be seen by anyone who can reach the address.
///
/// # Errors
/// The recording is not a readable file, the build has no web viewer, or the address cannot be
/// bound.
pub fn view(
    recording: &std::path::Path,
    bind: SocketAddr,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let meta = std::fs::metadata(recording).map_err(|e| Error::io(recording, e))?;
    if !meta.is_file() {
        return Err(Error::format(recording, "not a recording file"));
    }
    if streamrecon_viewer::web_viewer_file("").is_none() {
        return Err(Error::Invalid(
            "this build has no web viewer (it was built without rerun)".into(),
        ));
    }
    let path = Arc::new(recording.to_path_buf());
    let rrd = get(move || {
        let path = path.clone();
        async move {
            match tokio::fs::File::open(path.as_path()).await {
                Ok(f) => (
                    [(header::CONTENT_TYPE, "application/octet-stream")],
                    Body::from_stream(follow(f, || true)),
                )
                    .into_response(),
                Err(e) => ApiError(StatusCode::NOT_FOUND, format!("{}: {e}", path.display()))
                    .into_response(),
            }
        }
    });
    let app = Router::new()
        .route("/", get(open_viewer))
        .route("/recording.rrd", rrd)
        .route("/viewer", get(to_folder))
        .route("/viewer/", get(index))
        .route("/viewer/{file}", get(file));
    super::runtime("view", 1)?.block_on(super::listen(bind, app, on_bound, shutdown))
}

/// `/`: the viewer opened on `/recording.rrd` of the address the browser used.
async fn open_viewer(headers: HeaderMap) -> Redirect {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let rrd = format!("http://{host}/recording.rrd");
    let encoded = percent_encoding::utf8_percent_encode(&rrd, percent_encoding::NON_ALPHANUMERIC);
    Redirect::temporary(&format!("/viewer/?url={encoded}"))
}
