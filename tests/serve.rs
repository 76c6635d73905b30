//! `streamrecon serve` end to end over HTTP: health without a token, everything else with it,
//! a session fed synthetic PNG frames, results, bad frames, closing and downloads, metrics.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use streamrecon::datasets::formats::tum;

mod common;
mod serve_common;
use serve_common::{
    create, frame_image, http, http_with, json, png, post_json, push, start, status, synth,
    wait_processed, TOKEN,
};

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
    assert!(String::from_utf8_lossy(&body).contains("PNG or JPEG"));
    assert_eq!(
        http(p, "POST", "/sessions/nope/frames", Some(TOKEN), b"x").0,
        404
    );
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200);
    let summary = json(&body)["summary"].clone();
    let processed = summary["frames_processed"].as_u64().unwrap();
    assert!(processed >= 1);
    // Every processed frame has a result with its pose. flowvo holds its first frames until its
    // map starts: each of those gets a pending result (no pose) at once, and its pose later.
    let (_, body) = http(
        p,
        "GET",
        &format!("/sessions/{id}/results?since=0"),
        Some(TOKEN),
        b"",
    );
    let all = json(&body).as_array().unwrap().clone();
    let (pending, results): (Vec<_>, Vec<_>) =
        all.iter().cloned().partition(|r| r["pending"] == true);
    assert_eq!(results.len() as u64, processed);
    assert!(!pending.is_empty(), "flowvo held frames before its map");
    for h in &pending {
        assert!(h.get("translation").is_none(), "{h}");
        let later = results.iter().find(|r| r["index"] == h["index"]);
        let later = later.unwrap_or_else(|| panic!("no pose for held frame {h}"));
        assert!(
            later["seq"].as_u64() > h["seq"].as_u64(),
            "{h} then {later}"
        );
        assert!(later["latency_ms"].as_f64() >= h["latency_ms"].as_f64());
    }
    // Results are numbered in the order they were made.
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // Polling by number misses no pose: a held frame's comes after later frames' results.
    let after = seqs[pending.len() - 1];
    let (_, body) = http(
        p,
        "GET",
        &format!("/sessions/{id}/results?after_seq={after}"),
        Some(TOKEN),
        b"",
    );
    let tail = json(&body).as_array().unwrap().clone();
    assert_eq!(
        tail.len(),
        all.iter()
            .filter(|r| r["seq"].as_u64() > Some(after))
            .count()
    );
    assert_eq!(
        events.join().unwrap(),
        all.len() as u64,
        "the event stream carried every result, then ended"
    );
    assert!(results
        .iter()
        .all(|r| r["translation"].as_array().unwrap().len() == 3));
    // Where each frame's time went: its waits and its flow add up to no more than its latency
    // (the geometry time of a held frame is that of the frame that released it, inside its hold).
    for r in &results {
        let w = &r["waits_ms"];
        let parts: f64 = ["door", "flow", "geometry", "sinks", "held"]
            .iter()
            .map(|k| w[k].as_f64().unwrap())
            .sum::<f64>()
            + r["flow_ms"].as_f64().unwrap();
        assert!(parts <= r["latency_ms"].as_f64().unwrap() + 0.5, "{r}");
    }
    // Each result carries the run's counts as it left: the last one's are the run's.
    let last = &results.last().unwrap()["counts"];
    assert_eq!(last["processed"], processed, "{last}");
    assert_eq!(last["received"], 12, "{last}");
    let status = json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1);
    assert_eq!(status["running"], false);
    assert_eq!(
        status["frames_received"].as_u64().unwrap(),
        12,
        "every pushed frame is counted"
    );
    // Frames are dropped at the door (queue full) or inside the live pipeline; none is lost
    // uncounted, and the status, run.json and /metrics tell one story.
    for key in [
        "frames_received",
        "frames_processed",
        "frames_dropped",
        "frames_dropped_at_door",
        "frames_dropped_inside",
        "frames_skipped",
    ] {
        assert_eq!(status[key], summary[key], "{key}: {status} vs {summary}");
    }
    let n = |k: &str| status[k].as_u64().unwrap();
    assert_eq!(
        n("frames_processed") + n("frames_dropped_at_door") + n("frames_dropped_inside"),
        12
    );
    assert_eq!(
        n("frames_dropped"),
        n("frames_dropped_at_door") + n("frames_dropped_inside")
    );
    // A link put in the session's folder is not followed.
    let folder = dir.path().join("data").join(&id);
    std::fs::remove_file(folder.join("run.json")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", folder.join("run.json")).unwrap();
    let (st, _) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/run.json"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 404);
    let (st, traj) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/trajectory.txt"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 200);
    // A pose for every tracked frame (and orientation-only one); the others are counted in
    // run.json, with why.
    assert_eq!(
        String::from_utf8_lossy(&traj)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count() as u64,
        summary["frames_tracked"].as_u64().unwrap()
            + summary["frames_orientation_only"].as_u64().unwrap()
    );
    assert_eq!(
        summary["frames_tracked"].as_u64().unwrap() + summary["frames_untracked"].as_u64().unwrap(),
        processed
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
            "streamrecon_latency_ms_count{{session=\"{id}\",stage=\"end_to_end\"}} {processed}"
        )),
        "{metrics}"
    );
    for key in [
        "frames_processed",
        "frames_dropped_at_door",
        "frames_dropped_inside",
    ] {
        let line = format!(
            "streamrecon_{key}_total{{session=\"{id}\"}} {}",
            status[key]
        );
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
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
        // Every run option is a session option, validated as `run` validates it.
        r#"{"preset": "slowest"}"#,
        r#"{"dis_patch_size": 2}"#,
        r#"{"stabilize_gain": 3}"#,
        // Files on the server are the server's to name.
        r#"{"weights": "/etc/passwd"}"#,
        r#"{"flow_config": "../x.json"}"#,
        // No --flow-weights on this server.
        r#"{"flow": "streamflow"}"#,
        "{",
    ] {
        let (st, body) = post_json(p, "/sessions", bad);
        assert!(
            (400..500).contains(&st),
            "{bad}: {st} {}",
            String::from_utf8_lossy(&body)
        );
        // Every refusal is JSON, the framework's own (malformed JSON, wrong types) too.
        assert!(json(&body)["error"].is_string(), "{bad}");
    }
    let long_name = format!(r#"{{"name": "{}"}}"#, "n".repeat(100_000));
    for (what, st_want, body, says) in [
        ("a wrong type", 400, r#"{"voxel": "big"}"#, "expected f32"),
        // No GPU here (nor a `cuda` build in the tests): refused before the session starts.
        ("a CUDA device", 400, r#"{"device": "cuda:0"}"#, "CUDA:"),
        (
            "a device name",
            400,
            r#"{"device": "gpu"}"#,
            "expected cpu, cuda",
        ),
        (
            "a 100 kB name",
            400,
            long_name.as_str(),
            "name must be at most 200",
        ),
        (
            "a name with a newline",
            400,
            r#"{"name": "a\nb"}"#,
            "control characters",
        ),
    ] {
        let (st, b) = post_json(p, "/sessions", body);
        assert_eq!(st, st_want, "{what}: {}", String::from_utf8_lossy(&b));
        let e = json(&b)["error"].as_str().unwrap().to_string();
        assert!(e.contains(says), "{what}: {e}");
    }
    let auth = format!("Bearer {TOKEN}");
    let (st, b) = http_with(
        p,
        "POST",
        "/sessions",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"{}",
    );
    assert_eq!(st, 415);
    assert!(json(&b)["error"].as_str().unwrap().contains("Content-Type"));
    let (st, b) = http(p, "GET", "/no/such/route", Some(TOKEN), b"");
    assert_eq!(st, 404);
    assert!(json(&b)["error"].is_string());
    let (_, body) = post_json(p, "/sessions", r#"{"weights": "/etc/passwd"}"#);
    let msg = String::from_utf8_lossy(&body);
    assert!(msg.contains("server's to set (`serve --weights`)"), "{msg}");
    let (_, body) = post_json(p, "/sessions", r#"{"colour": 1}"#);
    let msg = String::from_utf8_lossy(&body);
    assert!(msg.contains("unknown field `colour`"), "{msg}");
    // The run options a session may set: a flowvo session with its own flow and fusion.
    let (st, body) = post_json(
        p,
        "/sessions",
        r#"{"preset": "fast", "flow_refine": 0, "voxel": 0.02, "max_points": 10000, "depth_every": 0}"#,
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    // A session without a recording: its run's files, no .rrd.
    let quiet = {
        let (st, body) = post_json(p, "/sessions", r#"{"record": false}"#);
        assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
        json(&body)["id"].as_str().unwrap().to_string()
    };
    let frame = png(&image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 5 % 256) as u8, (y * 7 % 256) as u8, 90])
    }));
    assert_eq!(push(p, &quiet, &frame, 0.0).0, 200);
    assert_eq!(
        http(p, "DELETE", &format!("/sessions/{quiet}"), Some(TOKEN), b"").0,
        200
    );
    let file = |name: &str| {
        http(
            p,
            "GET",
            &format!("/sessions/{quiet}/files/{name}"),
            Some(TOKEN),
            b"",
        )
        .0
    };
    assert_eq!(file("run.json"), 200);
    assert_eq!(file("recording.rrd"), 404);
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

/// A lossless session on the `streamflow` engine: every frame is processed by the time the
/// session has closed (the engine answers a window of T frames at a time, the last at the end).
#[test]
fn a_streamflow_session_answers_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/streamflow-tiny");
    let (w, c) = (
        fixture.join("model.safetensors"),
        fixture.join("config.json"),
    );
    let srv = start(
        &dir.path().join("data"),
        1,
        &[
            "--flow-weights".as_ref(),
            w.as_os_str(),
            "--flow-config".as_ref(),
            c.as_os_str(),
        ],
    );
    let p = srv.port;
    let (st, body) = post_json(
        p,
        "/sessions",
        r#"{"flow": "streamflow", "lossless": true, "record": false}"#,
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["id"].as_str().unwrap().to_string();
    for i in 0..6 {
        let (st, b) = push(p, &id, &png(&frame_image(128, 128, i)), f64::from(i));
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    }
    // Frames 0–3 make the first window; frames 4 and 5 wait for the end of the stream (and
    // flowvo holds frames until its map starts, which these frames never give it).
    let (st, b) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let t0 = std::time::Instant::now();
    let s = loop {
        let s = status(p, &id);
        if s["running"] == false {
            break s;
        }
        assert!(t0.elapsed().as_secs() < 60, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(s["frames_processed"], 6, "{s}");
    assert!(s["summary"]["error"].is_null(), "{s}");
}

#[test]
fn bad_frames_get_clear_errors_and_other_sessions_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("data"), 4, &[]);
    let p = srv.port;
    let a = create(p, "{}");
    let b = create(p, "{}");
    let ok = png(&frame_image(96, 64, 0));
    assert_eq!(push(p, &a, &ok, 0.0).0, 200);
    let mut corrupt_jpeg = {
        let mut v = Vec::new();
        frame_image(96, 64, 1)
            .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Jpeg)
            .unwrap();
        v
    };
    // Cut inside its headers, before any scan data.
    corrupt_jpeg.truncate(120);
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("corrupt JPEG", corrupt_jpeg, "Jpeg"),
        // Checked against the session's size from the header, before 108 MB are decoded.
        (
            "6000x6000 PNG header",
            common::png_header_only(6000, 6000),
            "frame is 6000x6000 but this session's frames are 96x64",
        ),
        ("zero-size PNG", common::png_header_only(0, 0), "frame"),
        (
            "100k x 100k PNG header",
            common::png_header_only(100_000, 100_000),
            "too large",
        ),
        (
            "frame of another size",
            png(&frame_image(80, 64, 2)),
            "but this session's frames are 96x64",
        ),
        ("empty body", Vec::new(), "frame"),
    ];
    for (what, body, says) in cases {
        let t0 = std::time::Instant::now();
        let (st, msg) = push(p, &a, &body, 0.1);
        let msg = String::from_utf8_lossy(&msg).to_string();
        assert_eq!(st, 400, "{what}: {msg}");
        assert!(msg.contains(says), "{what}: {msg}");
        eprintln!("{what}: 400 in {:?}: {msg}", t0.elapsed());
    }
    // Raw RGB: exact size accepted, a short body refused.
    let auth = format!("Bearer {TOKEN}");
    let raw = frame_image(96, 64, 3).into_raw();
    let raw_headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "image/x-raw-rgb"),
        ("x-width", "96"),
        ("x-height", "64"),
    ];
    let path = format!("/sessions/{a}/frames");
    assert_eq!(http_with(p, "POST", &path, &raw_headers, &raw).0, 200);
    let (st, msg) = http_with(p, "POST", &path, &raw_headers, &raw[..1000]);
    assert_eq!(st, 400);
    assert!(String::from_utf8_lossy(&msg).contains("needs 18432 bytes, got 1000"));
    // Timestamps: finite seconds within reason, and later than the previous frame's.
    for (t, says) in [
        (
            1e308,
            "x-timestamp must be seconds from 0 to 1e10, got 1000000000",
        ),
        (-1.0, "x-timestamp must be seconds from 0 to 1e10, got -1"),
    ] {
        let (st, msg) = push(p, &a, &ok, t);
        assert_eq!(st, 400);
        assert!(json(&msg)["error"].as_str().unwrap().contains(says), "{t}");
    }
    assert_eq!(push(p, &a, &ok, 0.5).0, 200);
    let (st, msg) = push(p, &a, &ok, 0.2);
    assert_eq!(st, 400);
    assert!(
        json(&msg)["error"]
            .as_str()
            .unwrap()
            .contains("x-timestamp 0.2 is not after the previous frame's 0.5"),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    // Oversize payload: refused with 413 (the server may answer before reading it all).
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    let big = vec![0u8; 33 << 20];
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    )
    .unwrap();
    let _ = s.write_all(&big);
    let mut resp = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut resp);
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.starts_with("HTTP/1.1 413") && resp.contains(r#"{"error":"#),
        "{}",
        &resp[..resp.len().min(300)]
    );
    // A client that disconnects mid-frame.
    {
        let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        write!(
            s,
            "POST /sessions/{b}/frames HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 50000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&ok[..ok.len().min(2000)]).unwrap();
    }
    // A client that follows session b's results and never reads them.
    let mut deaf = TcpStream::connect(("127.0.0.1", p)).unwrap();
    write!(
        deaf,
        "GET /sessions/{b}/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    // Session b still takes frames and produces results, session a still answers.
    for i in 0..40 {
        let (st, msg) = push(p, &b, &png(&frame_image(96, 64, i)), f64::from(i) / 10.0);
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&msg));
    }
    let sb = status(p, &b);
    assert_eq!(sb["frames_received"], 40, "{sb}");
    let sa = status(p, &a);
    assert_eq!(
        sa["frames_received"], 3,
        "refused frames are not counted: {sa}"
    );
    for id in [&a, &b] {
        let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(http(p, "GET", "/health", None, b"").0, 200);
    drop(deaf);
}

