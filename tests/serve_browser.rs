//! The service's web page in headless Chromium (Debian's `chromium` + `chromedriver`, driven
//! over WebDriver): a fake camera playing a synthetic sequence starts a session from the page,
//! frames reach the server, the page shows progress, and a screenshot is kept.
//!
//! Without a browser on the machine the test says so and passes, unless
//! `STREAMRECON_REQUIRE_BROWSER` is set (as `scripts/test` does after installing it).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

mod serve_common;
use serve_common::{http, json, start, synth, TOKEN};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One WebDriver command; returns its `value`. (ChromeDriver announces `Connection: close` but
/// keeps the socket open, so the body is read by its length.)
fn wd(port: u16, method: &str, path: &str, body: &Value) -> Value {
    use std::io::{BufRead, BufReader, Read, Write};
    let body = serde_json::to_vec(body).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_mins(2))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
    let mut resp = vec![0u8; len];
    r.read_exact(&mut resp).unwrap();
    let v = json(&resp);
    assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
    v["value"].clone()
}

fn element(port: u16, sid: &str, css: &str) -> String {
    let v = wd(
        port,
        "POST",
        &format!("/session/{sid}/element"),
        &json!({"using": "css selector", "value": css}),
    );
    v["element-6066-11e4-a52e-4f735466cecf"]
        .as_str()
        .unwrap_or_else(|| panic!("no element {css}: {v}"))
        .to_string()
}

fn script(port: u16, sid: &str, js: &str) -> Value {
    wd(
        port,
        "POST",
        &format!("/session/{sid}/execute/sync"),
        &json!({"script": js, "args": []}),
    )
}

#[test]
fn the_web_page_starts_a_webcam_session_in_headless_chromium() {
    if !(Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()) {
        assert!(
            std::env::var_os("STREAMRECON_REQUIRE_BROWSER").is_none(),
            "STREAMRECON_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing"
        );
        eprintln!("skipped: no {CHROMIUM} / {CHROMEDRIVER} (apt install chromium chromium-driver)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The fake camera plays a synthetic handheld sequence (looped) as Y4M.
    let seq = dir.path().join("seq");
    synth(
        &seq,
        &[
            "--trajectory",
            "handheld",
            "--frames",
            "40",
            "--size",
            "320x240",
        ],
    );
    let y4m = dir.path().join("camera.y4m");
    assert!(Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-framerate", "10", "-i"])
        .arg(seq.join("rgb/%06d.png"))
        .args(["-pix_fmt", "yuv420p"])
        .arg(&y4m)
        .status()
        .unwrap()
        .success());
    let srv = start(&dir.path().join("data"), 2, &[]);
    let port = free_port();
    let mut driver = Driver {
        child: Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        port,
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = dir.path().join("profile");
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1000,900",
                format!("--user-data-dir={}", profile.display()),
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                format!("--use-file-for-fake-video-capture={}", y4m.display()),
            ]
        }
    }}});
    let session = wd(driver.port, "POST", "/session", &caps);
    let sid = session["sessionId"].as_str().unwrap().to_string();
    let p = driver.port;
    wd(
        p,
        "POST",
        &format!("/session/{sid}/url"),
        &json!({"url": format!("http://127.0.0.1:{}/#token={TOKEN}", srv.port)}),
    );
    let start_button = element(p, &sid, "#start");
    wd(
        p,
        "POST",
        &format!("/session/{sid}/element/{start_button}/click"),
        &json!({}),
    );
    // Frames go up at 5 per second; wait for the page to report processed frames.
    let t0 = Instant::now();
    let mut processed = 0;
    while processed < 8 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the page shows {} after 90 s",
            script(
                p,
                &sid,
                "return document.getElementById('progress').textContent"
            )
        );
        std::thread::sleep(Duration::from_millis(300));
        processed = script(
            p,
            &sid,
            "return Number(document.getElementById('progress').dataset.processed)",
        )
        .as_u64()
        .unwrap_or(0);
    }
    let progress = script(
        p,
        &sid,
        "return document.getElementById('progress').textContent",
    );
    eprintln!("page: {progress}");
    // The sessions table lists the webcam session.
    std::thread::sleep(Duration::from_millis(1200));
    let table = script(
        p,
        &sid,
        "return document.getElementById('rows').textContent",
    );
    assert!(table.as_str().unwrap_or("").contains("s0001"), "{table}");
    let shot = wd(p, "GET", &format!("/session/{sid}/screenshot"), &json!({}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve_page.png");
    std::fs::write(&out, &png).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    eprintln!(
        "screenshot {}x{} at {}",
        img.width(),
        img.height(),
        out.display()
    );
    assert!(img.width() >= 800 && img.height() >= 600);
    // The server saw the same session: frames in, results out.
    let (_, body) = http(srv.port, "GET", "/sessions/s0001", Some(TOKEN), b"");
    let s = json(&body);
    assert!(s["frames_received"].as_u64().unwrap() >= 8, "{s}");
    assert!(s["frames_processed"].as_u64().unwrap() >= 8, "{s}");
    let stop_button = element(p, &sid, "#stop");
    wd(
        p,
        "POST",
        &format!("/session/{sid}/element/{stop_button}/click"),
        &json!({}),
    );
    let t0 = Instant::now();
    loop {
        let (_, body) = http(srv.port, "GET", "/sessions/s0001", Some(TOKEN), b"");
        if json(&body)["running"] == false {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "stop did not close the session"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wd(p, "DELETE", &format!("/session/{sid}"), &json!({}));
    driver.port = 0;
}
