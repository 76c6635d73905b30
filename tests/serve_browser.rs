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
use serve_common::{http, json, post_json, push, start, synth, wait_processed, TOKEN};

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

/// Whether Chromium and ChromeDriver are here; without them a test passes after saying so,
/// unless `STREAMRECON_REQUIRE_BROWSER` is set.
fn have_browser() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    assert!(
        std::env::var_os("STREAMRECON_REQUIRE_BROWSER").is_none(),
        "STREAMRECON_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing"
    );
    eprintln!("skipped: no {CHROMIUM} / {CHROMEDRIVER} (apt install chromium chromium-driver)");
    false
}

/// ChromeDriver on a free port and one headless Chromium session with `args` besides the
/// common ones; returns the driver (stopped when dropped) and the WebDriver session id.
fn browser(profile: &Path, args: &[String]) -> (Driver, String) {
    let port = free_port();
    let driver = Driver {
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
    let mut all: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .map(String::from)
    .to_vec();
    all.push(format!("--user-data-dir={}", profile.display()));
    all.extend_from_slice(args);
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": CHROMIUM, "args": all }
    }}});
    let session = wd(driver.port, "POST", "/session", &caps);
    let sid = session["sessionId"].as_str().unwrap().to_string();
    (driver, sid)
}

/// A PNG screenshot of the window, also written to `CARGO_TARGET_TMPDIR/<name>.png`.
fn screenshot(port: u16, sid: &str, name: &str) -> image::RgbImage {
    let shot = wd(
        port,
        "GET",
        &format!("/session/{sid}/screenshot"),
        &json!({}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
    std::fs::write(&out, &png).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    eprintln!(
        "screenshot {}x{} at {}",
        img.width(),
        img.height(),
        out.display()
    );
    img
}

#[test]
fn the_web_page_starts_a_webcam_session_in_headless_chromium() {
    if !have_browser() {
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
    let (mut driver, sid) = browser(
        &dir.path().join("profile"),
        &[
            "--disable-gpu".into(),
            "--window-size=1000,900".into(),
            "--use-fake-device-for-media-stream".into(),
            "--use-fake-ui-for-media-stream".into(),
            format!("--use-file-for-fake-video-capture={}", y4m.display()),
        ],
    );
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
    let img = screenshot(p, &sid, "serve_page");
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

/// Share of the pixels in a rectangle that are strongly coloured (channel spread over 80): the
/// viewer's 3D background, grid and panels are greys and pale blues; the map's points, the
/// trajectory and the camera are not.
fn coloured_share(img: &image::RgbImage, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> f64 {
    let mut n = 0usize;
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            let [r, g, b] = img.get_pixel(x, y).0;
            if r.max(g).max(b) - r.min(g).min(b) > 80 {
                n += 1;
            }
        }
    }
    n as f64 / f64::from((x1 - x0) * (y1 - y0))
}

/// Screenshots until the 3D view holds a drawn map (or the time is up); returns the last.
fn wait_for_map(port: u16, sid: &str, name: &str, secs: u64) -> (image::RgbImage, f64) {
    // The 3D view's inside at 1280×800 with the recording's layout (a reconstruction tab whose
    // 3D view takes the left three quarters, between the side panels).
    const VIEW_3D: (u32, u32, u32, u32) = (230, 100, 760, 470);
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(5));
        let img = screenshot(port, sid, name);
        let share = coloured_share(&img, VIEW_3D);
        if share > 0.003 || t0.elapsed() > Duration::from_secs(secs) {
            return (img, share);
        }
    }
}

/// rerun's web viewer, served by the binary from the rerun release's files, follows a live
/// session's recording (`/sessions/{id}/token/{token}/live.rrd`), then shows the whole recording
/// after the session has closed; both screenshots are kept and their 3D view must not be empty.
#[test]
fn the_rerun_web_viewer_shows_a_live_session_and_its_recording() {
    if !have_browser() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    synth(
        &seq,
        &[
            "--trajectory",
            "handheld",
            "--frames",
            "60",
            "--size",
            "320x240",
        ],
    );
    let srv = start(&dir.path().join("data"), 1, &[]);
    let p = srv.port;
    let (st, body) = post_json(p, "/sessions", r#"{"lossless": true}"#);
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["id"].as_str().unwrap().to_string();
    assert_eq!(json(&body)["id"], "s0001");
    let frame = |i: usize| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
    for i in 0..40 {
        assert_eq!(push(p, &id, &frame(i), i as f64 / 10.0).0, 200);
    }
    wait_processed(p, &id, 10, 120);
    // The recording's URL needs the token like the rest of the API.
    let live = format!("/sessions/{id}/token/{TOKEN}/live.rrd");
    assert_eq!(
        http(
            p,
            "GET",
            &format!("/sessions/{id}/token/wrong/live.rrd"),
            None,
            b""
        )
        .0,
        401
    );
    assert_eq!(
        http(p, "GET", &format!("/sessions/{id}/live.rrd"), None, b"").0,
        401
    );
    let (st, page) = http(p, "GET", "/viewer/", None, b"");
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&page).contains("re_viewer.js"));
    let (driver, sid) = browser(
        &dir.path().join("profile"),
        &[
            "--enable-unsafe-swiftshader".into(),
            "--use-angle=swiftshader".into(),
            "--window-size=1280,800".into(),
        ],
    );
    let rrd_url = format!("http://127.0.0.1:{p}{live}");
    let viewer = format!(
        "http://127.0.0.1:{p}/viewer/?renderer=webgl&url={}",
        percent_encoding::utf8_percent_encode(&rrd_url, percent_encoding::NON_ALPHANUMERIC)
    );
    wd(
        driver.port,
        "POST",
        &format!("/session/{sid}/url"),
        &json!({ "url": viewer }),
    );
    let (_, share) = wait_for_map(driver.port, &sid, "rerun_web_viewer_live", 150);
    eprintln!(
        "live session: {:.2} % of the 3D view coloured",
        share * 100.0
    );
    assert!(
        share > 0.003,
        "the 3D view of the live session stayed empty"
    );
    // The rest of the frames, then close: the recording is complete and the stream ends.
    for i in 40..60 {
        assert_eq!(push(p, &id, &frame(i), i as f64 / 10.0).0, 200);
    }
    assert_eq!(
        http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"").0,
        200
    );
    let (st, whole) = http(
        p,
        "GET",
        &format!("/sessions/{id}/live.rrd"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 200);
    let written = std::fs::read(dir.path().join("data").join(&id).join("recording.rrd")).unwrap();
    assert_eq!(whole.len(), written.len(), "the stream ends with the file");
    wd(
        driver.port,
        "POST",
        &format!("/session/{sid}/url"),
        &json!({ "url": viewer }),
    );
    let (_, share) = wait_for_map(driver.port, &sid, "rerun_web_viewer_recording", 150);
    eprintln!(
        "closed session's recording: {:.2} % of the 3D view coloured",
        share * 100.0
    );
    assert!(share > 0.003, "the 3D view of the recording stayed empty");
    // The viewer plays an opened recording, redrawing every frame: the time between animation
    // frames is its frame time (printed, not asserted: this is the software rasteriser).
    wd(
        driver.port,
        "POST",
        &format!("/session/{sid}/timeouts"),
        &json!({"script": 60_000}),
    );
    let frames = wd(
        driver.port,
        "POST",
        &format!("/session/{sid}/execute/async"),
        &json!({"args": [], "script": "const done = arguments[arguments.length - 1]; \
            const t = []; const t0 = performance.now(); \
            function f(now) { t.push(now); if (now - t0 < 4000) requestAnimationFrame(f); else { \
              const d = t.slice(1).map((v, i) => v - t[i]).sort((a, b) => a - b); \
              done({frames: d.length, median_ms: d[d.length >> 1]}); } } \
            requestAnimationFrame(f);"}),
    );
    eprintln!("viewer frame time with the recording playing: {frames}");
    wd(
        driver.port,
        "DELETE",
        &format!("/session/{sid}"),
        &json!({}),
    );
}
