//! A `streamrecon serve` child process and a minimal HTTP/1.1 client, shared by the service's
//! tests and its load benchmark.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

pub const TOKEN: &str = "test-token-0123456789";

pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(data: &std::path::Path, max_sessions: usize, extra: &[&std::ffi::OsStr]) -> Server {
    let tok = data.with_extension("token");
    std::fs::write(&tok, TOKEN).unwrap();
    // STREAMRECON_BIN: another build of the server, for a bench to compare with this one.
    let bin = std::env::var_os("STREAMRECON_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_streamrecon").into());
    let mut child = Command::new(bin)
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
    let line = first_line(&mut child);
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Server { child, port }
}

/// The first line a child prints (what it says once it is ready).
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// One HTTP/1.1 request; returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_with(port, method, path, &headers, body)
}

/// One HTTP/1.1 request with extra headers; returns (status, body).
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let extra = headers.iter().fold(String::new(), |mut acc, (k, v)| {
        let _ = write!(acc, "{k}: {v}\r\n");
        acc
    });
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
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

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
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

pub fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}

pub fn post_json(port: u16, path: &str, body: &str) -> (u16, Vec<u8>) {
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

/// Starts a session; returns its id.
pub fn create(port: u16, body: &str) -> String {
    let (st, b) = post_json(port, "/sessions", body);
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&b));
    json(&b)["id"].as_str().unwrap().to_string()
}

/// Pushes one encoded frame with a timestamp; returns the status and body.
pub fn push(port: u16, id: &str, frame: &[u8], timestamp: f64) -> (u16, Vec<u8>) {
    let auth = format!("Bearer {TOKEN}");
    let ts = format!("{timestamp}");
    http_with(
        port,
        "POST",
        &format!("/sessions/{id}/frames"),
        &[("Authorization", &auth), ("x-timestamp", &ts)],
        frame,
    )
}

