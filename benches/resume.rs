//! Killed and resumed runs against the uninterrupted one: `streamrecon run --snapshot-every N`
//! on a synthetic hand-held sequence, SIGKILLed after K frames have reached the outputs, then
//! `--resume` into the same folder (and, once, into a fresh one). Per kill point: the frame the
//! snapshot continued at, the trajectory's rows and map segments, and the ATE against the
//! uninterrupted run's.
//!
//! `cargo bench --bench resume [-- FRAMES [SNAPSHOT_EVERY [WIDTHxHEIGHT]]]` (defaults 300, 10,
//! 640x480).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use streamrecon::datasets::formats::tum;
use streamrecon::eval::pose::{associate, pose_metrics, MAX_TIME_DIFF};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_streamrecon"))
}

fn ate(gt: &Path, out: &Path) -> f64 {
    let gt = tum::read_tum(gt).expect("ground truth");
    let est = tum::read_tum(&out.join("trajectory.txt")).expect("trajectory");
    let (g, e) = associate(&gt, &est, MAX_TIME_DIFF).expect("poses match by time");
    pose_metrics(&g, &e, 1).expect("metrics").ate_rmse
}

fn run_json(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("run.json")).expect("run.json"))
        .expect("run.json parses")
}

fn rows(out: &Path) -> usize {
    tum::read_tum(&out.join("trajectory.txt")).map_or(0, |t| t.len())
}

fn run(seq: &Path, out: &Path, every: &str, extra: &[&str]) {
    let o = bin()
        .args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--snapshot-every", every])
        .args(extra)
        .output()
        .expect("streamrecon runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Starts a run and SIGKILLs it once `frames` depth maps are written.
fn killed_run(seq: &Path, out: &Path, every: &str, frames: usize) {
    let mut child = bin()
        .args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--snapshot-every", every])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("streamrecon starts");
    let t0 = Instant::now();
    while std::fs::read_dir(out.join("depth")).map_or(0, Iterator::count) < frames {
        assert!(t0.elapsed() < Duration::from_mins(5), "no progress");
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let frames: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300);
    let every = args.get(1).cloned().unwrap_or_else(|| "10".into());
    let size = args.get(2).cloned().unwrap_or_else(|| "640x480".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let seq = dir.path().join("seq");
    let o = bin()
        .args(["synth", "--trajectory", "handheld", "--frames"])
        .arg(frames.to_string())
        .args(["--size", &size, "--no-flow", "--out"])
        .arg(&seq)
        .output()
        .expect("synth");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gt = seq.join("poses.txt");
    let full = dir.path().join("full");
    run(&seq, &full, &every, &[]);
    let base = ate(&gt, &full);
    println!(
        "{frames} frames {size}, hand-held, snapshots every {every}: uninterrupted ATE {base:.4}, {} segment(s)",
        run_json(&full)["map_segments"]
    );
    println!("| killed after | resumed at | rows | segments | ATE | vs uninterrupted |");
    println!("|---|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    let points: Vec<usize> = (1..=10).map(|i| i * frames / 11).collect();
    for (i, &k) in points.iter().enumerate() {
        let out: PathBuf = dir.path().join(format!("killed-{k}"));
        killed_run(&seq, &out, &every, k);
        let snapshot = out.join("snapshot.safetensors");
        let Some(next) = streamrecon::geometry::snapshot_next_frame(&snapshot) else {
            println!("| {k} | no snapshot yet | | | | |");
            continue;
        };
        // The last kill point resumes into a fresh folder: the poses before the snapshot come
        // from the killed run's checkpoint.
        let target = if i + 1 == points.len() {
            dir.path().join("fresh")
        } else {
            out.clone()
        };
        run(
            &seq,
            &target,
            &every,
            &["--resume", snapshot.to_str().unwrap()],
        );
        let a = ate(&gt, &target);
        worst = worst.max(a / base);
        println!(
            "| {k}{} | {next} | {} | {} | {a:.4} | {:.2}× |",
            if target == out { "" } else { " (fresh --out)" },
            rows(&target),
            run_json(&target)["map_segments"],
            a / base
        );
    }
    println!("worst resumed ATE: {worst:.2}× the uninterrupted run's");
}
