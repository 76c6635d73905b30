//! Parity of the `videoflow` model (VideoFlow-MOF) with the official code on the tiny fixture
//! (tests/fixtures/videoflow-tiny). Flow within 2e-4·max|ref|, intermediates within 1e-4·max|ref|;
//! the worst ratio per tensor family is printed (`--nocapture`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
use streamrecon::models::weights::Weights;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/videoflow-tiny")
        .join(name)
}

fn ratio(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let o = ours.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let r = reference
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    let max_ref: f64 = r.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    let d: f64 = (o - r)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    if d.is_nan() {
        f64::INFINITY
    } else {
        d / max_ref.max(1e-30)
    }
}

#[test]
fn videoflow_matches_reference_flow_and_intermediates() {
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
        .forward(&frames, &mut |name, t| {
            taps.insert(name.to_string(), t.clone());
        })
        .unwrap();
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut check = |name: &str, ours: &Tensor, tol: f64| {
        let r = ratio(ours, &io[name]);
        let family = if name.ends_with(".delta_flow") {
            "iter<k>.delta_flow".to_string()
        } else {
            name.to_string()
        };
        let w = worst.entry(family).or_insert(0.0);
        *w = w.max(r);
        if r > tol {
            failures.push(format!("{name}: {r:.3e}"));
        }
    };
    check("flow", &flow, 2e-4);
    let mut missing = Vec::new();
    for name in io
        .keys()
        .filter(|k| *k != "flow" && *k != "input.images_u8")
    {
        match taps.get(name.as_str()) {
            Some(t) => check(name, t, 1e-4),
            None => missing.push(format!("{name}: no such intermediate in the port")),
        }
    }
    failures.extend(missing);
    println!("worst max|rust − ref| / max|ref| per tensor:");
    for (k, v) in &worst {
        println!("  {k:<32} {v:.3e}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
