//! Parity of the `streamflow` model (StreamFlow, `SKFlow_MF8`) with the official code on two
//! fixtures: tests/fixtures/streamflow-tiny (T = 4, 15 iterations, 4 frames of 131×139, from
//! ../shared) and tests/fixtures/streamflow-t3 (T = 3, 8 iterations, 3 frames of 141×205, made
//! here from the reference code and saved as the released `.pth`; its config.json says how).
//! The flow and every intermediate within 1e-4·max|ref|; the worst ratio per tensor family is
//! printed (`--nocapture`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use streamrecon::models::streamflow::{StreamFlow, StreamFlowConfig};
use streamrecon::models::weights::Weights;

fn fixture_in(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
        .join(name)
}

fn load(set: &str) -> (StreamFlow, HashMap<String, Tensor>) {
    let fixture = |name: &str| fixture_in(set, name);
    let io = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    let cfg = StreamFlowConfig::from_json_file(&fixture("config.json")).unwrap();
    // streamflow-t3 holds its weights as the released checkpoints do: a .pth whose dict has the
    // state dict (keys with DataParallel's `module.`) under `model`, beside the optimiser's.
    let weights = ["model.safetensors", "model.pth"]
        .map(fixture)
        .into_iter()
        .find(|p| p.exists())
        .unwrap();
    let net = StreamFlow::new(&Weights::load(&weights, DType::F32).unwrap(), cfg).unwrap();
    (net, io)
}

fn matches_reference(set: &str) {
    let (net, io) = load(set);
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
    common::assert_matches_fixture(set, &io, &taps, &["input.images_u8"], |_| 1e-4);
}

#[test]
fn streamflow_matches_reference_flow_and_intermediates() {
    matches_reference("streamflow-tiny");
}

#[test]
fn streamflow_matches_reference_with_three_frames_at_another_size() {
    matches_reference("streamflow-t3");
}

