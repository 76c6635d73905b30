//! `streamrecon eval …` end to end.

mod common;

use streamrecon::datasets::synth::TrajectoryKind;

#[test]
fn eval_long3d_of_a_cloud_against_itself_is_perfect_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq");
    common::write_sequence(
        &seq,
        &common::synth_config(TrajectoryKind::Smooth, 10, 160, 120, 3),
    );
    let gt = seq.join("gt_points.pcd");
    let out = dir.path().join("m.json");
    let o = common::bin()
        .args([
            "eval",
            "long3d",
            "--pred",
            seq.join("gt_points.ply").to_str().unwrap(),
            "--gt",
            gt.to_str().unwrap(),
        ])
        .args([
            "--extrinsic",
            "identity",
            "--scale-init",
            "1.0",
            "--voxel",
            "0.03",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    for k in [
        "Acc", "Comp", "NC1", "NC2", "Acc_med", "Comp_med", "NC_mean", "NC_med",
    ] {
        assert!(m[k].is_f64(), "{k} missing: {m}");
    }
    assert!(
        m["Acc"].as_f64().unwrap() < 1e-4 && m["Comp"].as_f64().unwrap() < 1e-4,
        "{m}"
    );
    let bad = dir.path().join("broken.pcd");
    std::fs::write(&bad, b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nWIDTH 99\nPOINTS 99\nDATA binary\n\x01\x02").unwrap();
    let o = common::bin()
        .args([
            "eval",
            "long3d",
            "--pred",
            bad.to_str().unwrap(),
            "--gt",
            gt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("broken.pcd") && !e.contains("panicked"),
        "{e}"
    );
    let o = common::bin()
        .args([
            "eval",
            "pose",
            "--gt",
            bad.to_str().unwrap(),
            "--pred",
            seq.join("poses.txt").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("broken.pcd") && !e.contains("panicked"),
        "{e}"
    );
}

#[test]
fn eval_run_writes_every_report_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    common::write_sequence(
        &data.join("a"),
        &common::synth_config(TrajectoryKind::Smooth, 60, 320, 240, 1),
    );
    let out = dir.path().join("eval");
    let o = common::bin()
        .args([
            "eval",
            "run",
            "--dataset",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "metrics.json",
        "metrics.md",
        "a/metrics.json",
        "a/trajectory_top.png",
        "a/ate_over_time.png",
        "a/run/trajectory.txt",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let a = &all[0];
    assert!(
        a["pose"]["ate_rmse"].is_f64()
            && a["depth"]["abs_rel"].is_f64()
            && a["long3d"]["Acc"].is_f64(),
        "{a}"
    );
    let o = common::bin()
        .args([
            "eval",
            "run",
            "--dataset",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already evaluated"),
        "second run resumes"
    );
}
