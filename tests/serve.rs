//! `streamrecon serve` end to end over HTTP: health without a token, everything else with it,
//! a session fed synthetic PNG frames, results, bad frames, closing and downloads, metrics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const TOKEN: &str = "test-token-0123456789";

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &std::path::Path, max_sessions: usize, extra: &[&std::ffi::OsStr]) -> Server {
    let tok = data.with_extension("token");
    std::fs::write(&tok, TOKEN).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["serve", "--bind", "127.0.0.1:0", "--max-sessions"])
        .arg(max_sessions.to_string())
        .arg("--token-file")
        .arg(&tok)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Server { child, port }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..text_end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = resp[text_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}

#[test]
fn a_session_streams_frames_to_results_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    assert!(Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["synth", "--frames", "12", "--size", "160x120", "--out"])
        .arg(&seq)
        .status()
        .unwrap()
        .success());
    let srv = start(&dir.path().join("data"), 1, &[]);
    let p = srv.port;
    assert_eq!(http(p, "GET", "/health", None, b"").0, 200);
    assert_eq!(http(p, "GET", "/sessions", None, b"").0, 401);
    assert_eq!(
        http(p, "GET", "/sessions", Some("wrong-token-0123456789"), b"").0,
        401
    );
    let (st, body) = http(p, "POST", "/sessions", Some(TOKEN), b"");
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["id"].as_str().unwrap().to_string();
    // A client following the results as server-sent events, from the start.
    let events = {
        let id = id.clone();
        std::thread::spawn(move || {
            let (st, body) = http(
                p,
                "GET",
                &format!("/sessions/{id}/events"),
                Some(TOKEN),
                b"",
            );
            assert_eq!(st, 200);
            String::from_utf8_lossy(&body)
                .matches("event: result")
                .count() as u64
        })
    };
    // One session at most: a second is refused.
    assert_eq!(http(p, "POST", "/sessions", Some(TOKEN), b"").0, 429);
    for i in 0..12 {
        let png = std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
        let (st, body) = http(
            p,
            "POST",
            &format!("/sessions/{id}/frames"),
            Some(TOKEN),
            &png,
        );
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    }
    let (st, body) = http(
        p,
        "POST",
        &format!("/sessions/{id}/frames"),
        Some(TOKEN),
        b"not an image",
    );
    assert_eq!(st, 400);
    assert!(String::from_utf8_lossy(&body).contains("PNG/JPEG"));
    assert_eq!(
        http(p, "POST", "/sessions/nope/frames", Some(TOKEN), b"x").0,
        404
    );
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200);
    let summary = json(&body)["summary"].clone();
    let processed = summary["frames_processed"].as_u64().unwrap();
    assert!(processed >= 1);
    // Every processed frame has a result (flowvo may hold frames until it initialises, so they
    // can arrive as late as the close).
    let (_, body) = http(
        p,
        "GET",
        &format!("/sessions/{id}/results?since=0"),
        Some(TOKEN),
        b"",
    );
    let results = json(&body).as_array().unwrap().clone();
    assert_eq!(results.len() as u64, processed);
    assert_eq!(
        events.join().unwrap(),
        processed,
        "the event stream carried every result, then ended"
    );
    assert!(results
        .iter()
        .all(|r| r["translation"].as_array().unwrap().len() == 3));
    let status = json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1);
    assert_eq!(status["running"], false);
    assert_eq!(
        status["frames_received"].as_u64().unwrap(),
        12,
        "every pushed frame is counted"
    );
    // Frames are dropped at the door (queue full) or inside the live pipeline; none is lost
    // uncounted.
    let dropped_at_door = status["frames_dropped"].as_u64().unwrap();
    let dropped_inside = summary["frames_dropped"].as_u64().unwrap();
    assert_eq!(processed + dropped_at_door + dropped_inside, 12);
    let (st, traj) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/trajectory.txt"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 200);
    assert!(
        String::from_utf8_lossy(&traj)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count()
            >= 1
    );
    assert_eq!(
        http(
            p,
            "GET",
            &format!("/sessions/{id}/files/..%2Ftoken"),
            Some(TOKEN),
            b""
        )
        .0,
        404
    );
    assert_eq!(
        http(
            p,
            "POST",
            &format!("/sessions/{id}/frames"),
            Some(TOKEN),
            b"x"
        )
        .0,
        409
    );
    let (_, metrics) = http(p, "GET", "/metrics", Some(TOKEN), b"");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(&format!(
            "streamrecon_frames_received_total{{session=\"{id}\"}} 12"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "streamrecon_result_latency_ms_count{{session=\"{id}\"}} {processed}"
        )),
        "{metrics}"
    );
    let (st, page) = http(p, "GET", "/", Some(TOKEN), b"");
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&page).contains("getUserMedia"));
}

