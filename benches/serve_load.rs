//! Load on `streamrecon serve` over loopback: N concurrent sessions, each pushing the same
//! synthetic sequence (PNG frames, 320×240 unless told) from its own client thread.
//!
//! Two passes: `live` (every client sends at `FPS` frames/s, latest-wins, drops counted) and
//! `lossless` (every client sends as fast as the server takes frames; nothing dropped). Per
//! pass: frames processed per second over all sessions, p50/p95 latency from a frame's upload
//! to its first result (a frame flowvo holds before its map gets a pending one at once) and to
//! its pose, drops (and how evenly the sessions shared them), where a frame's time went (mean
//! waits and work per stage), and the server's RSS before, during and after (sessions closed).
//!
//! `cargo bench --bench serve_load [-- SESSIONS [FRAMES [FPS]]] [WxH] [no-record] [live]
//! [loop-closure=on|off]`
//! (defaults 8, 300, 10, 320x240; `no-record` alternates each pass with one whose sessions write no rerun recording;
//! `live`: the live pass only; `loop-closure=`: the sessions' option, the service's default
//! otherwise). `STREAMRECON_BIN=PATH` runs another build of the server.

use std::time::{Duration, Instant};

#[path = "../tests/serve_common/mod.rs"]
mod serve_common;
use serve_common::{create, http, json, push, start, synth, TOKEN};
use streamrecon::stats::cpu_seconds_of;

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

/// Latencies of one session or pass, ms.
#[derive(Default)]
struct Latencies {
    /// Upload to first result, every frame.
    answer: Vec<f64>,
    /// Upload to the result with the pose, every frame.
    pose: Vec<f64>,
    /// The same of each session's frames from [`SETTLED_FROM`] on.
    pose_mapped: Vec<f64>,
    /// Summed per stage over the frames with a pose from [`SETTLED_FROM`] on: waits at the
    /// door, before flow, geometry and the sinks, held in an engine; work in flow, geometry,
    /// fusion.
    stages: [f64; 8],
}

impl Latencies {
    fn of(results: &[serde_json::Value]) -> Self {
        let mut l = Self::default();
        let mut answered = std::collections::HashSet::new();
        for r in results {
            let (Some(i), Some(ms)) = (r["index"].as_u64(), r["latency_ms"].as_f64()) else {
                continue;
            };
            if answered.insert(i) {
                l.answer.push(ms);
            }
            if r["pending"].as_bool() == Some(true) {
                continue;
            }
            l.pose.push(ms);
            if i >= SETTLED_FROM {
                l.pose_mapped.push(ms);
                let w = &r["waits_ms"];
                let parts = [
                    &w["door"],
                    &w["flow"],
                    &w["geometry"],
                    &w["sinks"],
                    &w["held"],
                    &r["flow_ms"],
                    &r["geometry_ms"],
                    &r["fusion_ms"],
                ];
                for (sum, v) in l.stages.iter_mut().zip(parts) {
                    *sum += v.as_f64().unwrap_or(0.0);
                }
            }
        }
        l
    }

    fn extend(&mut self, o: Self) {
        self.answer.extend(o.answer);
        self.pose.extend(o.pose);
        self.pose_mapped.extend(o.pose_mapped);
        for (a, b) in self.stages.iter_mut().zip(o.stages) {
            *a += b;
        }
    }
}

struct Pass {
    processed: u64,
    dropped: u64,
    /// Each session's share of its frames dropped.
    drop_shares: Vec<f64>,
    wall_s: f64,
    /// The server's CPU time over the pass.
    cpu_s: f64,
    latencies: Latencies,
    peak_rss: f64,
}

