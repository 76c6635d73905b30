//! Loop closure (`--loop-closure`) against the online trajectory on synthetic sequences at
//! 320×240: ATE (% of the path) without and with, loops found, relocalisations after tracking
//! loss, map segments without loop closure and with it (after relocalisations and loops join
//! them), wall time of both runs (the loops thread shares the cores).
//!
//! Every loop is checked against the ground truth: it is false when the two frames' cameras are
//! more than [`TRUE_LOOP_METRES`] apart or look more than [`TRUE_LOOP_DEGREES`] apart.
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

use streamrecon::datasets::formats::tum;
use streamrecon::eval::pose::{associate, pose_metrics, MAX_TIME_DIFF};

const BIN: &str = env!("CARGO_BIN_EXE_streamrecon");

/// A loop joins two views of one place: cameras at most this far apart…
const TRUE_LOOP_METRES: f64 = 1.0;
/// …looking at most this far apart.
const TRUE_LOOP_DEGREES: f64 = 45.0;

/// Loops of run.json's `loop_closure.loops` (`[frame, frame, inliers]`) that the ground truth
/// says join different places.
fn false_loops(seq: &Path, run: &serde_json::Value) -> usize {
    let gt = tum::read_tum(&seq.join("poses.txt")).expect("ground truth");
    run["loop_closure"]["loops"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter(|l| {
            let (Some(a), Some(b)) = (l[0].as_u64(), l[1].as_u64()) else {
                return true;
            };
            let (a, b) = (
                &gt[a as usize].world_from_cam,
                &gt[b as usize].world_from_cam,
            );
            let apart = (a.translation.vector - b.translation.vector).norm();
            let turned = a.rotation.angle_to(&b.rotation).to_degrees();
            apart > TRUE_LOOP_METRES || turned > TRUE_LOOP_DEGREES
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cases: Vec<String> = args
        .iter()
        .find_map(|a| a.strip_prefix("--cases="))
        .unwrap_or(
            "loop2,loop4,revisit,smooth,repeated0,repeated1,repeated2,repeated3,\
             revisit-repeated0,revisit-repeated1,revisit-repeated2",
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
            false_loops(&seq, &r),
            lc["relocalisations"],
            r_off["map_segments"],
            lc["segments_after_loops"],
            wall_off,
            wall_on
        );
    }
}
