//! Serving on NATS JetStream: a real `nats-server -js` on loopback, a front door (`serve
//! --nats`) and two workers; one worker is killed (SIGKILL) mid-stream and the other finishes
//! its sessions from their last snapshots.

mod common;
mod serve_common;

use std::process::Command;
use std::time::{Duration, Instant};

use serve_common::{
    create, http, json, nats_door, nats_server, nats_server_with, nats_token_file, nats_worker,
    nats_worker_with, push, start, synth, TOKEN,
};

/// Every result of a session so far, following `seq` as a client does.
fn all_results(port: u16, id: &str) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    loop {
        let after = out
            .last()
            .map_or(String::new(), |r| format!("?after_seq={}", r["seq"]));
        let (st, body) = http(
            port,
            "GET",
            &format!("/sessions/{id}/results{after}"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        let page = json(&body).as_array().unwrap().clone();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

#[test]
fn a_worker_without_the_broker_s_token_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["worker", "--nats", &url, "--data-dir"])
        .arg(dir.path().join("w"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.contains("cannot connect to nats://")),
        "{err}"
    );
}

/// A front door and one worker: the WebSocket gives what the embedded server's gives.
#[test]
fn a_websocket_client_streams_through_a_front_door() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let _worker = nats_worker(&url, &dir.path().join("w1"), "w1", 1, 5.0, 15);
    let door = nats_door(&dir.path().join("door"), &url, &[]);
    serve_common::websocket_round_trip(door.port);
}

/// A worker serving HTTP (`--bind`): a front door passes a running session's live recording on
/// from it (the stream ends with the recording the session stores at close), `/metrics` at the
/// door counts the service's sessions, the worker's own needs the token.
#[test]
fn a_front_door_passes_on_the_live_recording_and_counts_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let w1 = dir.path().join("w1");
    let extra = [
        "--bind".to_string(),
        "127.0.0.1:0".into(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--nats-token-file".into(),
        nats_token_file(&w1).display().to_string(),
    ];
    let (_worker, line) = nats_worker_with(&url, &w1, "w1", &extra);
    let worker_port: u16 = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let door = nats_door(&dir.path().join("door"), &url, &[]);
    let p = door.port;
    let seq = dir.path().join("seq");
    synth(
        &seq,
        &["--frames", "40", "--size", "160x120", "--seed", "2"],
    );
    let frame = |i: usize| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
    let id = create(p, r#"{"lossless": true}"#);
    for i in 0..20 {
        assert_eq!(push(p, &id, &frame(i), i as f64 / 10.0).0, 200);
    }
    let t0 = Instant::now();
    while json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1)["worker"].is_null()
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "never claimed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let live = {
        let path = format!("/sessions/{id}/live.rrd");
        std::thread::spawn(move || http(p, "GET", &path, Some(TOKEN), b""))
    };
    for i in 20..40 {
        assert_eq!(push(p, &id, &frame(i), i as f64 / 10.0).0, 200);
    }
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let (st, streamed) = live.join().unwrap();
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&streamed));
    assert!(streamed.starts_with(b"RRF2"), "not a recording");
    let (st, stored) = http(
        p,
        "GET",
        &format!("/sessions/{id}/files/recording.rrd"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 200);
    assert_eq!(
        streamed.len(),
        stored.len(),
        "the stream ends with the file"
    );
    // Closed: nobody holds it, and the door says where its recording is.
    let (st, body) = http(
        p,
        "GET",
        &format!("/sessions/{id}/live.rrd"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(st, 404);
    assert!(String::from_utf8_lossy(&body).contains("among its files"));
    let (st, metrics) = http(p, "GET", "/metrics", Some(TOKEN), b"");
    assert_eq!(st, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("streamrecon_sessions{state=\"closed\"} 1")
            && metrics.contains("streamrecon_worker_max_sessions{worker=\"w1\"} 4"),
        "{metrics}"
    );
    assert_eq!(http(worker_port, "GET", "/metrics", None, b"").0, 401);
    let (st, metrics) = http(worker_port, "GET", "/metrics", Some(TOKEN), b"");
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&metrics).contains("streamrecon_rss_mib"));
    // The page and the viewer are served as by the embedded server.
    assert_eq!(http(p, "GET", "/", None, b"").0, 200);
}