/// A live session has one frame in its pipeline at a time: frames pushed faster than it works
/// wait (or are replaced) at its door, and every frame after the map's start is read only once
/// the one before it has left the pipeline.
#[test]
fn a_live_session_has_one_frame_in_its_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    synth(
        &seq,
        &[
            "--trajectory",
            "handheld",
            "--frames",
            "360",
            "--speed",
            "0.5",
            "--size",
            "320x240",
        ],
    );
    let srv = start(&dir.path().join("data"), 2, &[]);
    let p = srv.port;
    let results = |id: &str| {
        let (_, b) = http(
            p,
            "GET",
            &format!("/sessions/{id}/results?since=0"),
            Some(TOKEN),
            b"",
        );
        json(&b).as_array().unwrap().clone()
    };
    // The last frame flowvo held before its map, and the results after it.
    let after_the_map = |all: &[serde_json::Value]| {
        let last_held = all
            .iter()
            .filter(|r| r["pending"] == true)
            .filter_map(|r| r["index"].as_u64())
            .max();
        let after: Vec<serde_json::Value> = all
            .iter()
            .filter(|r| r["pending"] != true && r["index"].as_u64() > last_held)
            .cloned()
            .collect();
        (last_held, after)
    };
    let check = |body: &str, pipelined: bool| {
        let id = create(p, body);
        // Half the motion a frame: on a loaded machine most frames are dropped at the door, and
        // the ones that go through must still be near enough for flowvo to start its map. Where
        // that start comes late (a loaded machine drops more), frames go on until enough results
        // after it are in, up to the sequence's 360.
        for i in 0..360 {
            if i >= 240 && i % 20 == 0 && after_the_map(&results(&id)).1.len() >= 20 {
                break;
            }
            let frame = std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
            let (st, b) = push(p, &id, &frame, f64::from(i) / 30.0);
            assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
            // Faster than a frame's way through the pipeline, so frames would pile up.
            std::thread::sleep(std::time::Duration::from_millis(8));
        }
        http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
        let all = results(&id);
        let (last_held, after) = after_the_map(&all);
        let last_held = last_held.expect("flowvo held frames before its map");
        // Once the held frames are out, a result's counts show every frame read as processed
        // (or dropped inside) unless the stages work on several frames at once.
        assert!(
            after.len() >= 10,
            "{} results after the map started (frame {last_held}) of {}",
            after.len(),
            all.len()
        );
        let ahead = after
            .iter()
            .filter(|r| {
                let c = &r["counts"];
                c["read"].as_u64()
                    > Some(c["processed"].as_u64().unwrap() + c["dropped_inside"].as_u64().unwrap())
            })
            .count();
        if pipelined {
            // The check can see pipelining: a lossless session reads ahead.
            assert!(ahead > 0, "a lossless session pipelines its stages");
        } else {
            assert_eq!(ahead, 0, "one frame at a time in a live session");
        }
    };
    check(r#"{"result_points": 0, "record": false}"#, false);
    check(
        r#"{"result_points": 0, "record": false, "lossless": true}"#,
        true,
    );
}

