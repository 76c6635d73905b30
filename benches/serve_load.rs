//! Load on `streamrecon serve` over loopback: N concurrent sessions, each pushing the same
//! synthetic 320×240 sequence (PNG frames) from its own client thread.
//!
//! Two passes: `live` (every client sends at `FPS` frames/s, latest-wins, drops counted) and
//! `lossless` (every client sends as fast as the server takes frames; nothing dropped). Per
//! pass: frames processed per second over all sessions, p50/p95 frame-to-result latency (from
//! the results), drops, and the server's RSS before, during and after (sessions closed).
//!
//! `cargo bench --bench serve_load [-- SESSIONS [FRAMES [FPS]]] [no-record]` (defaults 8, 300,
//! 10; `no-record` alternates each pass with one whose sessions write no rerun recording).

use std::time::{Duration, Instant};

#[path = "../tests/serve_common/mod.rs"]
mod serve_common;
use serve_common::{create, http, json, push, start, synth, TOKEN};

/// The first frame of a session whose latency is the service's alone: flowvo holds the frames
/// before its map starts (about frame 20 of this sequence).
const SETTLED_FROM: u64 = 30;

fn rss(port: u16) -> f64 {
    let (_, m) = http(port, "GET", "/metrics", Some(TOKEN), b"");
    String::from_utf8_lossy(&m)
        .lines()
        .find_map(|l| l.strip_prefix("streamrecon_rss_mib "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

struct Pass {
    processed: u64,
    dropped: u64,
    wall_s: f64,
    latencies: Vec<f64>,
    /// Of each session's frames from [`SETTLED_FROM`] on.
    latencies_mapped: Vec<f64>,
    peak_rss: f64,
}

fn run_pass(
    port: u16,
    frames: &[Vec<u8>],
    sessions: usize,
    fps: Option<f64>,
    record: bool,
) -> Pass {
    let t0 = Instant::now();
    let body = format!(
        r#"{{"lossless": {}, "record": {record}, "result_points": 100}}"#,
        fps.is_none()
    );
    let body = body.as_str();
    let ids: Vec<String> = (0..sessions).map(|_| create(port, body)).collect();
    let peak = std::sync::Arc::new(std::sync::Mutex::new(0.0f64));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let r = rss(port);
                let mut p = peak.lock().unwrap();
                *p = p.max(r);
                drop(p);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let summaries: Vec<(u64, u64, Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                s.spawn(move || {
                    let start = Instant::now();
                    for (i, f) in frames.iter().enumerate() {
                        if let Some(fps) = fps {
                            let due = Duration::from_secs_f64(i as f64 / fps);
                            if let Some(wait) = due.checked_sub(start.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                        let (st, b) = push(port, id, f, i as f64 / fps.unwrap_or(30.0));
                        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
                    }
                    let (_, b) = http(port, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
                    let summary = json(&b)["summary"].clone();
                    let (_, r) = http(
                        port,
                        "GET",
                        &format!("/sessions/{id}/results?since=0"),
                        Some(TOKEN),
                        b"",
                    );
                    let results = json(&r);
                    let results = results.as_array().unwrap();
                    let lat: Vec<f64> = results
                        .iter()
                        .filter_map(|r| r["latency_ms"].as_f64())
                        .collect();
                    // flowvo holds a session's first frames until its map starts (about frame
                    // 20 of this sequence: up to 2 s at 10 frames/s); from frame 30 on the
                    // latencies show the service's own delay.
                    let lat_mapped: Vec<f64> = results
                        .iter()
                        .filter(|r| r["index"].as_u64().is_some_and(|i| i >= SETTLED_FROM))
                        .filter_map(|r| r["latency_ms"].as_f64())
                        .collect();
                    // One set of counts: the status's and run.json's agree, and add up.
                    let (_, st) = http(port, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"");
                    let st = json(&st);
                    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
                    for k in ["frames_received", "frames_processed", "frames_dropped"] {
                        assert_eq!(n(&st, k), n(&summary, k), "{k}: status vs run.json");
                    }
                    assert_eq!(
                        n(&summary, "frames_received"),
                        n(&summary, "frames_processed")
                            + n(&summary, "frames_dropped")
                            + n(&summary, "frames_skipped"),
                        "{summary}"
                    );
                    (
                        n(&summary, "frames_processed"),
                        n(&summary, "frames_dropped"),
                        lat,
                        lat_mapped,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall_s = t0.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_rss = *peak.lock().unwrap();
    let mut pass = Pass {
        processed: summaries.iter().map(|s| s.0).sum(),
        dropped: summaries.iter().map(|s| s.1).sum(),
        wall_s,
        latencies: Vec::new(),
        latencies_mapped: Vec::new(),
        peak_rss,
    };
    for (_, _, all, settled) in summaries {
        pass.latencies.extend(all);
        pass.latencies_mapped.extend(settled);
    }
    pass
}

fn main() {
    let nums: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sessions = nums.first().map_or(8, |&v| v as usize);
    let frames = nums.get(1).map_or(300, |&v| v as usize);
    let fps = nums.get(2).copied().unwrap_or(10.0);
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    let n = frames.to_string();
    synth(
        &seq,
        &[
            "--trajectory",
            "handheld",
            "--frames",
            &n,
            "--size",
            "320x240",
        ],
    );
    let pngs: Vec<Vec<u8>> = (0..frames)
        .map(|i| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap())
        .collect();
    let srv = start(&dir.path().join("data"), sessions, &[]);
    let p = srv.port;
    let idle = rss(p);
    println!("server idle RSS {idle:.1} MiB; {sessions} sessions x {frames} frames of 320x240");
    let mut after = Vec::new();
    // `-- … no-record` adds passes whose sessions write no rerun recording, alternated with the
    // recording ones.
    let records: &[bool] = if std::env::args().any(|a| a == "no-record") {
        &[true, false]
    } else {
        &[true]
    };
    let passes = [("live", Some(fps)), ("lossless", None), ("lossless", None)];
    for ((name, rate), record) in passes
        .iter()
        .flat_map(|p| records.iter().map(move |r| (*p, *r)))
    {
        let name = if record {
            name.to_string()
        } else {
            format!("{name}, no recording")
        };
        let mut pass = run_pass(p, &pngs, sessions, rate, record);
        std::thread::sleep(Duration::from_millis(500));
        let closed = rss(p);
        after.push(closed);
        let offered = (sessions * frames) as u64;
        println!(
            "{name:8}{}: {} of {offered} frames processed in {:.1} s = {:.1} frames/s over all sessions, dropped {}, latency p50 {:.0} ms p95 {:.0} ms (from frame {SETTLED_FROM} on: p50 {:.0} ms p95 {:.0} ms), RSS peak {:.1} MiB, after closing {closed:.1} MiB",
            rate.map(|f| format!(" ({f} fps/client)")).unwrap_or_default(),
            pass.processed,
            pass.wall_s,
            pass.processed as f64 / pass.wall_s,
            pass.dropped,
            percentile(&mut pass.latencies, 0.5),
            percentile(&mut pass.latencies, 0.95),
            percentile(&mut pass.latencies_mapped, 0.5),
            percentile(&mut pass.latencies_mapped, 0.95),
            pass.peak_rss,
        );
    }
    println!(
        "RSS after closing each pass: {} MiB (last / first {:.3})",
        after
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        after[after.len() - 1] / after[0]
    );
}
