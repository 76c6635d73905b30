//! Loop closure (`--loop-closure`) against the online trajectory on synthetic sequences at
//! 320×240: ATE (% of the path) without and with, loops found, map segments before and after
//! the loops join them, wall time of both runs (the loops thread shares the cores).
//!
//! `cargo bench --bench loop_closure [-- --cases=loop2,loop4,revisit,smooth]`:
//! `loop2` two laps (seed 0), `loop4` four laps (1,200 frames, seed 2), `revisit` the kidnapped
//! camera (900 frames), `smooth` 600 frames that never return (no loop may be found there).
//! Each sequence is rendered with `streamrecon synth` and run with `streamrecon run`.

use std::path::Path;
use std::process::Command;

use streamrecon::datasets::formats::tum;
use streamrecon::eval::pose::{associate, pose_metrics, MAX_TIME_DIFF};

const BIN: &str = env!("CARGO_BIN_EXE_streamrecon");

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
    if loops {
        c.arg("--loop-closure");
    }
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
        .unwrap_or("loop2,loop4,revisit,smooth")
        .split(',')
        .map(String::from)
        .collect();
    let dir = tempfile::tempdir().expect("temporary folder");
    println!(
        "{:<8} {:>6} {:>10} {:>10} {:>6} {:>9} {:>8} {:>8}",
        "case", "frames", "ATE off %", "ATE on %", "loops", "segments", "wall off", "wall on"
    );
    for case in &cases {
        let (trajectory, frames, seed) = match case.as_str() {
            "loop2" => ("loop", 600, 0),
            "loop4" => ("loop", 1200, 2),
            "revisit" => ("revisit", 900, 0),
            "smooth" => ("smooth", 600, 0),
            other => panic!("unknown case {other}"),
        };
        let seq = dir.path().join(case);
        let ok = Command::new(BIN)
            .args([
                "synth",
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
        let (wall_off, _) = run(&seq, &off, false);
        let (wall_on, r) = run(&seq, &on, true);
        let lc = &r["loop_closure"];
        println!(
            "{:<8} {:>6} {:>10.3} {:>10.3} {:>6} {:>4} -> {:<2} {:>7.1}s {:>7.1}s",
            case,
            frames,
            ate_percent(&seq, &off.join("trajectory.txt")),
            ate_percent(&seq, &on.join("trajectory.txt")),
            lc["loop_closures"],
            r["map_segments"],
            lc["segments_after_loops"],
            wall_off,
            wall_on
        );
    }
}
