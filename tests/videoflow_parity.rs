//! Parity of the `videoflow` model (VideoFlow-MOF) with the official code on two fixtures:
//! tests/fixtures/videoflow-tiny (5 frames of 60×78, 3 correlation levels, 32 iterations, from
//! ../shared) and tests/fixtures/videoflow-l4 (3 frames of 125×130, 4 levels, 12 iterations,
//! made here from the reference code; its config.json says how). Flow within 2e-4·max|ref|,
//! intermediates within 1e-4·max|ref|; the worst ratio per tensor family is printed
//! (`--nocapture`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
use streamrecon::models::weights::Weights;

fn fixture(name: &str) -> PathBuf {
    fixture_in("videoflow-tiny", name)
}

fn fixture_in(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
        .join(name)
}

#[test]
fn videoflow_matches_reference_flow_and_intermediates() {
    matches_reference("videoflow-tiny");
}

#[test]
fn videoflow_matches_reference_with_four_levels_and_three_frames() {
    matches_reference("videoflow-l4");
}

fn matches_reference(set: &str) {
    let fixture = |name: &str| fixture_in(set, name);
    let io = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    let cfg = VideoFlowConfig::from_json_file(&fixture("config.json")).unwrap();
    let net = MofNet::new(
        &Weights::load(&fixture("model.safetensors"), DType::F32).unwrap(),
        cfg,
    )
    .unwrap();
    let frames = io["input.images_u8"].to_dtype(DType::F32).unwrap();
    let mut taps: HashMap<String, Tensor> = HashMap::new();
    let flow = net
        .forward(
            &frames,
            Some(&mut |name, t| {
                taps.insert(name.to_string(), t.clone());
            }),
        )
        .unwrap();
    taps.insert("flow".to_string(), flow);
    common::assert_matches_fixture(set, &io, &taps, &["input.images_u8"], |name| {
        if name == "flow" {
            2e-4
        } else {
            1e-4
        }
    });
}

fn tiny() -> MofNet {
    let cfg = VideoFlowConfig::from_json_file(&fixture("config.json")).unwrap();
    MofNet::new(
        &Weights::load(&fixture("model.safetensors"), DType::F32).unwrap(),
        cfg,
    )
    .unwrap()
}

#[test]
fn full_size_loader_accounts_for_every_released_key() {
    // Keys carry DataParallel's prefix, as in the released .pth; the helper removes it.
    let (tensors, _) = common::checkpoint_shapes(&fixture("checkpoint_keys.json"));
    assert_eq!(tensors.len(), 251);
    let w = Weights::from_map(tensors, DType::F32, "checkpoint_keys.json".into());
    MofNet::new(&w, VideoFlowConfig::mof_released()).expect("the released layout loads");
    let (unexpected, skipped) = w.unused(&[]);
    assert!(
        unexpected.is_empty() && skipped.is_empty(),
        "{unexpected:?}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let net = tiny();
    let dev = Device::Cpu;
    let two = Tensor::zeros((2, 3, 60, 78), DType::F32, &dev).unwrap();
    let err = net.forward(&two, None).expect_err("two frames");
    assert!(err.to_string().contains("N ≥ 3"), "{err}");
    let grey = Tensor::zeros((5, 1, 60, 78), DType::F32, &dev).unwrap();
    assert!(net.forward(&grey, None).is_err());
    // Weights of the tiny model do not fit the released sizes; the message names a tensor.
    let err = MofNet::new(
        &Weights::load(&fixture("model.safetensors"), DType::F32).unwrap(),
        VideoFlowConfig::mof_released(),
    )
    .err()
    .expect("size mismatch");
    assert!(err.to_string().contains("fnet.svt"), "{err}");
}

#[test]
fn engine_streams_pairs_in_order_with_bounded_windows() {
    use streamrecon::flow::videoflow::VideoFlowEngine;
    use streamrecon::flow::FlowEngine;
    let mut engine = VideoFlowEngine::from_model(tiny(), 5).unwrap();
    assert!(VideoFlowEngine::from_model(tiny(), 3).is_err());
    let frame = common::pattern_frame;
    let mut pairs = Vec::new();
    for i in 0..8 {
        pairs.extend(engine.push(&frame(i, 40, 32)).unwrap());
    }
    let err = engine.push(&frame(8, 48, 32)).expect_err("size change");
    assert!(err.to_string().contains("48x32"), "{err}");
    pairs.extend(engine.flush().unwrap());
    let ids: Vec<(u64, u64)> = pairs.iter().map(|p| (p.from, p.to)).collect();
    assert_eq!(ids, (0..7).map(|i| (i, i + 1)).collect::<Vec<_>>());
    for p in &pairs {
        assert_eq!((p.fwd.width, p.fwd.height), (40, 32));
        assert!(p.fwd.data.iter().chain(&p.bwd.data).all(|v| v.is_finite()));
        assert!(p.fwd_conf.iter().all(|c| (0.0..=1.0).contains(c)));
    }
    // A stream of one or two frames.
    common::assert_short_streams(&mut engine, 40, 32);
}

#[test]
fn model_flow_command_writes_the_reference_layout() {
    // Three frames: one middle frame without neighbours (this once panicked inside candle).
    let fixture = |name: &str| fixture_in("videoflow-l4", name);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flow.safetensors");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["model", "flow", "--model-config"])
        .arg(fixture("config.json"))
        .arg("--weights")
        .arg(fixture("model.safetensors"))
        .arg("--frames")
        .arg(format!(
            "{}:input.images_u8",
            fixture("io.safetensors").display()
        ))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let ours = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    assert!(common::relative_error(&ours["flow"], &reference["flow"]) <= 2e-4);
}

/// `model bench` for both engines at the fixture sizes: one JSON object with the documented keys.
#[test]
fn model_bench_prints_the_documented_json_for_both_engines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let bench = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamrecon"))
            .args(["model", "bench"])
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("one JSON object")
    };
    let vggt_cfg = root.join("geometry-tiny/config.json");
    let v = bench(&[
        "vggt",
        "--config",
        vggt_cfg.to_str().unwrap(),
        "--size",
        "70x56",
        "--frames",
        "6",
        "--total-budget",
        "200",
    ]);
    assert!(v["fps"].as_f64().unwrap() > 0.0);
    assert!(v["ms_first"].as_f64().unwrap() > 0.0);
    assert!(v["ms_mid"].is_null() && v["ms_last"].is_null(), "{v}");
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0);
    // 6 frames of 25 tokens would be 150 cached tokens; the budget of 200 over 3 layers prunes.
    assert!(v["kv_len_last"].as_u64().unwrap() < 150, "{v}");
    let vf_cfg = root.join("videoflow-tiny/config.json");
    let f = bench(&[
        "videoflow",
        "--config",
        vf_cfg.to_str().unwrap(),
        "--size",
        "78x60",
        "--window",
        "3",
        "--iters",
        "2",
    ]);
    assert!(f["s_per_window"].as_f64().unwrap() > 0.0);
    assert!(f["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert_eq!(f["iters"], 2);
    // A bad size is refused with a message naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["model", "bench", "vggt", "--size", "224"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
}
