//! `serve --nats` (a front door, `nats-server -js` and one worker, all on this machine) against
//! the embedded `serve`, same sessions, alternated in one run:
//! - throughput: lossless sessions, every client pushing as fast as the service takes frames,
//!   frames/s from the first upload to the last close;
//! - latency a client sees: sessions sending at 10 frames/s, each polling its results
//!   (`?after_seq=`), from a frame's upload to its pose first seen, p50/p95 (frames from 30 on:
//!   flowvo holds the first ones until its map starts);
//! - placement (NATS only): three workers, six sessions at 10 frames/s: sessions per worker and
//!   the latency clients see;
//! - failover (NATS only): two workers, the one holding a live session killed (SIGKILL), time
//!   until the client sees a pose made by the other; lease time 2 s.
//!
//! Both sides snapshot every SNAPSHOT_EVERY frames in the throughput and latency rounds (the
//! product's default, 100); the failover run every 15, so the other worker has one to resume at.
//!
//! `cargo bench --bench nats_load [-- SESSIONS [FRAMES [SNAPSHOT_EVERY]]]` (defaults 2, 600,
//! 100; 320×240 PNG; the lossless sessions send all FRAMES, so the time to start and close a
//! session weighs as little as in a long stream; the others the first 150). The sessions write
//! no rerun recording unless `NATS_LOAD_RECORD=1`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../tests/serve_common/mod.rs"]
mod serve_common;
use serve_common::{
    create, http, json, nats_door, nats_server, nats_worker, push, start, synth, Proc, Server,
    TOKEN,
};
use streamrecon::stats::cpu_seconds_of;

const SETTLED_FROM: u64 = 30;
/// Frames a session at `FPS` sends.
const LIVE_FRAMES: usize = 150;
const FPS: f64 = 10.0;

/// A service to load: the embedded server, or a front door with its broker and workers.
struct Service {
    /// (name, pid) of every process of the service, for their CPU time.
    pids: Vec<(&'static str, u32)>,
    door: Server,
    workers: Vec<Option<Proc>>,
    _broker: Option<Proc>,
    name: &'static str,
}

fn embedded(dir: &std::path::Path, sessions: usize, snapshot_every: u64) -> Service {
    std::fs::create_dir_all(dir).unwrap();
    let every = snapshot_every.to_string();
    let door = start(
        &dir.join("embedded"),
        sessions,
        &["--snapshot-every".as_ref(), every.as_ref()],
    );
    Service {
        pids: vec![("server", door.child.id())],
        door,
        workers: Vec::new(),
        _broker: None,
        name: "embedded",
    }
}

fn brokered(
    dir: &std::path::Path,
    sessions: usize,
    workers: usize,
    tag: &str,
    snapshot_every: u64,
) -> Service {
    let (broker, url) = nats_server(&dir.join(format!("js-{tag}"))).expect("nats-server");
    let workers: Vec<Option<Proc>> = (0..workers)
        .map(|w| {
            let data = dir.join(format!("worker-{tag}-{w}"));
            Some(nats_worker(
                &url,
                &data,
                &format!("w{w}"),
                sessions,
                2.0,
                snapshot_every,
            ))
        })
        .collect();
    let door = nats_door(&dir.join(format!("door-{tag}")), &url, &[]);
    let mut pids = vec![("broker", broker.0.id()), ("door", door.child.id())];
    pids.extend(workers.iter().flatten().map(|w| ("worker", w.0.id())));
    Service {
        pids,
        door,
        workers,
        _broker: Some(broker),
        name: "nats",
    }
}

/// The sessions' request: no recording, unless `NATS_LOAD_RECORD=1` (both sides then record
/// it, and the worker stores it with each snapshot).
fn session() -> &'static str {
    if std::env::var("NATS_LOAD_RECORD").is_ok_and(|v| v == "1") {
        r#"{"lossless": true, "result_points": 0}"#
    } else {
        r#"{"lossless": true, "result_points": 0, "record": false}"#
    }
}

