//! The `streamrecon` binary end to end: outputs, interruption, bad input, the .rrd.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use streamrecon::datasets::formats::{ply, tum};
use streamrecon::datasets::synth::TrajectoryKind;

use common::{rerun_cli, rrd_print};

/// Checks a run's files; `frames` were processed. Returns run.json.
fn check_outputs(out: &Path, frames: usize) -> serde_json::Value {
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let tracked = run["frames_tracked"].as_u64().unwrap() as usize;
    let untracked = run["frames_untracked"].as_u64().unwrap() as usize;
    assert_eq!(tracked + untracked, frames, "{run}");
    let traj = tum::read_tum(&out.join("trajectory.txt")).expect("trajectory.txt parses");
    assert_eq!(
        traj.len(),
        tracked + run["frames_orientation_only"].as_u64().unwrap() as usize,
        "one pose per tracked frame"
    );
    let frames = traj.len();
    ply::read_ply(&out.join("points.ply")).expect("points.ply parses");
    for f in [
        "colmap/cameras.txt",
        "colmap/images.txt",
        "colmap/points3D.txt",
        "poses_kitti.txt",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let kitti = std::fs::read_to_string(out.join("poses_kitti.txt")).unwrap();
    assert_eq!(kitti.lines().count(), frames);
    let intr: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("intrinsics.json")).unwrap()).unwrap();
    assert!(
        intr["original"]["fx"].as_f64().unwrap() > 0.0
            && intr["model"]["width"].as_u64().unwrap() > 0
    );
    assert_eq!(
        run["frames_processed"].as_u64().unwrap() as usize,
        tracked + untracked
    );
    // The streaming rate leaves out start-up and the final cloud, so it is the higher one.
    let (fps, streaming) = (
        run["fps"].as_f64().unwrap(),
        run["streaming_fps"].as_f64().unwrap(),
    );
    assert!(fps > 0.0 && streaming >= fps, "{fps} vs {streaming}");
    // No temporary file is left behind.
    for e in walk(out) {
        assert!(
            !e.to_string_lossy().ends_with(".partial"),
            "left a partial file: {}",
            e.display()
        );
    }
    run
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn run_on_a_dataset_writes_every_output_and_a_readable_recording() {
    let dir = tempfile::tempdir().unwrap();
    let seq = common::synth_sequence(
        &dir.path().join("seq"),
        TrajectoryKind::Smooth,
        40,
        320,
        240,
        1,
    );
    let out = dir.path().join("out");
    let rrd = out.join("rec.rrd");
    let o = common::bin()
        .args([
            "run",
            seq.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--save",
            rrd.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = check_outputs(&out, 40);
    assert!(run["frames_tracked"].as_u64().unwrap() >= 30, "{run}");
    assert!(
        std::fs::read_dir(out.join("depth")).unwrap().count() > 10,
        "depth maps written"
    );
    let Some(rerun) = rerun_cli() else {
        println!("rerun CLI not installed: .rrd content not checked");
        return;
    };
    let text = rrd_print(&rerun, &rrd);
    for entity in [
        "/world/camera",
        "/world/camera/image",
        "/world/camera/image/rgb",
        "/world/camera/image/depth",
        "/world/camera/image/flow",
        "/world/points",
        "/world/trajectory",
        // The fused map (every 100 frames, and the final cleaned cloud with its normals).
        "/world/map",
        "/world/map/normals",
        "/plot/latency_ms",
        "/plot/memory_mb",
    ] {
        assert!(
            text.contains(entity),
            "entity {entity} missing from the recording"
        );
    }
    // The layout travels with the recording: a viewport, containers and views.
    for blueprint in [
        "/viewport@ViewportBlueprint:root_container",
        "@ContainerBlueprint:contents",
        "@ViewBlueprint:space_origin",
    ] {
        assert!(text.contains(blueprint), "{blueprint} missing: no layout");
    }
    // Frame and flow images go in as JPEG, not raw (1.8 MB a frame raw).
    for column in [
        "/world/camera/image/rgb@EncodedImage:blob",
        "/world/camera/image/flow@EncodedImage:blob",
    ] {
        assert!(text.contains(column), "{column} missing from the recording");
    }
}

#[test]
fn sigint_mid_stream_drains_and_leaves_complete_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let seq = common::synth_sequence(
        &dir.path().join("seq"),
        TrajectoryKind::Smooth,
        300,
        160,
        120,
        4,
    );
    let out = dir.path().join("out");
    let child = common::bin()
        .args([
            "run",
            seq.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--save",
            out.join("rec.rrd").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_depth_files(&out, 20, Duration::from_millis(20));
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let n = run["frames_processed"].as_u64().unwrap() as usize;
    assert!(n < 300, "stopped early ({n} frames)");
    assert_eq!(run["interrupted"], true);
    check_outputs(&out, n);
}

#[test]
fn a_killed_run_resumes_from_its_snapshot_without_losing_a_frame() {
    // Snapshots at every frame with the smoother on, which always holds the newest pose back:
    // killed at any moment, the snapshot in force must not be ahead of the poses on disk.
    let frames = 150;
    let (_dir, seq, out) = resumable_sequence(frames);
    let snapshot = out.join("snapshot.safetensors");
    let run = |extra: &[&str]| {
        let mut c = snapshot_run(&seq, &out, 1);
        c.args(["--stabilize", "on"]).args(extra);
        c
    };
    let mut child = run(&[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_depth_files(&out, 30, Duration::from_millis(10));
    child.kill().unwrap();
    child.wait().unwrap();
    let next = streamrecon::geometry::snapshot_next_frame(&snapshot).expect("a snapshot in force");
    assert!(
        (next as usize) < frames,
        "killed mid-stream: {next} of {frames}"
    );
    let o = run(&["--resume", snapshot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        frame_numbers(&out),
        (0..frames as i64).collect::<Vec<_>>(),
        "every frame's pose once, in order (resumed at {next})"
    );
    // The smoother hands the snapshot's last frame through: the map continues.
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["map_segments"], 1, "{run_json}");
}

#[test]
fn a_run_that_ended_resumes_from_its_last_snapshot_without_a_gap() {
    // The run ends at frame 20 between two snapshot times (every 8): its final snapshot and
    // checkpoint must both reach frame 20 (the checkpoint used to stop at the last multiple of 8).
    let (_dir, seq, out) = resumable_sequence(40);
    let run = |out: &Path, every: u32, extra: &[&str]| {
        let o = snapshot_run(&seq, out, every).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let snapshot = out.join("snapshot.safetensors");
    run(&out, 8, &["--max-frames", "20"]);
    assert_eq!(
        streamrecon::geometry::snapshot_next_frame(&snapshot),
        Some(20)
    );
    assert!(out.join(streamrecon::pipeline::CLOUD_FILE).is_file());
    run(&out, 8, &["--resume", snapshot.to_str().unwrap()]);
    assert_eq!(frame_numbers(&out), (0..40).collect::<Vec<i64>>());
    // The cloud goes on from the one saved with the snapshot: about the uninterrupted run's.
    let whole = out.with_file_name("whole");
    run(&whole, 8, &[]);
    let points = |d: &Path| ply::read_ply(&d.join("points.ply")).unwrap().len() as f64;
    let (resumed, uninterrupted) = (points(&out), points(&whole));
    assert!(
        (resumed / uninterrupted - 1.0).abs() < 0.05,
        "resumed {resumed} points, uninterrupted {uninterrupted}"
    );
    // With a stride the snapshot counts source frames and the checkpoint output frames.
    let strided = out.with_file_name("strided");
    let snapshot = strided.join("snapshot.safetensors");
    run(&strided, 3, &["--stride", "3", "--max-frames", "7"]);
    assert_eq!(
        streamrecon::geometry::snapshot_next_frame(&snapshot),
        Some(19)
    );
    run(
        &strided,
        3,
        &["--stride", "3", "--resume", snapshot.to_str().unwrap()],
    );
    assert_eq!(
        frame_numbers(&strided),
        (0..40).step_by(3).collect::<Vec<i64>>()
    );
}

/// A smooth 160×120 synthetic sequence of `frames` frames in a fresh folder: (the folder, the
/// sequence, an output folder in it).
fn resumable_sequence(
    frames: usize,
) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let seq = common::synth_sequence(
        &dir.path().join("seq"),
        TrajectoryKind::Smooth,
        frames,
        160,
        120,
        4,
    );
    let out = dir.path().join("out");
    (dir, seq, out)
}

/// Waits until a running pipeline has written `n` depth files to `out` (one per frame), checking
/// every `poll`; fails after a minute without them.
fn wait_for_depth_files(out: &Path, n: usize, poll: Duration) {
    let t0 = Instant::now();
    while std::fs::read_dir(out.join("depth")).map_or(0, Iterator::count) < n {
        assert!(
            t0.elapsed() < Duration::from_mins(1),
            "run made no progress"
        );
        std::thread::sleep(poll);
    }
}

/// `streamrecon run SEQ --out OUT --snapshot-every N`.
fn snapshot_run(seq: &Path, out: &Path, every: u32) -> std::process::Command {
    let mut c = common::bin();
    c.args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--snapshot-every", &every.to_string()]);
    c
}

/// The frame number of each row of `trajectory.txt` (synthetic sequences run at 30 fps).
fn frame_numbers(out: &Path) -> Vec<i64> {
    tum::read_tum(&out.join("trajectory.txt"))
        .unwrap()
        .iter()
        .map(|p| (p.timestamp * 30.0).round() as i64)
        .collect()
}

fn run_err(args: &[&str]) -> String {
    let o = common::bin().args(args).output().unwrap();
    assert!(!o.status.success(), "expected failure for {args:?}");
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked"), "panic for {args:?}: {e}");
    e
}

#[test]
fn bad_sources_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let missing = dir.path().join("nope.mp4");
    let e = run_err(&["run", missing.to_str().unwrap(), "--out", o]);
    assert!(e.contains("nope.mp4"), "{e}");
    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let e = run_err(&["run", empty.to_str().unwrap(), "--out", o]);
    assert!(e.contains("empty.mp4"), "{e}");
    let garbage = dir.path().join("garbage.avi");
    std::fs::write(&garbage, vec![7u8; 4096]).unwrap();
    let e = run_err(&["run", garbage.to_str().unwrap(), "--out", o]);
    assert!(e.contains("garbage.avi"), "{e}");
    let e = run_err(&["run", "camera:97", "--out", o]);
    assert!(e.contains("camera:97"), "{e}");
    let empty_dir = dir.path().join("nothing");
    std::fs::create_dir(&empty_dir).unwrap();
    let e = run_err(&["run", empty_dir.to_str().unwrap(), "--out", o]);
    assert!(e.contains("nothing"), "{e}");
}

/// Three 64×48 frames under `dir/seq`.
fn tiny_sequence(dir: &Path) -> std::path::PathBuf {
    common::synth_sequence(&dir.join("seq"), TrajectoryKind::Smooth, 3, 64, 48, 1)
}

#[test]
fn a_cuda_device_where_none_can_be_used_is_one_clear_line() {
    // No GPU here: a build without `cuda` says how to get one, a `cuda` build that there is no
    // driver; either way one line that names CUDA, before any output is written.
    let dir = tempfile::tempdir().unwrap();
    let seq = tiny_sequence(dir.path());
    let out = dir.path().join("out");
    let (seq, o) = (seq.to_str().unwrap(), out.to_str().unwrap());
    for args in [
        &["run", seq, "--out", o, "--device", "cuda"][..],
        &[
            "model", "bench", "vggt", "--frames", "1", "--device", "cuda:1",
        ],
        &[
            "model",
            "--device",
            "cuda",
            "run",
            "--weights",
            "w",
            "--frames",
            "f",
            "--out",
            o,
        ],
    ] {
        let e = run_err(args);
        assert!(e.starts_with("error: CUDA"), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
    }
    assert!(!out.exists(), "a refused device left an output folder");
    let e = run_err(&["run", seq, "--out", o, "--device", "gpu"]);
    assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
}

#[test]
fn unwritable_output_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let seq = tiny_sequence(dir.path());
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("out");
    let e = run_err(&["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(e.contains("a-file"), "{e}");
}

fn image_folder(dir: &Path, frames: usize) -> std::path::PathBuf {
    let seq = common::synth_sequence(
        &dir.join("seq"),
        TrajectoryKind::Smooth,
        frames,
        160,
        120,
        8,
    );
    let imgs = dir.join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..frames {
        std::fs::copy(
            seq.join(format!("rgb/{i:06}.png")),
            imgs.join(format!("{i:06}.png")),
        )
        .unwrap();
    }
    imgs
}

#[test]
fn corrupt_image_in_a_folder_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = image_folder(dir.path(), 12);
    std::fs::write(imgs.join("000005.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let out = dir.path().join("out");
    let o = common::bin()
        .args([
            "run",
            imgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("000005.png"));
    let run = check_outputs(&out, 11);
    assert_eq!(run["frames_skipped"], 1);
}

#[test]
fn frame_size_change_mid_stream_stops_with_an_error_and_keeps_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = image_folder(dir.path(), 10);
    image::RgbImage::new(100, 80)
        .save(imgs.join("000006.png"))
        .unwrap();
    let out = dir.path().join("out");
    let e = run_err(&[
        "run",
        imgs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("100x80") && e.contains("imgs"), "{e}");
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let n = run["frames_processed"].as_u64().unwrap() as usize;
    assert!(n >= 1, "frames before the change are kept");
    check_outputs(&out, n);
}

/// Encodes the numbered PNGs of `imgs` as an MJPEG .avi at 30 fps; `None` without ffmpeg.
fn mjpeg_video(imgs: &Path, video: &Path) -> Option<std::path::PathBuf> {
    let st = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-framerate", "30", "-i"])
        .arg(imgs.join("%06d.png"))
        .args(["-c:v", "mjpeg", "-q:v", "3"])
        .arg(video)
        .status()
        .ok()?;
    assert!(st.success(), "ffmpeg failed");
    Some(video.to_path_buf())
}

#[test]
fn video_files_are_read_with_stride_and_resize() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = image_folder(dir.path(), 24);
    let Some(video) = mjpeg_video(&imgs, &dir.path().join("clip.avi")) else {
        println!("ffmpeg not installed: video test skipped");
        return;
    };
    let out = dir.path().join("out");
    let o = common::bin()
        .args([
            "run",
            video.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--stride",
            "2",
            "--size",
            "80",
            "--max-frames",
            "10",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_outputs(&out, 10);
    let intr: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("intrinsics.json")).unwrap()).unwrap();
    assert_eq!(intr["original"]["width"], 160);
    assert_eq!(intr["model"]["width"], 80);
}

#[test]
fn stream_urls_are_read_as_live_sources() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = image_folder(dir.path(), 20);
    if mjpeg_video(&imgs, &dir.path().join("clip.avi")).is_none() {
        println!("ffmpeg not installed: URL test skipped");
        return;
    }
    // A local HTTP server on a free loopback port, stopped when the test ends.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/clip.avi");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = dir.path().join("out");
    let o = common::bin()
        .args(["run", &url, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["live"], true);
    let read = run["frames_read"].as_u64().unwrap();
    let processed = run["frames_processed"].as_u64().unwrap();
    let dropped = run["frames_dropped"].as_u64().unwrap();
    assert_eq!(read, 20, "every frame of the stream was read");
    assert_eq!(
        processed + dropped,
        read,
        "each frame is processed or counted as dropped"
    );
    check_outputs(&out, processed as usize);
}

#[test]
fn flow_writes_every_pair_in_each_format_and_eval_scores_them() {
    use streamrecon::datasets::formats::{flo, kitti_flow};
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    common::write_sequence(
        &seq,
        &common::synth_config(TrajectoryKind::Smooth, 6, 160, 120, 4),
    );
    let flows = dir.path().join("flo");
    let (s, f) = (seq.to_str().unwrap(), flows.to_str().unwrap());
    let o = common::bin()
        .args(["flow", s, "--out", f, "--backward"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Pair i goes from frame i to i + 1; its backward flow is named after frame i + 1.
    for i in 0..5 {
        let fwd = flo::read_flo(&flows.join(format!("{i:06}.flo"))).unwrap();
        let bwd = flo::read_flo(&flows.join(format!("bwd/{:06}.flo", i + 1))).unwrap();
        assert_eq!(
            (fwd.width, fwd.height, bwd.width, bwd.height),
            (160, 120, 160, 120)
        );
    }
    assert!(!flows.join("000005.flo").exists() && !flows.join("bwd/000000.flo").exists());
    let gt = seq.join("flow_fwd");
    let o = common::bin()
        .args(["eval", "flow", "--gt", gt.to_str().unwrap(), "--pred", f])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["frames"], 5);
    let epe = report["metrics"]["epe"].as_f64().unwrap();
    assert!(epe > 0.0 && epe < 0.5, "EPE {epe}");
    // KITTI 16-bit PNGs and colour-wheel PNGs, one per pair.
    for format in ["kitti", "png"] {
        let out = dir.path().join(format);
        let o = common::bin()
            .args([
                "flow",
                s,
                "--out",
                out.to_str().unwrap(),
                "--format",
                format,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 5, "{format}");
    }
    let k = kitti_flow::read_kitti_flow(&dir.path().join("kitti/000000.png")).unwrap();
    assert_eq!((k.flow.width, k.flow.height), (160, 120));
    // DIS parameters reach the engine; a stride that leaves gaps between patches is refused.
    let e = run_err(&[
        "flow",
        s,
        "--out",
        f,
        "--dis-patch-size",
        "10",
        "--dis-patch-stride",
        "10",
    ]);
    assert!(
        e.contains("stride 10") && e.contains("patch size 10"),
        "{e}"
    );
}

/// ATE RMSE of `out`'s trajectory against the sequence's ground truth.
fn ate(seq: &Path, out: &Path) -> f64 {
    use streamrecon::eval::pose::{associate, pose_metrics, MAX_TIME_DIFF};
    let gt = tum::read_tum(&seq.join("poses.txt")).unwrap();
    let est = tum::read_tum(&out.join("trajectory.txt")).unwrap();
    let (g, e) = associate(&gt, &est, MAX_TIME_DIFF).unwrap();
    pose_metrics(&g, &e, 1).unwrap().ate_rmse
}

#[test]
fn runs_killed_at_ten_frames_resume_the_same_map() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geometry-tiny");
    let (w, c) = (
        fixture.join("model.safetensors"),
        fixture.join("config.json"),
    );
    let vggt = [
        "--geometry",
        "vggt",
        "--weights",
        w.to_str().unwrap(),
        "--model-config",
        c.to_str().unwrap(),
    ];
    for (engine, frames, extra) in [("flowvo", 100, &[][..]), ("vggt", 30, &vggt[..])] {
        let dir = tempfile::tempdir().unwrap();
        let seq = common::synth_sequence(
            &dir.path().join("seq"),
            TrajectoryKind::Handheld,
            frames,
            160,
            120,
            5,
        );
        let run = |out: &Path| {
            let mut c = snapshot_run(&seq, out, 3);
            c.args(extra);
            c
        };
        let full = dir.path().join("full");
        let o = run(&full).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let base = ate(&seq, &full);
        for k in 1..=10 {
            let out = dir.path().join(format!("killed-{k}"));
            let mut child = run(&out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            wait_for_depth_files(&out, k * frames / 12, Duration::from_millis(2));
            child.kill().unwrap();
            child.wait().unwrap();
            let snapshot = out.join("snapshot.safetensors");
            let Some(next) = streamrecon::geometry::snapshot_next_frame(&snapshot) else {
                continue;
            };
            // Every other kill resumes into a folder of its own: the poses before the snapshot
            // come from the killed run's checkpoint.
            let target = if k % 2 == 0 {
                out.clone()
            } else {
                out.with_extension("resumed")
            };
            let o = run(&target)
                .args(["--resume", snapshot.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(
                frame_numbers(&target),
                (0..frames as i64).collect::<Vec<_>>(),
                "{engine}, killed after {k}: every frame's pose once, in order (resumed at {next})"
            );
            let a = ate(&seq, &target);
            eprintln!("{engine}: resumed at {next}: ATE {a:.5} (uninterrupted {base:.5})");
            assert!(
                a <= 1.1 * base + 1e-4,
                "{engine}: resumed at {next}: ATE {a} against {base} uninterrupted"
            );
            let resumed: serde_json::Value =
                serde_json::from_slice(&std::fs::read(target.join("run.json")).unwrap()).unwrap();
            assert_eq!(resumed["map_segments"], 1, "{engine}: {resumed}");
        }
    }
}

/// `run`'s run.json and trajectory rows for a source.
fn run_rows(source: &Path, out: &Path, extra: &[&str]) -> (serde_json::Value, usize) {
    let o = common::bin()
        .args([
            "run",
            source.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let rows = tum::read_tum(&out.join("trajectory.txt")).unwrap().len();
    (run, rows)
}

#[test]
fn frames_that_cannot_be_mapped_get_a_reason_and_no_stand_in_pose() {
    let dir = tempfile::tempdir().unwrap();
    // A camera that only turns, and one that does not move at all.
    let turning = common::synth_sequence(
        &dir.path().join("turning"),
        TrajectoryKind::Rotation,
        40,
        160,
        120,
        2,
    );
    let still = dir.path().join("still");
    std::fs::create_dir(&still).unwrap();
    for i in 0..20 {
        std::fs::copy(
            turning.join("rgb/000000.png"),
            still.join(format!("{i:06}.png")),
        )
        .unwrap();
    }
    let mut cases = vec![
        (turning.clone(), 40, "rotation only"),
        (still, 20, "static camera"),
    ];
    // Real footage from opencv-doc, where it is installed.
    let data = Path::new("/usr/share/doc/opencv-doc/examples/data");
    for video in ["tree.avi", "vtest.avi"] {
        if data.join(video).is_file() {
            cases.push((data.join(video), 0, ""));
        } else {
            eprintln!("skipped {video}: opencv-doc is not installed");
        }
    }
    for (i, (source, frames, why)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("out-{i}"));
        let (run, rows) = run_rows(&source, &out, &["--max-frames", "60"]);
        let n = |k: &str| run[k].as_u64().unwrap();
        if frames > 0 {
            assert_eq!(n("frames_processed"), frames, "{run}");
        }
        assert_eq!(
            rows as u64,
            n("frames_tracked") + n("frames_orientation_only"),
            "{}: {run}",
            source.display()
        );
        assert_eq!(
            n("frames_tracked") + n("frames_untracked"),
            n("frames_processed")
        );
        let reasons = run["untracked"].as_object().unwrap();
        assert_eq!(
            reasons.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
            n("frames_untracked")
        );
        if !why.is_empty() {
            assert_eq!(n("frames_tracked"), 0, "{run}");
            assert!(reasons.keys().all(|k| k.starts_with(why)), "{run}");
        }
        let kitti = std::fs::read_to_string(out.join("poses_kitti.txt")).unwrap();
        assert_eq!(kitti.lines().count(), rows);
        eprintln!("{}: {rows} rows, {reasons:?}", source.display());
    }
    // The turning camera keeps its orientation: every frame's rotation since the first, against
    // the ground truth's.
    let est = tum::read_tum(&dir.path().join("out-0/trajectory.txt")).unwrap();
    let gt = tum::read_tum(&turning.join("poses.txt")).unwrap();
    assert_eq!(est.len(), 40);
    let turn = |p: &[tum::StampedPose], i: usize| {
        (p[0].world_from_cam.inverse() * p[i].world_from_cam).rotation
    };
    let worst = (1..40)
        .map(|i| turn(&est, i).angle_to(&turn(&gt, i)).to_degrees())
        .fold(0.0, f64::max);
    let total = turn(&gt, 39).angle().to_degrees();
    eprintln!("turning camera: {total:.1}° turned, orientation error at most {worst:.3}°");
    assert!(total > 5.0 && worst < 0.5, "{worst}° off over {total}°");
    // Nor does the recording place the camera for frames it could not track (the still one).
    let Some(rerun) = rerun_cli() else {
        println!("rerun CLI not installed: .rrd content not checked");
        return;
    };
    let out = dir.path().join("recorded");
    let rrd = out.join("rec.rrd");
    let (run, _) = run_rows(
        &dir.path().join("still"),
        &out,
        &["--save", rrd.to_str().unwrap()],
    );
    assert_eq!(run["frames_tracked"], 0);
    let text = rrd_print(&rerun, &rrd);
    assert!(text.contains("/world/camera/image/rgb"), "frames logged");
    assert!(
        !text.contains("/world/camera@Transform3D"),
        "an untracked frame's stand-in pose was logged"
    );
}

/// An OpenCV calibration file for `w × h` frames (as `calibrate_camera` writes it).
fn calibration_file(path: &Path, w: i32, h: i32) {
    use opencv::core::{FileStorage, FileStorage_WRITE, Mat};
    use opencv::prelude::*;
    let mut fs = FileStorage::new_def(path.to_str().unwrap(), FileStorage_WRITE).unwrap();
    fs.write_i32("image_width", w).unwrap();
    fs.write_i32("image_height", h).unwrap();
    let k = Mat::from_slice_2d(&[[140.0, 0.0, 79.5], [0.0, 140.0, 59.5], [0.0, 0.0, 1.0]]).unwrap();
    let d = Mat::from_slice_2d(&[[-0.2, 0.05, 0.0, 0.0, 0.0]]).unwrap();
    fs.write_mat("camera_matrix", &k).unwrap();
    fs.write_mat("distortion_coefficients", &d).unwrap();
    fs.release().unwrap();
}

#[test]
fn a_calibration_file_undistorts_the_frames_and_gives_their_intrinsics() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = image_folder(dir.path(), 8);
    let calib = dir.path().join("calibration.yml");
    calibration_file(&calib, 160, 120);
    let out = dir.path().join("out");
    let o = common::bin()
        .args([
            "run",
            imgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--intrinsics-file", calib.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let k: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("intrinsics.json")).unwrap()).unwrap();
    assert!(k["origin"].as_str().unwrap().contains("calibration"), "{k}");
    assert_eq!(k["original"]["fx"], 140.0);
    // A calibration made for other frames is refused, naming the file and both sizes.
    let other = dir.path().join("other.yml");
    calibration_file(&other, 640, 480);
    let e = run_err(&[
        "run",
        imgs.to_str().unwrap(),
        "--out",
        dir.path().join("out2").to_str().unwrap(),
        "--intrinsics-file",
        other.to_str().unwrap(),
    ]);
    assert!(
        e.contains("other.yml") && e.contains("640x480") && e.contains("160x120"),
        "{e}"
    );
}
