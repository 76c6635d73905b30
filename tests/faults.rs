//! Fault injection against the `streamrecon` binary: inputs that can produce nothing, inputs out
//! of bounds, a disk that fills, a run that will not stop. Each failure must be visible: a
//! non-zero exit naming the cause, and `run.json` recording it when the run got that far.
//! (Panics injected into the stages and sinks: `tests/pipeline.rs`; killed and resumed runs:
//! `tests/cli.rs`.)

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use streamrecon::datasets::synth::TrajectoryKind;

/// Runs the binary and expects it to fail: its stderr, which must not hold a panic.
fn run_err(args: &[&str]) -> String {
    let o = common::bin().args(args).output().unwrap();
    assert!(!o.status.success(), "expected failure for {args:?}");
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked"), "panic for {args:?}: {e}");
    e
}

fn sequence(dir: &Path, frames: usize) -> std::path::PathBuf {
    common::synth_sequence(
        &dir.join("seq"),
        TrajectoryKind::Smooth,
        frames,
        160,
        120,
        4,
    )
}

fn run_json(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("run.json")).expect("run.json written"))
        .expect("run.json parses")
}

#[test]
fn options_that_can_produce_nothing_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let seq = sequence(dir.path(), 3);
    let out = dir.path().join("out");
    for (flag, value, why) in [
        ("--stride", "0", "stride must be 1 or more"),
        ("--max-frames", "0", "max_frames must be 1 or more"),
        (
            "--size",
            "100000",
            "size must be 16–8192 pixels, got 100000",
        ),
        ("--size", "8", "size must be 16–8192 pixels, got 8"),
    ] {
        let e = run_err(&[
            "run",
            seq.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            flag,
            value,
        ]);
        assert!(e.contains(why), "{flag} {value}: {e}");
        assert!(!out.exists(), "{flag} {value}: nothing is written");
    }
}

#[test]
fn a_source_with_no_usable_frame_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("huge");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..3 {
        std::fs::write(
            imgs.join(format!("{i:03}.png")),
            common::png_header_only(20_000, 20_000),
        )
        .unwrap();
    }
    let out = dir.path().join("out");
    let t0 = Instant::now();
    let e = run_err(&[
        "run",
        imgs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    // Refused from the header: nothing of 1.2 GB a frame was decoded.
    assert!(
        e.contains("no frame could be processed (0 read, 3 skipped")
            && e.contains("frame of 20000x20000 is too large"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    let run = run_json(&out);
    assert_eq!(run["frames_skipped"], 3);
    assert!(
        run["error"]
            .as_str()
            .is_some_and(|e| e.contains("no frame could be processed")),
        "{run}"
    );
}

/// Mounts a tmpfs of `size` at `dir`; false (with a message) where this test cannot (not root,
/// no mount permission).
fn small_disk(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a {size} tmpfs here (needs root)");
    }
    ok
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_full_disk_is_an_error_that_names_what_was_and_was_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let seq = sequence(dir.path(), 120);
    // How far a run gets depends on the disk's size: on the larger one run.json usually fits,
    // on the smaller one it goes elsewhere.
    for size in ["3m", "600k"] {
        let disk = dir.path().join(format!("disk-{size}"));
        if !small_disk(&disk, size) {
            return;
        }
        let _unmount = Unmount(&disk);
        let out = disk.join("out");
        let o = common::bin()
            .args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{size}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        // Which output the disk runs out on depends on the outputs' sizes; the last line names
        // it, and what was written before it.
        assert!(
            last.contains("No space left on device")
                && last.contains("outputs not written: ")
                && last.contains(": trajectory.txt")
                && !last.contains("outputs up to that point are written"),
            "{size}: {last}"
        );
        let run = if last.contains("run.json written to") {
            // The disk could not take run.json: it went elsewhere, and the message says where.
            let elsewhere = last
                .split("run.json written to ")
                .nth(1)
                .and_then(|s| s.split(" instead").next())
                .unwrap_or_else(|| panic!("{size}: where run.json went: {last}"));
            let run: serde_json::Value =
                serde_json::from_slice(&std::fs::read(elsewhere).unwrap()).unwrap();
            let _ = std::fs::remove_file(elsewhere);
            run
        } else {
            run_json(&out)
        };
        let error = run["error"].as_str().unwrap_or_default();
        let not_written: Vec<&str> = run["outputs"]["not_written"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f[0].as_str())
            .collect();
        assert!(
            error.contains("No space left on device")
                && !not_written.is_empty()
                && not_written
                    .iter()
                    .all(|f| error.contains(f) && last.contains(&format!("{f} ("))),
            "{size}: {run}"
        );
    }
}

#[test]
fn a_run_that_cannot_drain_in_its_grace_period_exits_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let seq = sequence(dir.path(), 400);
    let out = dir.path().join("out");
    // No grace at all: the process must exit at once, not after the drain.
    let child = common::bin()
        .args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--stop-grace", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_dir(out.join("depth")).map_or(0, Iterator::count) < 10 {
        assert!(
            t0.elapsed() < Duration::from_mins(1),
            "run made no progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t_kill = Instant::now();
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(t_kill.elapsed() < Duration::from_secs(20), "{stderr}");
    match o.status.code() {
        // The usual case: the watchdog ended the process and recorded why.
        Some(130) => {
            assert!(stderr.contains("still busy 0 s later"), "{stderr}");
            let run = run_json(&out);
            assert_eq!(run["interrupted"], true);
            assert!(run["error"].as_str().is_some_and(|e| e.contains("exited")));
        }
        // The drain won the race: a complete, interrupted run.
        Some(0) => assert_eq!(run_json(&out)["interrupted"], true),
        c => panic!("exit {c:?}: {stderr}"),
    }
}

#[test]
fn a_video_whose_every_frame_is_undecodable_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let seq = sequence(dir.path(), 8);
    let video = dir.path().join("cam.avi");
    let Ok(st) = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-framerate", "30", "-i"])
        .arg(seq.join("rgb/%06d.png"))
        .args(["-c:v", "mjpeg", "-q:v", "3"])
        .arg(&video)
        .status()
    else {
        eprintln!("skipped: no ffmpeg to make the video");
        return;
    };
    assert!(st.success());
    // Every JPEG's headers overwritten after its start marker: the container is fine, no frame
    // decodes.
    let mut bytes = std::fs::read(&video).unwrap();
    let mut at = 0;
    let mut frames = 0;
    while let Some(i) = bytes[at..].windows(3).position(|w| w == [0xFF, 0xD8, 0xFF]) {
        let start = at + i + 2;
        let end = (start + 600).min(bytes.len());
        bytes[start..end].fill(0x55);
        frames += 1;
        at = end;
    }
    assert!(frames >= 8, "{frames} frames found");
    std::fs::write(&video, bytes).unwrap();
    let out = dir.path().join("out");
    let e = run_err(&[
        "run",
        video.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        e.contains("no frame could be processed (0 read") && e.contains("undecodable frame"),
        "{e}"
    );
    assert!(run_json(&out)["error"].is_string());
}