/// Camera centres and rotations of results, in frame order.
fn result_poses(results: &[serde_json::Value]) -> Vec<(u64, streamrecon::frame::Pose)> {
    results
        .iter()
        .filter(|r| r["pending"] != true)
        .map(|r| {
            let t: Vec<f64> = serde_json::from_value(r["translation"].clone()).unwrap();
            let q: Vec<f64> = serde_json::from_value(r["rotation_xyzw"].clone()).unwrap();
            let pose = streamrecon::frame::Pose::from_parts(
                nalgebra::Translation3::new(t[0], t[1], t[2]),
                nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(
                    q[3], q[0], q[1], q[2],
                )),
            );
            (r["index"].as_u64().unwrap(), pose)
        })
        .collect()
}

#[test]
fn poses_through_the_api_match_ground_truth_like_a_run() {
    use streamrecon::datasets::formats::tum;
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    synth(
        &seq,
        &[
            "--trajectory",
            "smooth",
            "--frames",
            "60",
            "--size",
            "320x240",
            "--seed",
            "5",
        ],
    );
    let gt: Vec<_> = tum::read_tum(&seq.join("poses.txt"))
        .unwrap()
        .into_iter()
        .map(|p| p.world_from_cam)
        .collect();
    // The same sequence through `streamrecon run`.
    let run_out = dir.path().join("run");
    assert!(Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .arg("run")
        .arg(&seq)
        .arg("--out")
        .arg(&run_out)
        .status()
        .unwrap()
        .success());
    let run_traj = tum::read_tum(&run_out.join("trajectory.txt")).unwrap();
    let run_poses: Vec<_> = run_traj.iter().map(|p| p.world_from_cam).collect();
    let run_metrics =
        streamrecon::eval::pose::pose_metrics(&gt[..run_poses.len()], &run_poses, 1).unwrap();
    // And through the service, as a client with the sequence's intrinsics.
    let k: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seq.join("intrinsics.json")).unwrap()).unwrap();
    let srv = start(&dir.path().join("data"), 1, &[]);
    let p = srv.port;
    let id = create(
        p,
        &format!(
            r#"{{"lossless": true, "intrinsics": [{}, {}, {}, {}], "result_points": 0}}"#,
            k["fx"], k["fy"], k["cx"], k["cy"]
        ),
    );
    for (i, t) in run_traj.iter().enumerate().take(60) {
        let frame = std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
        let (st, body) = push(p, &id, &frame, t.timestamp);
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    }
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200);
    assert_eq!(json(&body)["summary"]["frames_dropped"], 0);
    let (_, body) = http(
        p,
        "GET",
        &format!("/sessions/{id}/results?since=0"),
        Some(TOKEN),
        b"",
    );
    let results = json(&body).as_array().unwrap().clone();
    let api = result_poses(&results);
    assert_eq!(
        api.len(),
        run_poses.len(),
        "one result per frame, like the run"
    );
    let gt_api: Vec<_> = api.iter().map(|(i, _)| gt[*i as usize]).collect();
    let est_api: Vec<_> = api.iter().map(|(_, p)| *p).collect();
    let api_metrics = streamrecon::eval::pose::pose_metrics(&gt_api, &est_api, 1).unwrap();
    eprintln!(
        "ATE/length: run {:.5}, service {:.5} ({} frames)",
        run_metrics.ate_rmse_over_length,
        api_metrics.ate_rmse_over_length,
        api.len()
    );
    // A sanity bound on this short, slow 320×240 sequence (2.4 m of path in 60 frames while the
    // view turns ~2° a frame: 3.6 % of the path measured since the synthetic cameras stopped
    // whip-panning, 2.7 % on the old paths); the test's point is the next check: the service
    // gives what `streamrecon run` gives.
    assert!(api_metrics.ate_rmse_over_length < 0.05, "{api_metrics:?}");
    assert!(
        api_metrics.ate_rmse <= run_metrics.ate_rmse * 1.05 + 1e-6,
        "service {api_metrics:?} vs run {run_metrics:?}"
    );
}

