//! Pose-adaptive memory updates and trajectory stabilization through the CLI: their per-frame
//! facts reach run.json.

use std::path::Path;
use std::process::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/geometry-tiny")
        .join(name)
}

fn run_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("run.json")).unwrap()).unwrap()
}

#[test]
fn stabilization_and_adaptive_memory_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_streamrecon");
    let data = dir.path().join("data");
    assert!(Command::new(bin)
        .args([
            "synth",
            "--trajectory",
            "handheld",
            "--frames",
            "16",
            "--size",
            "160x120",
            "--out"
        ])
        .arg(&data)
        .status()
        .unwrap()
        .success());
    let out = dir.path().join("stab");
    let o = Command::new(bin)
        .arg("run")
        .arg(&data)
        .args(["--stabilize", "on", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = run_json(&out);
    let s = &j["stabilization"];
    assert!(s["mean_translation"].as_f64().unwrap().is_finite());
    assert!(s["max_rotation_deg"].as_f64().unwrap() >= s["mean_rotation_deg"].as_f64().unwrap());

    let out = dir.path().join("adaptive");
    let o = Command::new(bin)
        .arg("run")
        .arg(&data)
        .arg("--weights")
        .arg(fixture("model.safetensors"))
        .arg("--model-config")
        .arg(fixture("config.json"))
        .args([
            "--memory-update",
            "adaptive",
            "--total-budget",
            "300",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = run_json(&out);
    let frames = j["model_memory"]["per_frame"].as_array().unwrap();
    assert_eq!(frames.len(), 16);
    for f in frames {
        let w = f["novelty"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w), "{f}");
        assert!(f["tokens"].as_u64().unwrap() <= 300);
    }
    assert_eq!(frames[0]["admitted"], true);
}
