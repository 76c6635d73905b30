//! Loop closure (`--loop-closure`) on a synthetic camera that circles the room twice: the second
//! lap recognises the first, and the pose graph's trajectory is much closer to the ground truth
//! than the online one, which stays in `trajectory_online.txt`. In a room of one repeating
//! texture, no loop joins two different places. A kidnapped camera relocalises in its first map
//! after every jump, so the stream stays one map.

mod common;

use std::path::Path;

use streamrecon::datasets::formats::tum;
use streamrecon::datasets::synth::{SceneKind, TrajectoryKind};
use streamrecon::eval::pose::{associate, pose_metrics, MAX_TIME_DIFF};

fn ate(seq: &Path, trajectory: &Path) -> f64 {
    let gt = tum::read_tum(&seq.join("poses.txt")).unwrap();
    let est = tum::read_tum(trajectory).unwrap();
    let (g, e) = associate(&gt, &est, MAX_TIME_DIFF).unwrap();
    pose_metrics(&g, &e, 1).unwrap().ate_rmse
}

/// `streamrecon run SEQ --out OUT --loop-closure`; its run.json.
fn run_with_loops(seq: &Path, out: &Path) -> serde_json::Value {
    let o = common::bin()
        .args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .arg("--loop-closure")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap()
}

#[test]
fn a_second_lap_closes_the_loop_and_corrects_the_drift() {
    let dir = tempfile::tempdir().unwrap();
    // Two laps of 300 frames.
    let seq = common::synth_sequence(
        &dir.path().join("seq"),
        TrajectoryKind::Loop,
        600,
        320,
        240,
        1,
    );
    let out = dir.path().join("out");
    let run = run_with_loops(&seq, &out);
    let lc = &run["loop_closure"];
    assert!(lc["loop_closures"].as_u64().unwrap() >= 1, "{lc}");
    assert_eq!(lc["corrected"], true, "{lc}");
    // Every loop joins a frame of the second lap with its place on the first (300 frames back,
    // give or take a keyframe).
    for l in lc["loops"].as_array().unwrap() {
        let (older, newer) = (l[0].as_i64().unwrap(), l[1].as_i64().unwrap());
        assert!((newer - older - 300).abs() <= 20, "a false loop: {l}");
    }
    let online = ate(&seq, &out.join("trajectory_online.txt"));
    let corrected = ate(&seq, &out.join("trajectory.txt"));
    eprintln!("ATE RMSE online {online:.4}, after loop closure {corrected:.4}");
    assert!(
        corrected < 0.5 * online,
        "online {online}, corrected {corrected}"
    );
    // The corrected trajectory has a row for every frame the online one has.
    let rows = |p: &Path| tum::read_tum(p).unwrap().len();
    assert_eq!(
        rows(&out.join("trajectory.txt")),
        rows(&out.join("trajectory_online.txt"))
    );
    // COLMAP's images are at the corrected poses: the camera centre −Rᵀt of each image is the
    // trajectory's position.
    let traj = tum::read_tum(&out.join("trajectory.txt")).unwrap();
    let images = std::fs::read_to_string(out.join("colmap/images.txt")).unwrap();
    let centres: Vec<nalgebra::Vector3<f64>> = images
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let v: Vec<f64> = l
                .split_whitespace()
                .skip(1)
                .take(7)
                .map(|x| x.parse().unwrap())
                .collect();
            let q = nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(
                v[0], v[1], v[2], v[3],
            ));
            -(q.inverse() * nalgebra::Vector3::new(v[4], v[5], v[6]))
        })
        .collect();
    assert_eq!(centres.len(), traj.len());
    let worst = centres
        .iter()
        .zip(&traj)
        .map(|(c, p)| (c - p.world_from_cam.translation.vector).norm())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-6,
        "COLMAP centres differ from trajectory.txt by {worst}"
    );
}

/// The `repeated` scene: one texture repeating every 2 m on every surface, identical boxes and
/// spheres in twos half a turn apart. Every feature has twins elsewhere; every loop found must
/// still join a frame with its own place on the other lap.
#[test]
fn a_repeated_texture_closes_no_false_loop() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    // A lap and a half: the second half-lap revisits the first.
    let config = streamrecon::datasets::synth::SynthConfig {
        scene: SceneKind::Repeated,
        ..common::synth_config(TrajectoryKind::Loop, 450, 320, 240, 0)
    };
    common::write_sequence(&seq, &config);
    let out = dir.path().join("out");
    let run = run_with_loops(&seq, &out);
    let lc = &run["loop_closure"];
    let gt = tum::read_tum(&seq.join("poses.txt")).unwrap();
    let loops = lc["loops"].as_array().unwrap();
    assert!(!loops.is_empty(), "{lc}");
    for l in loops {
        let (a, b) = (l[0].as_u64().unwrap(), l[1].as_u64().unwrap());
        let (a, b) = (
            &gt[a as usize].world_from_cam,
            &gt[b as usize].world_from_cam,
        );
        let apart = (a.translation.vector - b.translation.vector).norm();
        let turned = a.rotation.angle_to(&b.rotation).to_degrees();
        assert!(
            apart < 1.0 && turned < 45.0,
            "a false loop {l}: {apart} m, {turned} deg apart"
        );
    }
    let online = ate(&seq, &out.join("trajectory_online.txt"));
    let corrected = ate(&seq, &out.join("trajectory.txt"));
    eprintln!(
        "repeated texture: {} loops; ATE RMSE online {online:.4}, corrected {corrected:.4}",
        loops.len()
    );
    assert!(
        corrected <= online,
        "online {online}, corrected {corrected}"
    );
}

/// `synth --trajectory revisit`: 150-frame blocks along a path, each starting 100 frames back
/// along it, so after every jump the camera sees a place of the map it left. Each jump loses
/// tracking; a frame just after it is found among the keyframes and placed in that map, so
/// the three blocks make one map, nearly every frame is tracked, and one similarity aligns the
/// whole online trajectory with the ground truth.
#[test]
fn a_kidnapped_camera_relocalises_in_its_first_map() {
    let dir = tempfile::tempdir().unwrap();
    let seq = common::synth_sequence(
        &dir.path().join("seq"),
        TrajectoryKind::Revisit,
        450,
        320,
        240,
        0,
    );
    let out = dir.path().join("out");
    let run = run_with_loops(&seq, &out);
    let lc = &run["loop_closure"];
    assert_eq!(lc["relocalisations"], 2, "{lc}");
    assert_eq!(run["map_segments"], 1, "{run}");
    assert_eq!(lc["segments_after_loops"], 1, "{lc}");
    // The frames after a jump wait for a relocalisation, which can come a few frames late when
    // the loops thread (a background thread) is behind with its keyframes on a busy machine.
    let tracked = run["frames_tracked"].as_u64().unwrap();
    assert!(tracked >= 440, "{tracked} of 450 frames tracked: {run}");
    let gt = tum::read_tum(&seq.join("poses.txt")).unwrap();
    for name in ["trajectory_online.txt", "trajectory.txt"] {
        let est = tum::read_tum(&out.join(name)).unwrap();
        let (g, e) = associate(&gt, &est, MAX_TIME_DIFF).unwrap();
        let m = pose_metrics(&g, &e, 1).unwrap();
        eprintln!(
            "revisit {name}: ATE {:.3} % of the path",
            100.0 * m.ate_rmse_over_length
        );
        assert!(m.ate_rmse_over_length < 0.01, "{name}: {m:?}");
    }
}