/// A session's status.
pub fn status(port: u16, id: &str) -> serde_json::Value {
    json(&http(port, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1)
}

/// Waits until a session has processed `n` frames (panics after `secs`).
pub fn wait_processed(port: u16, id: &str, n: u64, secs: u64) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        let s = status(port, id);
        if s["frames_processed"].as_u64().unwrap_or(0) >= n {
            return s;
        }
        assert!(
            t0.elapsed().as_secs() < secs,
            "session {id} processed fewer than {n} frames in {secs} s: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// PNG bytes of an image.
pub fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Writes a synthetic native sequence with the CLI.
pub fn synth(out: &std::path::Path, args: &[&str]) {
    assert!(Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .arg("synth")
        .args(args)
        .arg("--out")
        .arg(out)
        .status()
        .unwrap()
        .success());
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nats-server -js` on a free loopback port; `None` when it is not installed (the test
/// command installs it and sets STREAMRECON_REQUIRE_NATS, so CI never skips).
pub fn nats_server(store: &std::path::Path) -> Option<(Proc, String)> {
    let (server, port) = nats_server_with(store, &["--auth", NATS_TOKEN])?;
    Some((server, format!("nats://127.0.0.1:{port}")))
}

/// `nats-server -js` on a free loopback port with `args` (a configuration file, …), its store
/// in `store`; returns it and its port once it listens, or `None` where nats-server is missing
/// (and not required).
pub fn nats_server_with(store: &std::path::Path, args: &[&str]) -> Option<(Proc, u16)> {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("STREAMRECON_REQUIRE_NATS").is_none(),
            "nats-server is not installed (scripts/setup-system installs it)"
        );
        eprintln!("skipped: nats-server is not installed");
        return None;
    }
    let mut child = Command::new("nats-server")
        .args(args)
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("nats-server exited").unwrap();
        if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
            break addr.trim().rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    // Its log must keep draining.
    std::thread::spawn(move || lines.for_each(drop));
    Some((Proc(child), port))
}

/// The token [`nats_server`] requires.
pub const NATS_TOKEN: &str = "nats-test-token-0123";

/// A file holding [`NATS_TOKEN`], beside `dir`, for `--nats-token-file`.
pub fn nats_token_file(dir: &std::path::Path) -> std::path::PathBuf {
    let f = dir.with_extension("nats-token");
    std::fs::write(&f, NATS_TOKEN).unwrap();
    f
}

/// A front door (`serve --nats url`, with [`NATS_TOKEN`]) with its data in `dir`, and `extra`
/// arguments.
pub fn nats_door(dir: &std::path::Path, url: &str, extra: &[&std::ffi::OsStr]) -> Server {
    let token = nats_token_file(dir);
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--nats".as_ref(),
        url.as_ref(),
        "--nats-token-file".as_ref(),
        token.as_os_str(),
    ];
    args.extend_from_slice(extra);
    start(dir, 1, &args)
}

/// `streamrecon worker` on `url` (with [`NATS_TOKEN`]), its snapshots every `snapshot_every`
/// frames; returns once it has started.
pub fn nats_worker(
    url: &str,
    data: &std::path::Path,
    name: &str,
    max_sessions: usize,
    lease_ttl_s: f64,
    snapshot_every: u64,
) -> Proc {
    let args = [
        "--max-sessions".to_string(),
        max_sessions.to_string(),
        "--snapshot-every".into(),
        snapshot_every.to_string(),
        "--lease-ttl".into(),
        lease_ttl_s.to_string(),
        "--nats-token-file".into(),
        nats_token_file(data).display().to_string(),
    ];
    nats_worker_with(url, data, name, &args).0
}

/// `streamrecon worker` on `url` with `extra` arguments (how to log in among them); returns
/// once it has started, with its first line.
pub fn nats_worker_with(
    url: &str,
    data: &std::path::Path,
    name: &str,
    extra: &[String],
) -> (Proc, String) {
    let bin = std::env::var_os("STREAMRECON_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_streamrecon").into());
    let mut child = Command::new(bin)
        .args(["worker", "--nats", url, "--name", name])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = first_line(&mut child);
    assert!(line.starts_with("worker"), "{line:?}");
    (Proc(child), line)
}

/// A test pattern frame, different for each `i`.
pub fn frame_image(w: u32, h: u32, i: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 3 + i * 5) % 256) as u8,
            ((y * 7 + x) % 256) as u8,
            (((x / 4) ^ (y / 4)) * 9 % 256) as u8,
        ])
    })
}

/// A lossless session over `/sessions/{id}/stream` on the server at `p`: the token is needed,
/// PNG and raw frames in, bad messages (no header, not an image, a cut-short PNG) answered on
/// the stream, a result for every frame in order (pending ones first where flowvo holds
/// frames), the socket closed after the last result once the session is closed over HTTP.
pub fn websocket_round_trip(p: u16) {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let id = create(p, r#"{"lossless": true, "result_points": 10}"#);
    let mut req = format!("ws://127.0.0.1:{p}/sessions/{id}/stream")
        .into_client_request()
        .unwrap();
    // Without the token the upgrade is refused.
    assert!(tungstenite::connect(req.clone()).is_err());
    req.headers_mut()
        .insert("Authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    let message = |t: f64, w: u32, h: u32, payload: &[u8]| {
        let mut m = t.to_le_bytes().to_vec();
        m.extend_from_slice(&w.to_le_bytes());
        m.extend_from_slice(&h.to_le_bytes());
        m.extend_from_slice(payload);
        Message::Binary(m.into())
    };
    let frames = 12u32;
    for i in 0..frames {
        let img = frame_image(96, 64, i);
        // Even frames as PNG, odd ones as raw RGB.
        let m = if i % 2 == 0 {
            message(f64::from(i) / 10.0, 0, 0, &png(&img))
        } else {
            message(f64::from(i) / 10.0, 96, 64, img.as_raw())
        };
        ws.send(m).unwrap();
    }
    // Bad messages are answered on the stream, which goes on.
    ws.send(Message::Binary(vec![1, 2, 3].into())).unwrap();
    ws.send(message(f64::NAN, 0, 0, b"not an image")).unwrap();
    // A PNG cut short: only decoding finds it out (a NATS front door publishes it, its worker
    // says so on the stream).
    let cut = png(&frame_image(96, 64, 99));
    ws.send(message(f64::NAN, 0, 0, &cut[..cut.len() / 2]))
        .unwrap();
    let mut errors = Vec::new();
    let mut indices = Vec::new();
    let mut held = Vec::new();
    // A result with a pose goes to `indices`, a pending one (a frame flowvo holds until its
    // map starts) to `held`.
    let mut take = |v: &serde_json::Value| {
        if let Some(i) = v["index"].as_u64() {
            if v["pending"] == true {
                held.push(i);
            } else {
                indices.push(i);
            }
        }
    };
    while errors.len() < 3 {
        if let Message::Text(t) = ws.read().unwrap() {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if let Some(e) = v["error"].as_str() {
                errors.push(e.to_string());
            } else {
                take(&v);
            }
        }
    }
    assert!(errors[0].contains("16-byte header"), "{errors:?}");
    assert!(errors[1].contains("PNG or JPEG"), "{errors:?}");
    assert!(errors[2].contains("96x64 does not decode"), "{errors:?}");
    // Closing the session over HTTP ends the stream after the last result.
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200);
    let processed = json(&body)["summary"]["frames_processed"].as_u64().unwrap();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => take(&serde_json::from_str(&t).unwrap()),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert_eq!(
        processed,
        u64::from(frames),
        "lossless: every frame processed"
    );
    assert_eq!(indices, (0..u64::from(frames)).collect::<Vec<_>>());
    // The held frames were told of first, in order, and each got its pose after.
    assert!(!held.is_empty());
    assert_eq!(held, (0..held.len() as u64).collect::<Vec<_>>());
}