#[test]
fn sessions_choose_their_engine_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geometry-tiny");
    let (w, c) = (
        fixture.join("model.safetensors"),
        fixture.join("config.json"),
    );
    let srv = start(
        &dir.path().join("data"),
        2,
        &[
            "--weights".as_ref(),
            w.as_os_str(),
            "--model-config".as_ref(),
            c.as_os_str(),
        ],
    );
    let p = srv.port;
    for bad in [
        r#"{"geometry": "nope"}"#,
        r#"{"memory_update": "sometimes"}"#,
        r#"{"colour": 1}"#,
        r#"{"intrinsics": [0, 1, 2, 3]}"#,
        "{",
    ] {
        let (st, body) = post_json(p, "/sessions", bad);
        assert!(
            (400..500).contains(&st),
            "{bad}: {st} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let (st, body) = post_json(
        p,
        "/sessions",
        r#"{"geometry": "vggt", "total_budget": 300, "memory_update": "adaptive", "intrinsics": [150, 150, 80, 60], "stabilize": true}"#,
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["id"].as_str().unwrap().to_string();
    let mut png = Vec::new();
    for i in 0..5u32 {
        let img = image::RgbImage::from_fn(160, 120, |x, y| {
            image::Rgb([
                ((x * 3 + i * 7) % 256) as u8,
                ((y * 5 + x) % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        png.clear();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(
            http(
                p,
                "POST",
                &format!("/sessions/{id}/frames"),
                Some(TOKEN),
                &png
            )
            .0,
            200
        );
    }
    assert_eq!(
        http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"").0,
        200
    );
    let (st, run) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/run.json"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 200);
    let run = json(&run);
    assert!(
        run["model_memory"]["per_frame"]
            .as_array()
            .is_some_and(|f| !f.is_empty()),
        "{run}"
    );
    assert!(run["stabilization"].is_object());
    let (_, intr) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/intrinsics.json"),
        Some(TOKEN),
        b"",
    );
    assert!(
        String::from_utf8_lossy(&intr).contains("150"),
        "{}",
        String::from_utf8_lossy(&intr)
    );
}

fn post_json(port: u16, path: &str, body: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, resp[end + 4..].to_vec())
}

#[test]
fn a_stalled_client_does_not_stall_another_session() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("data"), 2, &[]);
    let p = srv.port;
    let a = json(&http(p, "POST", "/sessions", Some(TOKEN), b"").1)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = json(&http(p, "POST", "/sessions", Some(TOKEN), b"").1)["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Client A announces a large frame and stops sending half way.
    let mut stalled = TcpStream::connect(("127.0.0.1", p)).unwrap();
    write!(
        stalled,
        "POST /sessions/{a}/frames HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000000\r\n\r\n"
    )
    .unwrap();
    stalled.write_all(&[0u8; 1000]).unwrap();
    // Client B goes on, frame after frame (were it held up, these requests would not complete).
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            http(
                p,
                "POST",
                &format!("/sessions/{b}/frames"),
                Some(TOKEN),
                &png
            )
            .0,
            200
        );
    }
    let status = json(&http(p, "GET", &format!("/sessions/{b}"), Some(TOKEN), b"").1);
    assert_eq!(status["frames_received"], 5);
    drop(stalled);
}
