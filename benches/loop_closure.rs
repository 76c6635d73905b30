//! Loop closure (`--loop-closure`) against the online trajectory on synthetic sequences at
//! 320×240: ATE (% of the path) without and with, loops found, relocalisations after tracking
//! loss, map segments without loop closure and with it (after relocalisations and loops join
//! them), wall time of both runs (the loops thread shares the cores).
//!
//! Every loop is checked against the ground truth: it is false when its measured relative pose
//! puts the newer camera elsewhere or turned otherwise than the ground truth does
//! ([`false_loops`]).
//!
//! `cargo bench --bench loop_closure [-- --cases=loop2,loop4,revisit,smooth,repeated0,…]`:
//! `loop2` two laps (seed 0), `loop4` four laps (1,200 frames, seed 2), `revisit` the kidnapped
//! camera (900 frames), `smooth` 600 frames that never return (no loop may be found there),
//! `repeatedN` two laps of the `repeated` scene (one texture repeating every 2 m, identical
//! objects) with seed N (default cases: seeds 0–3), `revisit-repeatedN` the kidnapped camera in
//! that scene (900 frames, seed N: relocalisation among look-alike places). Each sequence is
//! rendered with `streamrecon synth` and run with `streamrecon run`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use streamrecon::datasets::synth::{SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::geometry::loop_closure::LoopClosureConfig;
use streamrecon::pipeline::sinks::{FrameOutput, RunEnd, Sink};
use streamrecon::pipeline::PipelineConfig;
use streamrecon::source::{PushedFrame, Source, SourceOptions};
use streamrecon::stats::rss_mib;

use streamrecon::datasets::formats::tum;
use streamrecon::eval::pose::{associate, pose_metrics, MAX_TIME_DIFF};

const BIN: &str = env!("CARGO_BIN_EXE_streamrecon");

// The binary's allocator, so the soak's RSS is what `streamrecon run` would show.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A loop is false when its measured relative pose disagrees with the ground truth's: the turn
/// between the two cameras off by more than this…
const FALSE_DEGREES: f64 = 10.0;
/// …or the newer camera's place in the older camera off by more than this many metres plus
/// [`FALSE_FRACTION`] of their true distance.
const FALSE_METRES: f64 = 0.25;
const FALSE_FRACTION: f64 = 0.25;
/// The map's units become metres by the online path over this many frames each side of the
/// older frame against the ground truth's.
const LOCAL_FRAMES: usize = 10;

/// Loops of run.json's `loop_closure.loops` (`[older, newer, inliers, [tx, ty, tz, qx, qy, qz,
/// qw, scale]]`: the newer camera in the older one's, in the map's units) that the ground truth
/// says are wrong: repeated structure passes PnP at the wrong copy, which puts the newer camera
/// where it is not. Cameras metres apart that see one surface make a true loop; the online
/// trajectory (`trajectory_online.txt` in `out`) gives the map's scale there.
fn false_loops(seq: &Path, out: &Path, run: &serde_json::Value) -> usize {
    let loops = run["loop_closure"]["loops"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if loops.is_empty() {
        return 0;
    }
    let gt = tum::read_tum(&seq.join("poses.txt")).expect("ground truth");
    let online: std::collections::HashMap<i64, nalgebra::Vector3<f64>> =
        tum::read_tum(&out.join("trajectory_online.txt"))
            .expect("online trajectory")
            .into_iter()
            .map(|p| {
                (
                    (p.timestamp * 1e3).round() as i64,
                    p.world_from_cam.translation.vector,
                )
            })
            .collect();
    let online_at = |f: usize| {
        let key = (gt.get(f)?.timestamp * 1e3).round() as i64;
        online.get(&key)
    };
    // Metres per map unit around frame f.
    let scale_at = |f: usize| {
        let (mut metres, mut units) = (0.0, 0.0);
        for g in f.saturating_sub(LOCAL_FRAMES)..(f + LOCAL_FRAMES).min(gt.len() - 1) {
            if let (Some(a), Some(b)) = (online_at(g), online_at(g + 1)) {
                units += (b - a).norm();
                metres += (gt[g + 1].world_from_cam.translation.vector
                    - gt[g].world_from_cam.translation.vector)
                    .norm();
            }
        }
        metres / units
    };
    loops
        .iter()
        .filter(|l| {
            let (Some(a), Some(b), Some(m)) = (l[0].as_u64(), l[1].as_u64(), l[3].as_array())
            else {
                return true;
            };
            let m: Vec<f64> = m.iter().filter_map(serde_json::Value::as_f64).collect();
            if m.len() != 8 {
                return true;
            }
            let (a, b) = (a as usize, b as usize);
            let true_pose = gt[a].world_from_cam.inverse() * gt[b].world_from_cam;
            let turn = nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(
                m[6], m[3], m[4], m[5],
            ));
            let place = nalgebra::Vector3::new(m[0], m[1], m[2]) * scale_at(a);
            let turn_off = turn.angle_to(&true_pose.rotation).to_degrees();
            let place_off = (place - true_pose.translation.vector).norm();
            let apart = true_pose.translation.vector.norm();
            turn_off > FALSE_DEGREES || place_off > FALSE_METRES + FALSE_FRACTION * apart
        })
        .count()
}