/// Runs openssl in `dir`; false where it is missing (and not required).
fn openssl(dir: &std::path::Path, args: &[&str]) -> bool {
    let Ok(o) = Command::new("openssl").args(args).current_dir(dir).output() else {
        assert!(
            std::env::var_os("STREAMRECON_REQUIRE_NATS").is_none(),
            "openssl is not installed (scripts/setup-system installs it)"
        );
        eprintln!("skipped: openssl is not installed");
        return false;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    true
}

/// NKey login over TLS with a private certificate authority: a front door and a worker given
/// the key and the authority serve a session; a worker with another key, or without the
/// authority, stops with one line that names the server.
#[test]
fn nkey_and_tls_logins_serve_and_wrong_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let made = openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat()
        .into_iter()
        .chain(["-days", "2", "-subj", "/CN=streamrecon test CA"])
        .collect::<Vec<_>>(),
    );
    if !made {
        return;
    }
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    assert!(openssl(
        d,
        &[
            &["req"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"]
        ]
        .concat()
        .into_iter()
        .chain(["-subj", "/CN=127.0.0.1"])
        .collect::<Vec<_>>(),
    ));
    assert!(openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    ));
    let user = nkeys::KeyPair::new_user();
    let seed = d.join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let conf = d.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "tls {{\n  cert_file: \"{0}/server.pem\"\n  key_file: \"{0}/server.key\"\n}}\n\
             authorization {{\n  users = [ {{ nkey: \"{1}\" }} ]\n}}\n",
            d.display(),
            user.public_key()
        ),
    )
    .unwrap();
    let Some((_nats, port)) = nats_server_with(&d.join("js"), &["-c", conf.to_str().unwrap()])
    else {
        return;
    };
    let url = format!("tls://127.0.0.1:{port}");
    let ca = d.join("ca.pem");
    let login = |seed: &std::path::Path, ca: Option<&std::path::Path>| {
        let mut a = vec!["--nats-nkey-file".to_string(), seed.display().to_string()];
        if let Some(ca) = ca {
            a.extend(["--nats-ca".to_string(), ca.display().to_string()]);
        }
        a
    };
    let _worker = nats_worker_with(&url, &d.join("w1"), "w1", &login(&seed, Some(&ca)));
    let door_login = login(&seed, Some(&ca));
    let mut door_args: Vec<&std::ffi::OsStr> = vec!["--nats".as_ref(), url.as_ref()];
    door_args.extend(door_login.iter().map(std::ffi::OsStr::new));
    let door = start(&d.join("door"), 1, &door_args);
    let p = door.port;
    let seq = d.join("seq");
    synth(
        &seq,
        &["--frames", "12", "--size", "160x120", "--seed", "4"],
    );
    let id = create(p, r#"{"lossless": true}"#);
    for i in 0..12 {
        let f = std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
        assert_eq!(push(p, &id, &f, f64::from(i) / 10.0).0, 200);
    }
    let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["summary"]["frames_processed"], 12);
    // Another key; the right key without the authority: refused, one line says so.
    let stranger = d.join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    for (args, why) in [
        (login(&stranger, Some(&ca)), "authorization violation"),
        (login(&seed, None), "certificate"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
            .args(["worker", "--nats", &url, "--nats-tls", "--data-dir"])
            .arg(d.join("w-refused"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.lines().last().is_some_and(
                |l| l.contains(&format!("cannot connect to {url}")) && l.contains(why)
            ),
            "{args:?}: {err}"
        );
    }
}

/// Frames pushed to each session.
const FRAMES: usize = 90;

/// A session moved at frame `resumed_at` has two recording parts, the dead worker's (kept up to
/// its last snapshot) and the other's: whole recordings, one id, every frame in one of them.
fn check_recording_parts(
    dir: &std::path::Path,
    port: u16,
    id: &str,
    summary: &serde_json::Value,
    resumed_at: u64,
) {
    assert_eq!(
        summary["recordings"],
        serde_json::json!(["recording.rrd", "recording-1.rrd"]),
        "{summary}"
    );
    std::fs::create_dir_all(dir).unwrap();
    let mut frames = Vec::new();
    for name in ["recording.rrd", "recording-1.rrd"] {
        let (st, rrd) = http(
            port,
            "GET",
            &format!("/sessions/{id}/files/{name}"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(st, 200, "{name}");
        // Whole messages, the finished part with rerun's stream footer after them.
        let whole = streamrecon::viewer::rrd_whole_len(&rrd, 0);
        assert!(
            whole == rrd.len() || rrd[whole..].len() == 32 && rrd.ends_with(b"RRF2FOOT\x01\0\0\0"),
            "{name}: {whole} of {} bytes in whole messages",
            rrd.len()
        );
        let Some(rerun) = common::rerun_cli() else {
            println!("rerun CLI not installed: {name}'s content not checked");
            return;
        };
        let path = dir.join(name);
        std::fs::write(&path, &rrd).unwrap();
        let text = common::rrd_print(&rerun, &path);
        assert!(
            text.contains(&format!("\"{id}\"")),
            "{name}: not recording {id}"
        );
        // One camera image a frame.
        let images: u64 = text
            .lines()
            .filter(|l| l.contains(" - /world/camera/image/rgb - "))
            .filter_map(|l| {
                l.split(" with ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        frames.push(images);
    }
    eprintln!("recording parts: {frames:?} frames, resumed at {resumed_at}");
    assert!(
        frames[0] >= resumed_at,
        "{frames:?}, resumed at {resumed_at}"
    );
    assert_eq!(frames[1], FRAMES as u64 - resumed_at, "{frames:?}");
}

#[test]
fn a_killed_worker_s_sessions_finish_on_the_other_worker() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let seq = dir.path().join("seq");
    synth(
        &seq,
        &[
            "--trajectory",
            "smooth",
            "--frames",
            &FRAMES.to_string(),
            "--size",
            "320x240",
            "--seed",
            "5",
        ],
    );
    let mut workers = [
        Some(nats_worker(&url, &dir.path().join("w1"), "w1", 2, 2.0, 15)),
        Some(nats_worker(&url, &dir.path().join("w2"), "w2", 2, 2.0, 15)),
    ];
    let door = nats_door(&dir.path().join("door"), &url, &[]);
    let p = door.port;
    let body = r#"{"lossless": true, "result_points": 0, "record": false}"#;
    // The first session (the one whose worker is killed) records.
    let recorded = r#"{"lossless": true, "result_points": 0}"#;
    let ids = [create(p, recorded), create(p, body)];
    let frame = |i: usize| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap();
    let push_all = |range: std::ops::Range<usize>| {
        for i in range {
            for id in &ids {
                let (st, b) = push(p, id, &frame(i), i as f64 * 0.1);
                assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
            }
        }
    };
    push_all(0..45);
    // What is plainly not an image is refused by the door; a PNG cut short is taken (only
    // decoding finds it out) and refused by the worker, which goes on with the next.
    let (st, _) = push(p, &ids[0], b"not an image", 4.55);
    assert_eq!(st, 400);
    let cut = std::fs::read(seq.join("rgb/000000.png")).unwrap();
    let (st, _) = push(p, &ids[0], &cut[..cut.len() / 2], 4.55);
    assert_eq!(st, 200);
    // Wait until the first session is well past a snapshot, then kill its worker.
    let t0 = Instant::now();
    let holder = loop {
        let s = json(&http(p, "GET", &format!("/sessions/{}", ids[0]), Some(TOKEN), b"").1);
        if s["frames_processed"].as_u64().unwrap_or(0) >= 40 {
            break s["worker"].as_str().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_mins(2), "no progress: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = usize::from(holder == "w2");
    workers[killed].take();
    eprintln!("killed worker {holder}");
    // The other worker takes the session over once the lease expires, from its last snapshot.
    let t0 = Instant::now();
    let resumed_at = loop {
        let s = json(&http(p, "GET", &format!("/sessions/{}", ids[0]), Some(TOKEN), b"").1);
        // Where it resumed comes with the lease's first renewal after the takeover.
        if s["worker"].is_string() && s["worker"] != holder.as_str() && s["resumed_at"].is_u64() {
            break s["resumed_at"].as_u64();
        }
        assert!(t0.elapsed() < Duration::from_mins(1), "not taken over: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "taken over after {:.1} s, at frame {resumed_at:?}",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        resumed_at.is_some_and(|n| n >= 15),
        "resumed from a snapshot: {resumed_at:?}"
    );
    push_all(45..FRAMES);
    let mut summaries = Vec::new();
    for id in &ids {
        let (st, body) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
        let summary = json(&body)["summary"].clone();
        assert!(summary["error"].is_null(), "{summary}");
        summaries.push(summary);
    }
    check_recording_parts(
        &dir.path().join("parts"),
        p,
        &ids[0],
        &summaries[0],
        resumed_at.unwrap_or(0),
    );
    for id in &ids {
        let results = all_results(p, id);
        let finals: Vec<&serde_json::Value> =
            results.iter().filter(|r| r["pending"] != true).collect();
        let indices: Vec<u64> = finals
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (0..FRAMES as u64).collect();
        // Every frame answered once, in order, across the failover.
        assert_eq!(indices, expected, "session {id}");
        // Never on two workers at once: the results' workers change at most once (from the
        // killed one to the other), never back.
        let mut runs: Vec<&str> = results
            .iter()
            .map(|r| r["worker"].as_str().unwrap())
            .collect();
        runs.dedup();
        let seen: std::collections::BTreeSet<&str> = runs.iter().copied().collect();
        assert_eq!(
            runs.len(),
            seen.len(),
            "session {id} went back and forth: {runs:?}"
        );
        // The trajectory is whole: the poses before the snapshot from its checkpoint.
        let (st, traj) = http(
            p,
            "GET",
            &format!("/sessions/{id}/files/trajectory.txt"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(st, 200);
        let rows = String::from_utf8_lossy(&traj)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count();
        let tracked = finals.iter().filter(|r| r["tracked"] == true).count();
        assert_eq!(
            rows, tracked,
            "session {id}: trajectory rows vs tracked results"
        );
        eprintln!("session {id}: workers {runs:?}, {tracked} tracked of {FRAMES}");
        // The same results as server-sent events; the stream ends with the closed session.
        let (st, events) = http(
            p,
            "GET",
            &format!("/sessions/{id}/events"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(st, 200);
        let n = String::from_utf8_lossy(&events)
            .matches("event: result")
            .count();
        assert_eq!(n, results.len(), "session {id}: events vs results");
    }
    // The cloud goes on across the failover from the one stored with the snapshot: about the
    // size of the other session's (the same frames), when that one ran on one worker only.
    let points = |id: &str| {
        let (st, ply) = http(
            p,
            "GET",
            &format!("/sessions/{id}/files/points.ply"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(st, 200);
        streamrecon::datasets::formats::ply::ply_from_bytes(&ply, "points.ply".as_ref())
            .expect("points.ply parses")
            .len() as f64
    };
    let other_moved = all_results(p, &ids[1])
        .iter()
        .any(|r| r["worker"].as_str() == Some(holder.as_str()));
    if other_moved {
        eprintln!("both sessions moved: no uninterrupted cloud to compare with");
    } else {
        let (moved, stayed) = (points(&ids[0]), points(&ids[1]));
        eprintln!("points: moved session {moved}, the other {stayed}");
        assert!(
            (moved / stayed - 1.0).abs() < 0.05,
            "moved session {moved} points, the other {stayed}"
        );
    }
    // A closed session takes no frames.
    let (st, _) = push(p, &ids[0], &frame(0), 100.0);
    assert_eq!(st, 409);

    // A worker that stops (Ctrl-C) hands its sessions back with a final snapshot: the next
    // worker continues after the last frame, nothing replayed.
    let id = create(p, body);
    for i in 0..30 {
        assert_eq!(push(p, &id, &frame(i), i as f64 * 0.1).0, 200);
    }
    let t0 = Instant::now();
    while json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1)["frames_processed"]
        .as_u64()
        .unwrap_or(0)
        < 30
    {
        assert!(
            t0.elapsed() < Duration::from_mins(1),
            "session {id} stalled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let survivor = workers[1 - killed].as_mut().unwrap();
    let pid = survivor.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let stopped = survivor.0.wait().unwrap();
    assert!(
        stopped.success(),
        "the stopped worker exits cleanly: {stopped}"
    );
    let _third = nats_worker(&url, &dir.path().join("w3"), "w3", 2, 2.0, 15);
    let t0 = Instant::now();
    let resumed_at = loop {
        let s = json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1);
        if s["worker"] == "w3" && s["resumed_at"].is_u64() {
            break s["resumed_at"].as_u64();
        }
        assert!(t0.elapsed() < Duration::from_mins(1), "not taken over: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "handed back and taken over in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(resumed_at, Some(30));
    for i in 30..40 {
        assert_eq!(push(p, &id, &frame(i), i as f64 * 0.1).0, 200);
    }
    let (st, _) = http(p, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
    assert_eq!(st, 200);
    let finals: Vec<u64> = all_results(p, &id)
        .iter()
        .filter(|r| r["pending"] != true)
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finals, (0..40).collect::<Vec<u64>>());
}