#[test]
fn full_size_loader_accounts_for_every_released_key() {
    let (tensors, entries) =
        common::checkpoint_shapes(&fixture_in("streamflow-tiny", "checkpoint_keys.json"));
    assert_eq!((tensors.len(), entries), (252, 252));
    let w = Weights::from_map(tensors, DType::F32, "checkpoint_keys.json".into());
    StreamFlow::new(&w, StreamFlowConfig::released()).expect("the released layout loads");
    let (unexpected, skipped) = w.unused(&[]);
    assert!(
        unexpected.is_empty() && skipped.is_empty(),
        "{unexpected:?}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let (net, _) = load("streamflow-tiny");
    let dev = Device::Cpu;
    // The flow head is tied to T = 4.
    let three = Tensor::zeros((3, 3, 131, 139), DType::F32, &dev).unwrap();
    let err = net.forward(&three, None).expect_err("three frames");
    assert!(err.to_string().contains("T = 4"), "{err}");
    // Padded to 120 rows: the coarsest correlation level would be one row (NaN in the reference).
    let small = Tensor::zeros((4, 3, 113, 139), DType::F32, &dev).unwrap();
    let err = net.forward(&small, None).expect_err("too small");
    assert!(err.to_string().contains("at least 128"), "{err}");
    let grey = Tensor::zeros((4, 1, 131, 139), DType::F32, &dev).unwrap();
    assert!(net.forward(&grey, None).is_err());
    // The tiny weights do not fit the released sizes; the message names a tensor.
    let err = StreamFlow::new(
        &Weights::load(
            &fixture_in("streamflow-tiny", "model.safetensors"),
            DType::F32,
        )
        .unwrap(),
        StreamFlowConfig::released(),
    )
    .err()
    .expect("size mismatch");
    assert!(err.to_string().contains("fnet.svt"), "{err}");
}

use common::pattern_frame as frame;

#[test]
fn engine_gives_every_pair_once_from_windows_sliding_by_t_minus_one() {
    use streamrecon::flow::streamflow::StreamFlowEngine;
    use streamrecon::flow::FlowEngine;
    let (net, _) = load("streamflow-tiny");
    // The engine's forward flows are the model's on the same window.
    let frames: Vec<_> = (0..8).map(|i| frame(i, 128, 128)).collect();
    let window = Tensor::stack(
        &frames[3..7]
            .iter()
            .map(|f| {
                let data: Vec<f32> = f.image.as_raw().iter().map(|&v| f32::from(v)).collect();
                Tensor::from_vec(data, (128, 128, 3), &Device::Cpu)
                    .unwrap()
                    .permute((2, 0, 1))
                    .unwrap()
            })
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let model_flow = net.forward(&window, None).unwrap();
    let mut engine = StreamFlowEngine::from_model(net);
    assert_eq!(engine.window(), 4);
    let mut pairs = Vec::new();
    let mut answered_at = Vec::new();
    for f in &frames {
        let got = engine.push(f).unwrap();
        answered_at.extend(got.iter().map(|_| f.index));
        pairs.extend(got);
    }
    // Windows 0..=3 and 3..=6 answer at frames 3 and 6; frame 7's pair waits for the end, where
    // the last window is aligned to the stream's last frame (4..=7).
    assert_eq!(answered_at, vec![3, 3, 3, 6, 6, 6]);
    pairs.extend(engine.flush().unwrap());
    let ids: Vec<(u64, u64)> = pairs.iter().map(|p| (p.from, p.to)).collect();
    assert_eq!(ids, (0..7).map(|i| (i, i + 1)).collect::<Vec<_>>());
    for p in &pairs {
        assert_eq!((p.fwd.width, p.fwd.height), (128, 128));
        assert!(p.fwd.data.iter().chain(&p.bwd.data).all(|v| v.is_finite()));
        assert!(p.fwd_conf.iter().all(|c| (0.0..=1.0).contains(c)));
    }
    // Pair 4 -> 5 is the second pair of the window 3..=6: its flow at pixel (x, y) is channel
    // (0, 1) of the model's flow 1.
    let (x, y) = (37usize, 90usize);
    let u: f32 = model_flow
        .get(1)
        .unwrap()
        .get(0)
        .unwrap()
        .get(y)
        .unwrap()
        .get(x)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(pairs[4].fwd.data[2 * (y * 128 + x)].to_bits(), u.to_bits());
    // A size change, and frames too small once padded, are refused with the sizes.
    let err = engine.push(&frame(8, 136, 128)).expect_err("size change");
    assert!(err.to_string().contains("136x128"), "{err}");
    engine.reset();
    let err = engine.push(&frame(0, 200, 100)).expect_err("too small");
    assert!(err.to_string().contains("200x100"), "{err}");
    // Streams shorter than T: the window is completed with repeats of the last frame.
    common::assert_short_streams(&mut engine, 128, 128);
}

#[test]
fn model_flow_command_recognises_streamflow_from_its_config() {
    let fixture = |name: &str| fixture_in("streamflow-tiny", name);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("flow.safetensors");
    let status = common::bin()
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
    assert!(common::relative_error(&ours["flow"], &reference["flow"]) <= 1e-4);
    // Frames too small for the model: one clear line, no panic.
    let small = dir.path().join("small.safetensors");
    let t = Tensor::zeros((4, 3, 64, 64), DType::U8, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), t)]), &small).unwrap();
    let o = common::bin()
        .args(["model", "flow", "--arch", "streamflow", "--model-config"])
        .arg(fixture("config.json"))
        .arg("--weights")
        .arg(fixture("model.safetensors"))
        .arg("--frames")
        .arg(format!("{}:x", small.display()))
        .arg("--out")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("too small"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn runs_end_to_end_on_a_synthetic_sequence() {
    let fixture = |name: &str| fixture_in("streamflow-tiny", name);
    let dir = tempfile::tempdir().unwrap();
    let seq = common::synth_sequence(
        &dir.path().join("seq"),
        streamrecon::datasets::synth::TrajectoryKind::Smooth,
        9,
        160,
        128,
        1,
    );
    let out = dir.path().join("out");
    let o = common::bin()
        .args(["run", seq.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--flow", "streamflow", "--flow-weights"])
        .arg(fixture("model.safetensors"))
        .arg("--flow-config")
        .arg(fixture("config.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["frames_processed"], 9, "{run}");
    assert!(
        run["config"].to_string().contains("StreamFlow"),
        "{}",
        run["config"]
    );
}