fn ate_percent(seq: &Path, trajectory: &Path) -> f64 {
    let gt = tum::read_tum(&seq.join("poses.txt")).expect("ground truth");
    let est = tum::read_tum(trajectory).expect("trajectory");
    let (g, e) = associate(&gt, &est, MAX_TIME_DIFF).expect("matched poses");
    let m = pose_metrics(&g, &e, 1).expect("metrics");
    100.0 * m.ate_rmse_over_length
}

fn run(seq: &Path, out: &Path, loops: bool) -> (f64, serde_json::Value) {
    let mut c = Command::new(BIN);
    c.arg("run").arg(seq).arg("--out").arg(out);
    c.args(["--loop-closure", if loops { "on" } else { "off" }]);
    let t0 = std::time::Instant::now();
    let o = c.output().expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wall = t0.elapsed().as_secs_f64();
    let run = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap())
        .expect("run.json");
    (wall, run)
}

/// RSS when each of the frames in `at` reaches the sinks.
struct RssAt {
    at: Vec<u64>,
    seen: u64,
    rss: Arc<Mutex<Vec<(u64, f64)>>>,
}

impl Sink for RssAt {
    fn name(&self) -> &'static str {
        "rss"
    }

    fn frame(&mut self, _out: &FrameOutput<'_>) -> streamrecon::Result<()> {
        self.seen += 1;
        if self.at.contains(&self.seen) {
            if let Ok(mut v) = self.rss.lock() {
                v.push((self.seen, rss_mib()));
            }
        }
        Ok(())
    }

    fn finish(&mut self, _end: &RunEnd<'_>) -> streamrecon::Result<()> {
        Ok(())
    }
}