/// `serve` flags for vggt sessions on the tiny fixture model, with snapshots every `every`
/// frames.
fn vggt_server_args(every: u32) -> Vec<std::ffi::OsString> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geometry-tiny");
    vec![
        "--weights".into(),
        fixture.join("model.safetensors").into(),
        "--model-config".into(),
        fixture.join("config.json").into(),
        "--snapshot-every".into(),
        every.to_string().into(),
    ]
}

#[test]
fn a_killed_server_resumes_its_sessions_from_their_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = vggt_server_args(4);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsString::as_os_str).collect();
    let mut srv = start(&data, 2, &args);
    let p = srv.port;
    let id = create(p, r#"{"geometry": "vggt", "lossless": true}"#);
    let flowvo = create(p, r#"{"lossless": true}"#);
    let seq = dir.path().join("seq");
    // flowvo starts its map once it sees enough parallax (frame 10 on this sequence; small
    // changes in the images move that by several frames), and a snapshot comes into force only
    // once every frame before it is in the outputs, so it gets 16 frames before the kill.
    let (flowvo_frames, flowvo_pushed) = (24u32, 16u32);
    synth(
        &seq,
        &[
            "--frames",
            &flowvo_frames.to_string(),
            "--size",
            "160x120",
            "--seed",
            "3",
        ],
    );
    let flowvo_frame = |i: u32| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
    let pushed = 10u32;
    for i in 0..flowvo_pushed {
        if i < pushed {
            let (st, _) = push(p, &id, &png(&frame_image(96, 64, i)), f64::from(i));
            assert_eq!(st, 200);
        }
        assert_eq!(
            push(p, &flowvo, &flowvo_frame(i), f64::from(i) / 30.0).0,
            200
        );
    }
    wait_processed(p, &id, u64::from(pushed), 120);
    // flowvo snapshots too (every 4 frames it has taken).
    let flowvo_snapshot = data.join(&flowvo).join("snapshot.safetensors");
    let t0 = std::time::Instant::now();
    while !flowvo_snapshot.exists() {
        assert!(t0.elapsed().as_secs() < 60, "no flowvo snapshot");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SIGKILL: no drain, no final snapshot.
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let srv = start(&data, 2, &args);
    let p = srv.port;
    let s = status(p, &id);
    assert_eq!(s["running"], true, "resumed under its own id: {s}");
    let resumed_at = s["resumed_at"].as_u64().unwrap();
    let lost = u64::from(pushed) - resumed_at;
    eprintln!("killed after {pushed} frames; resumed at frame {resumed_at}: {lost} frames lost");
    assert!(resumed_at >= 8 && resumed_at <= u64::from(pushed), "{s}");
    // flowvo continues its map from the snapshot.
    let sf = status(p, &flowvo);
    assert_eq!(sf["running"], true, "{sf}");
    let flowvo_at = sf["resumed_at"].as_u64().unwrap();
    eprintln!("flowvo session resumed at frame {flowvo_at} of {flowvo_pushed}");
    assert!((4..=u64::from(flowvo_pushed)).contains(&flowvo_at), "{sf}");
    for i in flowvo_pushed..flowvo_frames {
        assert_eq!(
            push(p, &flowvo, &flowvo_frame(i), f64::from(i) / 30.0).0,
            200
        );
    }
    let (st, body) = http(
        p,
        "DELETE",
        &format!("/sessions/{flowvo}"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 200);
    let summary = json(&body)["summary"].clone();
    // The snapshot held the map: the resumed frames are tracked in the same segment.
    assert_eq!(summary["map_segments"], 1, "{summary}");
    assert_eq!(
        summary["frames_tracked"], summary["frames_processed"],
        "{summary}"
    );
    assert!(summary["error"].is_null(), "{summary}");
    let (_, traj) = http(
        p,
        "GET",
        &format!("/sessions/{flowvo}/files/trajectory.txt"),
        Some(TOKEN),
        b"",
    );
    let traj =
        tum::tum_from_str(&String::from_utf8_lossy(&traj), Path::new("trajectory.txt")).unwrap();
    // The frames before the snapshot, then the ones pushed after the restart (those between
    // the snapshot and the kill are lost with the server).
    assert_eq!(
        traj.len() as u64,
        flowvo_at + u64::from(flowvo_frames - flowvo_pushed)
    );
    // The camera keeps moving after the restart (a new map would start at a standstill).
    let centre = |i: usize| traj[i].world_from_cam.translation.vector;
    for i in flowvo_at as usize..traj.len() {
        assert!((centre(i) - centre(i - 1)).norm() > 1e-6, "frame {i}");
    }
    for i in 0..3 {
        let (st, _) = push(
            p,
            &id,
            &png(&frame_image(96, 64, pushed + i)),
            20.0 + f64::from(i),
        );
        assert_eq!(st, 200);
    }
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    eprintln!("resumed session: {}", String::from_utf8_lossy(&body));
    // The trajectory holds the frames before the snapshot and the three after the restart,
    // numbered on from the snapshot.
    let (_, traj) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/trajectory.txt"),
        Some(TOKEN),
        b"",
    );
    let lines = String::from_utf8_lossy(&traj)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count() as u64;
    assert_eq!(lines, resumed_at + 3);
    let (_, body) = http(
        p,
        "GET",
        &format!("/sessions/{id}/results?since=0"),
        Some(TOKEN),
        b"",
    );
    let first = json(&body)[0]["index"].as_u64().unwrap();
    assert_eq!(first, resumed_at);
    // Closed by its client: a third start does not resume it.
    drop(srv);
    let srv = start(&data, 2, &args);
    assert_eq!(status(srv.port, &id)["running"], false);
}

#[test]
fn server_side_sources_come_only_from_the_allowlist() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    synth(&seq, &["--frames", "20", "--size", "160x120"]);
    // An MJPEG video served over HTTP on loopback stands in for a network camera.
    let video = dir.path().join("www/cam.avi");
    std::fs::create_dir_all(video.parent().unwrap()).unwrap();
    assert!(Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-framerate", "10", "-i"])
        .arg(seq.join("rgb/%06d.png"))
        .args(["-c:v", "mjpeg", "-q:v", "3"])
        .arg(&video)
        .status()
        .unwrap()
        .success());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut web = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &web_port.to_string(),
        ])
        .current_dir(video.parent().unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let allowed = format!("http://127.0.0.1:{web_port}/*");
    let srv = start(
        &dir.path().join("data"),
        2,
        &["--allow-source".as_ref(), allowed.as_ref()],
    );
    let p = srv.port;
    for refused in [
        r#"{"source": "camera:0"}"#,
        r#"{"source": "http://192.0.2.1/cam.avi"}"#,
        r#"{"source": "/etc/passwd"}"#,
    ] {
        let (st, body) = post_json(p, "/sessions", refused);
        assert_eq!(st, 403, "{refused}: {}", String::from_utf8_lossy(&body));
    }
    let id = create(
        p,
        &format!(r#"{{"source": "http://127.0.0.1:{web_port}/cam.avi"}}"#),
    );
    assert_eq!(
        push(p, &id, &png(&frame_image(96, 64, 0)), 0.0).0,
        409,
        "a server-side session takes no pushed frames"
    );
    // A live URL read faster than the pipeline runs: most frames are dropped inside (counted).
    let s = wait_processed(p, &id, 1, 60);
    assert_eq!(s["source"], format!("http://127.0.0.1:{web_port}/cam.avi"));
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200);
    let summary = json(&body)["summary"].clone();
    assert!(summary["frames_read"].as_u64().unwrap() >= 3, "{summary}");
    let _ = web.kill();
    let _ = web.wait();
}