fn run_pass(
    port: u16,
    pid: u32,
    frames: &[Vec<u8>],
    sessions: usize,
    fps: Option<f64>,
    record: bool,
    loop_closure: Option<bool>,
) -> Pass {
    let t0 = Instant::now();
    let cpu0 = cpu_seconds_of(pid);
    let loops = loop_closure.map_or(String::new(), |on| format!(r#", "loop_closure": {on}"#));
    let body = format!(
        r#"{{"lossless": {}, "record": {record}, "result_points": 100{loops}}}"#,
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
    let summaries: Vec<(u64, u64, u64, Latencies)> = std::thread::scope(|s| {
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
                    let lat = Latencies::of(results);
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
                        n(&summary, "frames_received"),
                        lat,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall_s = t0.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds_of(pid) - cpu0;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_rss = *peak.lock().unwrap();
    let mut pass = Pass {
        processed: summaries.iter().map(|s| s.0).sum(),
        dropped: summaries.iter().map(|s| s.1).sum(),
        drop_shares: summaries
            .iter()
            .map(|s| s.1 as f64 / s.2.max(1) as f64)
            .collect(),
        wall_s,
        cpu_s,
        latencies: Latencies::default(),
        peak_rss,
    };
    for (_, _, _, l) in summaries {
        pass.latencies.extend(l);
    }
    pass
}

fn main() {
    let nums: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    // `WxH`: the frames' size (default 320x240).
    let size = std::env::args()
        .skip(1)
        .find(|a| {
            a.split_once('x')
                .is_some_and(|(w, h)| w.parse::<u32>().is_ok() && h.parse::<u32>().is_ok())
        })
        .unwrap_or_else(|| "320x240".into());
    let sessions = nums.first().map_or(8, |&v| v as usize);
    let frames = nums.get(1).map_or(300, |&v| v as usize);
    let fps = nums.get(2).copied().unwrap_or(10.0);
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    let n = frames.to_string();
    synth(
        &seq,
        &["--trajectory", "handheld", "--frames", &n, "--size", &size],
    );
    let pngs: Vec<Vec<u8>> = (0..frames)
        .map(|i| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap())
        .collect();
    let srv = start(&dir.path().join("data"), sessions, &[]);
    let p = srv.port;
    let idle = rss(p);
    println!("server idle RSS {idle:.1} MiB; {sessions} sessions x {frames} frames of {size}");
    let mut after = Vec::new();
    // `-- … no-record` adds passes whose sessions write no rerun recording, alternated with the
    // recording ones.
    // `-- … loop-closure=on|off`: the sessions' option (the service's default otherwise).
    let loop_closure =
        std::env::args().find_map(|a| a.strip_prefix("loop-closure=").map(|v| v == "on"));
    let records: &[bool] = if std::env::args().any(|a| a == "no-record") {
        &[true, false]
    } else {
        &[true]
    };
    // `-- … live`: the live pass only.
    let passes: &[(&str, Option<f64>)] = if std::env::args().any(|a| a == "live") {
        &[("live", Some(fps))]
    } else {
        &[("live", Some(fps)), ("lossless", None), ("lossless", None)]
    };
    for ((name, rate), record) in passes
        .iter()
        .flat_map(|p| records.iter().map(move |r| (*p, *r)))
    {
        let name = if record {
            name.to_string()
        } else {
            format!("{name}, no recording")
        };
        let mut pass = run_pass(
            p,
            srv.child.id(),
            &pngs,
            sessions,
            rate,
            record,
            loop_closure,
        );
        std::thread::sleep(Duration::from_millis(500));
        let closed = rss(p);
        after.push(closed);
        let offered = (sessions * frames) as u64;
        let l = &mut pass.latencies;
        let n_mapped = l.pose_mapped.len().max(1) as f64;
        let stages: Vec<String> = [
            "door", "flow", "geometry", "sinks", "held", "flow", "geometry", "fusion",
        ]
        .iter()
        .zip(l.stages)
        .enumerate()
        .map(|(i, (name, sum))| {
            format!(
                "{}{name} {:.1}",
                if i < 5 { "wait " } else { "" },
                sum / n_mapped
            )
        })
        .collect();
        let shares = &pass.drop_shares;
        println!(
            "{name:8}{}: {} of {offered} frames processed in {:.1} s = {:.1} frames/s over all sessions, {:.1} CPU-ms a frame, dropped {} (per session {:.1}-{:.1} %); latency to the first result p50 {:.0} ms p95 {:.0} ms, to the pose p50 {:.0} ms p95 {:.0} ms (from frame {SETTLED_FROM} on: p50 {:.0} ms p95 {:.0} ms; mean ms: {}); RSS peak {:.1} MiB, after closing {closed:.1} MiB",
            rate.map(|f| format!(" ({f} fps/client)")).unwrap_or_default(),
            pass.processed,
            pass.wall_s,
            pass.processed as f64 / pass.wall_s,
            1e3 * pass.cpu_s / pass.processed.max(1) as f64,
            pass.dropped,
            100.0 * shares.iter().copied().fold(f64::INFINITY, f64::min),
            100.0 * shares.iter().copied().fold(0.0, f64::max),
            percentile(&mut l.answer, 0.5),
            percentile(&mut l.answer, 0.95),
            percentile(&mut l.pose, 0.5),
            percentile(&mut l.pose, 0.95),
            percentile(&mut l.pose_mapped, 0.5),
            percentile(&mut l.pose_mapped, 0.95),
            stages.join(", "),
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