/// The soak without and with loop closure, or only as `only` says.
fn soak(frames: usize, only: Option<bool>) {
    for loops in [false, true]
        .into_iter()
        .filter(|l| only.is_none_or(|o| o == *l))
    {
        let world = SynthWorld::new(SynthConfig {
            scene: SceneKind::Room,
            trajectory: TrajectoryKind::Loop,
            frames,
            width: 320,
            height: 240,
            seed: 4,
            ..SynthConfig::default()
        });
        let (tx, rx) = crossbeam_channel::bounded(4);
        let feeder = std::thread::spawn(move || {
            for (frame, _) in world.input_frames() {
                let f = PushedFrame {
                    image: frame.image,
                    arrived: Instant::now(),
                    timestamp: Some(frame.timestamp),
                    intrinsics: frame.intrinsics,
                };
                if tx.send(f).is_err() {
                    return;
                }
            }
        });
        let source = Source::pushed("soak", rx, SourceOptions::default()).lossless();
        let config = PipelineConfig {
            loop_closure: loops.then(LoopClosureConfig::default),
            ..PipelineConfig::default()
        };
        let rss = Arc::new(Mutex::new(Vec::new()));
        let tenth = (frames / 10).max(1) as u64;
        let mut at: Vec<u64> = (1..=10).map(|i| i * tenth).collect();
        at.push(1000);
        let sink = RssAt {
            at,
            seen: 0,
            rss: rss.clone(),
        };
        let t = Instant::now();
        let flow = config.flow.engine().expect("flow engine");
        let geometry = config.geometry.engine(None).expect("geometry engine");
        let out = streamrecon::pipeline::run_with(
            source,
            &config,
            flow,
            geometry,
            vec![Box::new(sink)],
            &Arc::new(AtomicBool::new(false)),
        )
        .expect("run");
        feeder.join().expect("feeder");
        let wall = t.elapsed().as_secs_f64();
        let mut rss = rss.lock().expect("rss").clone();
        rss.sort_by_key(|r| r.0);
        let at_1000 = rss.iter().find(|r| r.0 == 1000).map_or(f64::NAN, |r| r.1);
        let after = rss
            .iter()
            .filter(|r| r.0 >= 1000)
            .map(|r| r.1)
            .fold(0.0, f64::max);
        let stage = |name: &str| out.summary.stages.get(name).map_or(f64::NAN, |s| s.p95_ms);
        let lc = out.summary.loop_closure.as_ref();
        println!(
            "soak, {frames} frames, loop closure {}: {wall:.0} s; RSS {at_1000:.1} MiB at frame 1000, at most {after:.1} MiB after ({:+.2} %); p95 ms: flow {:.1}, geometry {:.1}, fusion {:.1}, sinks {:.1}; {} loops, {} keyframes ({} skipped), map segments {}",
            if loops { "on" } else { "off" },
            100.0 * (after - at_1000) / at_1000,
            stage("flow"),
            stage("geometry"),
            stage("fusion"),
            stage("sinks"),
            lc.map_or(0, |l| l.loop_closures),
            lc.map_or(0, |l| l.keyframes),
            lc.map_or(0, |l| l.keyframes_skipped),
            out.summary.map_segments,
        );
        println!(
            "  RSS MiB by frame: {}",
            rss.iter()
                .map(|(f, m)| format!("{f}: {m:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(a) = args.iter().find(|a| a.starts_with("--soak")) {
        let (frames, only) = match a.strip_prefix("--soak=") {
            Some(v) => {
                let mut parts = v.split(',');
                let frames = parts
                    .next()
                    .map_or(10_000, |n| n.parse().expect("--soak=FRAMES[,on|off]"));
                (frames, parts.next().map(|w| w == "on"))
            }
            None => (10_000, None),
        };
        soak(frames, only);
        return;
    }
    let cases: Vec<String> = args
        .iter()
        .find_map(|a| a.strip_prefix("--cases="))
        .unwrap_or(
            "loop2,loop4,revisit,smooth,repeated0,repeated1,repeated2,repeated3,\
             revisit-repeated0,revisit-repeated1,revisit-repeated2,revisit-repeated3",
        )
        .split(',')
        .map(String::from)
        .collect();
    let dir = tempfile::tempdir().expect("temporary folder");
    println!(
        "{:<10} {:>6} {:>10} {:>10} {:>6} {:>6} {:>6} {:>9} {:>8} {:>8}",
        "case",
        "frames",
        "ATE off %",
        "ATE on %",
        "loops",
        "false",
        "reloc",
        "segments",
        "wall off",
        "wall on"
    );
    for case in &cases {
        let (scene, trajectory, frames, seed) = match case.as_str() {
            "loop2" => ("room", "loop", 600, 0),
            "loop4" => ("room", "loop", 1200, 2),
            "revisit" => ("room", "revisit", 900, 0),
            "smooth" => ("room", "smooth", 600, 0),
            other => match (
                other.strip_prefix("repeated").map(str::parse),
                other.strip_prefix("revisit-repeated").map(str::parse),
            ) {
                (Some(Ok(seed)), _) => ("repeated", "loop", 600, seed),
                (_, Some(Ok(seed))) => ("repeated", "revisit", 900, seed),
                _ => panic!("unknown case {other}"),
            },
        };
        let seq = dir.path().join(case);
        let ok = Command::new(BIN)
            .args([
                "synth",
                "--scene",
                scene,
                "--trajectory",
                trajectory,
                "--size",
                "320x240",
                "--no-flow",
            ])
            .args(["--frames", &frames.to_string(), "--seed", &seed.to_string()])
            .arg("--out")
            .arg(&seq)
            .output()
            .expect("synth")
            .status
            .success();
        assert!(ok, "synth {case}");
        let (off, on) = (seq.join("off"), seq.join("on"));
        let (wall_off, r_off) = run(&seq, &off, false);
        let (wall_on, r) = run(&seq, &on, true);
        let lc = &r["loop_closure"];
        println!(
            "{:<10} {:>6} {:>10.3} {:>10.3} {:>6} {:>6} {:>6} {:>4} -> {:<2} {:>7.1}s {:>7.1}s",
            case,
            frames,
            ate_percent(&seq, &off.join("trajectory.txt")),
            ate_percent(&seq, &on.join("trajectory.txt")),
            lc["loop_closures"],
            false_loops(&seq, &on, &r),
            lc["relocalisations"],
            r_off["map_segments"],
            lc["segments_after_loops"],
            wall_off,
            wall_on
        );
    }
}
