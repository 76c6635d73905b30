//! `GET /sessions/{id}/stream`: one WebSocket for a live client. The client sends frames as
//! binary messages, the server sends each result as a text message (JSON, as in
//! `/results`) as soon as it exists, and errors as `{"error": …}` text messages (the stream
//! goes on). A binary message is a 16-byte header — timestamp in seconds (f64, little-endian;
//! NaN = none), width and height (u32 each, little-endian) — then either a PNG/JPEG image
//! (width = height = 0) or `width × height × 3` bytes of RGB.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::json;

use super::{ingest, lock, wait_for_result, ApiError, Session, Shared, MAX_FRAME_BYTES};

/// Bytes before the frame in a binary message.
pub(crate) const HEADER: usize = 16;

pub(super) async fn upgrade(
    State(state): State<Shared>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> std::result::Result<Response, ApiError> {
    let s = state.session(&id)?;
    Ok(ws
        .max_message_size(MAX_FRAME_BYTES + HEADER)
        .on_upgrade(move |socket| follow(s, socket)))
}

/// A frame message: timestamp, raw size (if raw RGB) and the frame's bytes.
pub(crate) type FrameMessage = (Option<f64>, Option<(u32, u32)>, Bytes);

/// Splits a binary message into its parts.
pub(crate) fn parse(mut b: Bytes) -> Result<FrameMessage, String> {
    if b.len() < HEADER {
        return Err(format!(
            "a frame message starts with a {HEADER}-byte header; got {} bytes",
            b.len()
        ));
    }
    let head = b.split_to(HEADER);
    let le4 = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&head[..8]);
    let t = f64::from_le_bytes(t);
    let timestamp = if t.is_nan() {
        None
    } else if t.is_finite() {
        Some(t)
    } else {
        return Err("the timestamp must be finite seconds (or NaN for none)".into());
    };
    let (w, h) = (le4(8), le4(12));
    let raw = (w != 0 || h != 0).then_some((w, h));
    Ok((timestamp, raw, b))
}

async fn follow(s: Arc<Session>, mut socket: WebSocket) {
    // Results made from now on, in the order they are made.
    let mut newest = s.newest.subscribe();
    newest.borrow_and_update();
    let mut next = lock(&s.results).back().map_or(0, |r| r.seq + 1);
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                None | Some(Err(_) | Ok(Message::Close(_))) => break,
                Some(Ok(Message::Binary(b))) => {
                    let outcome = match parse(b) {
                        Ok((timestamp, raw, frame)) => ingest(&s, frame, raw, timestamp)
                            .await
                            .map_err(|e| e.1),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = outcome {
                        let text = json!({ "error": e }).to_string();
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(_)) => {}
            },
            () = wait_for_result(&mut newest) => {
                newest.borrow_and_update();
                let (new, open) = {
                    let ring = lock(&s.results);
                    let new: Vec<String> = ring
                        .iter()
                        .filter(|r| r.seq >= next)
                        .filter_map(|r| serde_json::to_string(r).ok())
                        .collect();
                    if let Some(last) = ring.back() {
                        next = next.max(last.seq + 1);
                    }
                    (new, lock(&s.summary).is_none())
                };
                for text in new {
                    // A client that stops reading stalls only this connection.
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                if !open {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            }
        }
    }
}