/// Lossless sessions pushed as fast as they are taken, then closed: frames/s over all.
fn throughput(port: u16, frames: &Arc<Vec<Vec<u8>>>, sessions: usize) -> f64 {
    let ids: Vec<String> = (0..sessions).map(|_| create(port, session())).collect();
    let t0 = Instant::now();
    let clients: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let frames = frames.clone();
            std::thread::spawn(move || {
                for (i, f) in frames.iter().enumerate() {
                    let (st, b) = push(port, &id, f, i as f64 * 0.1);
                    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
                }
                let (st, _) = http(port, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
                assert_eq!(st, 200);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    (sessions * frames.len()) as f64 / t0.elapsed().as_secs_f64()
}

/// When each frame's pose was first seen by a client polling the session's results; the
/// worker that made the last one (NATS).
fn poll_poses(
    port: u16,
    id: &str,
    seen: &Mutex<HashMap<u64, Instant>>,
    until: usize,
) -> Option<String> {
    let mut worker = None;
    let mut after = None::<u64>;
    let t0 = Instant::now();
    while lock_len(seen) < until && t0.elapsed() < Duration::from_mins(5) {
        let q = after.map_or(String::new(), |a| format!("?after_seq={a}"));
        let (st, body) = http(
            port,
            "GET",
            &format!("/sessions/{id}/results{q}"),
            Some(TOKEN),
            b"",
        );
        if st != 200 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let page = json(&body).as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let now = Instant::now();
        for r in page {
            after = r["seq"].as_u64().or(after);
            worker = r["worker"].as_str().map(str::to_string).or(worker);
            if r["pending"] != true {
                if let Some(i) = r["index"].as_u64() {
                    seen.lock().unwrap().entry(i).or_insert(now);
                }
            }
        }
    }
    worker
}

fn lock_len(m: &Mutex<HashMap<u64, Instant>>) -> usize {
    m.lock().unwrap().len()
}

/// Sessions sending at `FPS`: upload-to-pose latencies (ms) of the settled frames, all sessions.
fn latency(port: u16, frames: &Arc<Vec<Vec<u8>>>, sessions: usize) -> Vec<f64> {
    latency_where(port, frames, sessions).0
}

/// [`latency`], and the worker each session ran on (NATS).
fn latency_where(
    port: u16,
    frames: &Arc<Vec<Vec<u8>>>,
    sessions: usize,
) -> (Vec<f64>, Vec<Option<String>>) {
    let ids: Vec<String> = (0..sessions).map(|_| create(port, session())).collect();
    let clients: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let frames = frames.clone();
            std::thread::spawn(move || {
                let seen = Arc::new(Mutex::new(HashMap::new()));
                let poller = {
                    let (id, seen, n) = (id.clone(), seen.clone(), frames.len());
                    std::thread::spawn(move || poll_poses(port, &id, &seen, n))
                };
                let t0 = Instant::now();
                let mut sent = Vec::new();
                for (i, f) in frames.iter().enumerate() {
                    let at = t0 + Duration::from_secs_f64(i as f64 / FPS);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    sent.push(Instant::now());
                    push(port, &id, f, i as f64 / FPS);
                }
                let worker = poller.join().unwrap();
                http(port, "DELETE", &format!("/sessions/{id}"), Some(TOKEN), b"");
                let seen = seen.lock().unwrap();
                let ms = (SETTLED_FROM as usize..frames.len())
                    .filter_map(|i| {
                        let s = seen.get(&(i as u64))?;
                        Some(s.duration_since(sent[i]).as_secs_f64() * 1e3)
                    })
                    .collect::<Vec<f64>>();
                (ms, worker)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut workers = Vec::new();
    for c in clients {
        let (ms, w) = c.join().unwrap();
        all.extend(ms);
        workers.push(w);
    }
    (all, workers)
}

/// Several workers on this machine and more live sessions than one should hold: where the
/// sessions went, what the clients saw, the service's CPU.
fn spread(dir: &std::path::Path, frames: &Arc<Vec<Vec<u8>>>, workers: usize, sessions: usize) {
    // The same sessions on the embedded server first, for comparison.
    let svc = embedded(&dir.join("spread-embedded"), sessions, 100);
    let before = cpu_seconds_of(svc.pids[0].1);
    let mut l = latency(svc.door.port, frames, sessions);
    println!(
        "embedded, {sessions} sessions at {FPS} frames/s: pose seen p50 {:.0} ms, p95 {:.0} ms \
         ({} of {} settled frames); {:.1} CPU-ms a frame",
        percentile(&mut l, 0.5),
        percentile(&mut l, 0.95),
        l.len(),
        sessions * (frames.len() - SETTLED_FROM as usize),
        (cpu_seconds_of(svc.pids[0].1) - before) * 1e3 / (sessions * frames.len()) as f64,
    );
    drop(svc);
    let svc = brokered(dir, sessions, workers, "spread", 100);
    let before: Vec<f64> = svc.pids.iter().map(|(_, p)| cpu_seconds_of(*p)).collect();
    let (mut l, placed) = latency_where(svc.door.port, frames, sessions);
    let cpu: f64 = svc
        .pids
        .iter()
        .zip(&before)
        .map(|((_, p), b)| cpu_seconds_of(*p) - b)
        .sum();
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for w in placed {
        *per_worker
            .entry(w.unwrap_or_else(|| "none".into()))
            .or_default() += 1;
    }
    let mut per_worker: Vec<(String, usize)> = per_worker.into_iter().collect();
    per_worker.sort();
    println!(
        "{workers} workers, {sessions} sessions at {FPS} frames/s: sessions per worker {per_worker:?}; \
         pose seen p50 {:.0} ms, p95 {:.0} ms ({} of {} settled frames); {:.1} CPU-ms a frame \
         (broker, door and workers)",
        percentile(&mut l, 0.5),
        percentile(&mut l, 0.95),
        l.len(),
        sessions * (frames.len() - SETTLED_FROM as usize),
        cpu * 1e3 / (sessions * frames.len()) as f64,
    );
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// One live session on two workers; the holder killed at frame 60: seconds from the kill until
/// the client sees a pose made by the other worker, and the frame it resumed at.
fn failover(dir: &std::path::Path, frames: &[Vec<u8>]) -> (f64, Option<u64>) {
    let mut svc = brokered(dir, 1, 2, "failover", 15);
    let p = svc.door.port;
    let id = create(p, session());
    let t0 = Instant::now();
    let mut killed_at = None;
    let mut killed = String::new();
    let mut after = None::<u64>;
    for (i, f) in frames.iter().enumerate() {
        let at = t0 + Duration::from_secs_f64(i as f64 / FPS);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        push(p, &id, f, i as f64 / FPS);
        if i == 60 {
            let s = json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1);
            killed = s["worker"].as_str().unwrap_or("w0").to_string();
            let w: usize = killed[1..].parse().unwrap_or(0);
            svc.workers[w].take();
            killed_at = Some(Instant::now());
        }
        if let Some(k) = killed_at {
            let q = after.map_or(String::new(), |a| format!("?after_seq={a}"));
            let (_, body) = http(
                p,
                "GET",
                &format!("/sessions/{id}/results{q}"),
                Some(TOKEN),
                b"",
            );
            for r in json(&body).as_array().cloned().unwrap_or_default() {
                after = r["seq"].as_u64().or(after);
                let other = r["worker"].as_str().is_some_and(|w| w != killed);
                if other && r["pending"] != true {
                    let s = json(&http(p, "GET", &format!("/sessions/{id}"), Some(TOKEN), b"").1);
                    return (k.elapsed().as_secs_f64(), s["resumed_at"].as_u64());
                }
            }
        }
    }
    (f64::NAN, None)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let sessions: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2);
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(600);
    let snapshot_every: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    let count = n.to_string();
    synth(
        &seq,
        &[
            "--trajectory",
            "smooth",
            "--frames",
            &count,
            "--size",
            "320x240",
            "--seed",
            "5",
        ],
    );
    let frames: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| std::fs::read(seq.join(format!("rgb/{i:06}.png"))).unwrap())
            .collect(),
    );
    // The sessions at 10 frames/s send the first LIVE_FRAMES (15 s).
    let live: Arc<Vec<Vec<u8>>> = Arc::new(frames.iter().take(LIVE_FRAMES).cloned().collect());
    println!(
        "{sessions} sessions × {n} frames (at {FPS} frames/s: {}), 320×240 PNG, snapshots every \
         {snapshot_every} frames; embedded and NATS alternated",
        live.len()
    );
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut lat: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..2 {
        let order: [bool; 2] = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for nats in order {
            let tag = format!("r{round}");
            let svc = if nats {
                brokered(dir.path(), sessions, 1, &tag, snapshot_every)
            } else {
                embedded(&dir.path().join(&tag), sessions, snapshot_every)
            };
            let cpu = |svc: &Service| -> Vec<f64> {
                svc.pids
                    .iter()
                    .map(|(_, pid)| cpu_seconds_of(*pid))
                    .collect()
            };
            let before = cpu(&svc);
            let fps = throughput(svc.door.port, &frames, sessions);
            let per_frame: Vec<String> = svc
                .pids
                .iter()
                .zip(cpu(&svc).iter().zip(&before))
                .map(|((name, _), (after, before))| {
                    let ms = (after - before) * 1e3 / (sessions * frames.len()) as f64;
                    format!("{name} {ms:.1}")
                })
                .collect();
            println!(
                "round {round} {:>8}: CPU-ms a frame: {}",
                svc.name,
                per_frame.join(", ")
            );
            let mut l = latency(svc.door.port, &live, sessions);
            println!(
                "round {round} {:>8}: lossless {fps:6.1} frames/s; at {FPS} frames/s a session: \
                 pose seen p50 {:.0} ms, p95 {:.0} ms ({} frames)",
                svc.name,
                percentile(&mut l, 0.5),
                percentile(&mut l, 0.95),
                l.len()
            );
            rates.entry(svc.name).or_default().push(fps);
            lat.entry(svc.name).or_default().extend(l);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (e, b) = (mean(&rates["embedded"]), mean(&rates["nats"]));
    let mut le = lat["embedded"].clone();
    let mut lb = lat["nats"].clone();
    println!(
        "throughput: NATS {b:.1} vs embedded {e:.1} frames/s ({:+.1} %); pose latency p50 \
         {:.0} vs {:.0} ms, p95 {:.0} vs {:.0} ms",
        (b / e - 1.0) * 100.0,
        percentile(&mut lb, 0.5),
        percentile(&mut le, 0.5),
        percentile(&mut lb, 0.95),
        percentile(&mut le, 0.95),
    );
    spread(dir.path(), &live, 3, 6);
    let (secs, resumed) = failover(dir.path(), &live);
    println!(
        "failover (lease 2 s): a pose from the other worker {secs:.2} s after the kill, resumed \
         at frame {resumed:?}"
    );
}