#[test]
fn a_websocket_client_streams_frames_and_receives_results() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("data"), 1, &[]);
    serve_common::websocket_round_trip(srv.port);
}

#[test]
fn servers_killed_at_ten_frames_resume_both_engines_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let args = vggt_server_args(2);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsString::as_os_str).collect();
    let seq = dir.path().join("seq");
    let frames = 30u32;
    synth(
        &seq,
        &[
            "--frames",
            &frames.to_string(),
            "--size",
            "160x120",
            "--seed",
            "3",
        ],
    );
    let frame = |i: u32| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
    for k in 0..10u32 {
        let data = dir.path().join(format!("data-{k}"));
        let killed_after = 6 + 2 * k;
        let srv = start(&data, 2, &args);
        let ids = [
            create(srv.port, r#"{"geometry": "vggt", "lossless": true}"#),
            create(srv.port, r#"{"lossless": true}"#),
        ];
        for i in 0..killed_after {
            for id in &ids {
                assert_eq!(push(srv.port, id, &frame(i), f64::from(i) / 30.0).0, 200);
            }
        }
        // Killed while the last frames may still be in the pipelines (flowvo holds its
        // first frames until its map starts, about frame 10 here).
        wait_processed(srv.port, &ids[0], u64::from(killed_after - 2), 60);
        if killed_after > 14 {
            wait_processed(srv.port, &ids[1], u64::from(killed_after - 4), 60);
        }
        drop(srv);
        let srv = start(&data, 2, &args);
        let p = srv.port;
        for (id, engine) in ids.iter().zip(["vggt", "flowvo"]) {
            let s = status(p, id);
            let Some(at) = s["resumed_at"].as_u64() else {
                // Killed before its first snapshot took effect: nothing to resume.
                assert_eq!(s["running"], false, "{engine}: {s}");
                continue;
            };
            assert!(at <= u64::from(killed_after), "{engine}: {s}");
            // A lossless client continues from where the session resumed (its status says).
            for i in at as u32..frames {
                assert_eq!(push(p, id, &frame(i), f64::from(i) / 30.0).0, 200);
            }
            let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
            assert_eq!(st, 200);
            let summary = json(&body)["summary"].clone();
            assert!(summary["error"].is_null(), "{engine}: {summary}");
            assert_eq!(
                summary["map_segments"], 1,
                "{engine}, killed after {killed_after}: {summary}"
            );
            let (_, traj) = http(
                p,
                "GET",
                &format!("/sessions/{id}/files/trajectory.txt"),
                Some(TOKEN),
                b"",
            );
            let traj = tum::tum_from_str(&String::from_utf8_lossy(&traj), Path::new("t")).unwrap();
            // Every frame's pose once: none lost, none twice.
            assert_eq!(
                traj.len() as u32,
                frames,
                "{engine}, killed after {killed_after}, resumed at {at}"
            );
            eprintln!("{engine}: killed after {killed_after}, resumed at {at}");
        }
    }
}

/// `streamrecon view`: one recording in rerun's web viewer, served by the binary.
#[test]
fn view_serves_a_recording_in_the_web_viewer() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    synth(&seq, &["--frames", "6", "--size", "160x120"]);
    let rrd = dir.path().join("rec.rrd");
    assert!(Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .arg("run")
        .arg(&seq)
        .arg("--out")
        .arg(dir.path().join("out"))
        .arg("--save")
        .arg(&rrd)
        .status()
        .unwrap()
        .success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .arg("view")
        .arg(&rrd)
        .args(["--bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let (st, _) = http(port, "GET", "/", None, b"");
    assert_eq!(st, 307);
    let (st, page) = http(port, "GET", "/viewer/", None, b"");
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&page).contains("re_viewer.js"));
    let (st, bytes) = http(port, "GET", "/recording.rrd", None, b"");
    assert_eq!(st, 200);
    assert_eq!(bytes, std::fs::read(&rrd).unwrap());
    child.kill().unwrap();
    child.wait().unwrap();
    // A missing recording: one clear line naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .arg("view")
        .arg(dir.path().join("nope.rrd"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nope.rrd"), "{err}");
}
