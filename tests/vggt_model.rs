//! The `vggt` model's loader (full official key list), its errors on bad input, the
//! `model run` command and the pipeline engine.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use streamrecon::frame::Frame;
use streamrecon::geometry::vggt::VggtEngine;
use streamrecon::geometry::GeometryEngine;
use streamrecon::models::vggt::memory::{CameraCache, MemoryUpdate};
use streamrecon::models::vggt::{StreamVggt, VggtConfig};
use streamrecon::models::weights::Weights;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/geometry-tiny")
        .join(name)
}

fn tiny_config() -> VggtConfig {
    VggtConfig::from_json_file(&fixture("config.json")).unwrap()
}

fn tiny_tensors() -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(fixture("model.safetensors")).unwrap();
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn tiny_model() -> StreamVggt {
    StreamVggt::new(
        &Weights::from_map(tiny_tensors(), DType::F32, "tiny".into()),
        tiny_config(),
    )
    .unwrap()
}

/// Every key of the official full-size checkpoint, as zero-stride tensors of the right shape.
fn full_checkpoint_shapes() -> BTreeMap<String, Tensor> {
    let (keys, entries) = common::checkpoint_shapes(&fixture("checkpoint_keys.json"));
    assert_eq!(keys.len(), entries);
    keys
}

#[test]
fn full_size_loader_accounts_for_every_official_key() {
    let tensors = full_checkpoint_shapes();
    let total = tensors.len();
    let w = Weights::from_map(tensors, DType::F32, "checkpoint_keys.json".into());
    StreamVggt::new(&w, VggtConfig::vggt_1b())
        .expect("the VGGT-1B preset loads the official layout");
    let (unexpected, skipped) = w.unused(&["track_head."]);
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(skipped.iter().all(|k| k.starts_with("track_head.")));
    println!(
        "official checkpoint: {total} keys, {} used by the model, {} track-head keys skipped",
        total - skipped.len(),
        skipped.len()
    );
}

#[test]
fn missing_misshapen_and_unexpected_tensors_are_named() {
    let mut t = full_checkpoint_shapes();
    t.remove("camera_head.trunk_norm.weight");
    let err = StreamVggt::new(
        &Weights::from_map(t, DType::F32, "ckpt".into()),
        VggtConfig::vggt_1b(),
    )
    .err()
    .expect("missing key");
    assert!(
        err.to_string().contains("camera_head.trunk_norm.weight"),
        "{err}"
    );

    let mut t = tiny_tensors();
    let bad = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
    t.insert("aggregator.global_blocks.1.attn.qkv.weight".into(), bad);
    let err = StreamVggt::new(
        &Weights::from_map(t, DType::F32, "ckpt".into()),
        tiny_config(),
    )
    .err()
    .expect("wrong shape");
    let msg = err.to_string();
    assert!(
        msg.contains("aggregator.global_blocks.1.attn.qkv.weight") && msg.contains("[3, 3]"),
        "{msg}"
    );

    let mut t = tiny_tensors();
    t.insert(
        "aggregator.extra.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = StreamVggt::new(
        &Weights::from_map(t, DType::F32, "ckpt".into()),
        tiny_config(),
    )
    .err()
    .expect("unexpected key");
    assert!(err.to_string().contains("aggregator.extra.weight"), "{err}");

    // The tiny weights do not fit the full-size config.
    let err = StreamVggt::new(
        &Weights::from_map(tiny_tensors(), DType::F32, "tiny".into()),
        VggtConfig::vggt_1b(),
    )
    .err()
    .expect("size mismatch");
    assert!(err.to_string().contains("tiny"), "{err}");
}

#[test]
fn corrupt_or_truncated_weight_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("model.safetensors")).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = StreamVggt::load(&cut, tiny_config())
        .err()
        .expect("truncated");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"not a zip").unwrap();
    let err = StreamVggt::load(&junk, tiny_config()).err().expect("junk");
    assert!(err.to_string().contains("junk.pth"), "{err}");
    let err = StreamVggt::load(&dir.path().join("none.safetensors"), tiny_config())
        .err()
        .expect("missing");
    assert!(err.to_string().contains("none.safetensors"), "{err}");
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"model_config": {"patch_size": 14}}"#).unwrap();
    let err = VggtConfig::from_json_file(&cfg).expect_err("incomplete config");
    assert!(err.to_string().contains("cfg.json"), "{err}");
}

#[test]
fn frames_of_the_wrong_size_are_errors_not_panics() {
    let model = tiny_model();
    let mut memory = model.new_stream(None);
    let dev = Device::Cpu;
    let ok = Tensor::full(0.5f32, (1, 3, 56, 70), &dev).unwrap();
    model.step(&ok, 0, &mut memory, &mut |_, _| {}).unwrap();
    for shape in [
        (1, 3, 56, 84),
        (1, 3, 50, 70),
        (1, 4, 56, 70),
        (2, 3, 56, 70),
    ] {
        let t = Tensor::full(0.5f32, shape, &dev).unwrap();
        let err = model.step(&t, 1, &mut memory, &mut |_, _| {}).err();
        assert!(err.is_some(), "{shape:?} accepted");
    }
    // The stream goes on after a rejected frame.
    model.step(&ok, 1, &mut memory, &mut |_, _| {}).unwrap();
    assert_eq!(memory.global[0].len(), 50);
}

#[test]
fn model_run_command_reproduces_the_reference_pruned_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["model", "run", "--model-config"])
        .arg(fixture("config.json"))
        .arg("--weights")
        .arg(fixture("model.safetensors"))
        .arg("--frames")
        .arg(format!(
            "{}:input.images",
            fixture("io.safetensors").display()
        ))
        .args(["--total-budget", "200", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let ours = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    let mut compared = 0;
    for (k, t) in &ours {
        let r = &reference[&format!("pruned.{k}")];
        assert_eq!(t.dims(), r.dims(), "{k}");
        if t.dtype() == DType::I64 {
            let a: Vec<i64> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<i64> = r.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        } else {
            let d = (t - r)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let m = r.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let ratio = d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-30);
            assert!(ratio <= 1e-4, "{k}: {ratio}");
        }
        compared += 1;
    }
    assert_eq!(compared, 6 * 16, "every per-frame tensor of the 6 frames");
    let err = Command::new(env!("CARGO_BIN_EXE_streamrecon"))
        .args(["model", "run", "--weights"])
        .arg(fixture("model.safetensors"))
        .arg("--model-config")
        .arg(fixture("config.json"))
        .arg("--frames")
        .arg(format!("{}:no.such", fixture("io.safetensors").display()))
        .arg("--out")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no.such"));
}

#[test]
fn engine_maps_outputs_to_the_frame_resolution() {
    let mut engine = VggtEngine::from_model(tiny_model(), None, CameraCache::Window(8));
    for (w, h) in [(160u32, 120u32), (90, 200)] {
        engine.reset();
        for i in 0..3u64 {
            let image = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 3 + i as u32 * 5) as u8,
                    (y * 2) as u8,
                    ((x + y) % 256) as u8,
                ])
            });
            let frame = Frame {
                index: i,
                source_index: i,
                timestamp: i as f64 / 30.0,
                image,
                intrinsics: None,
                gt: None,
            };
            let g = engine.push(&frame, None).unwrap().pop().unwrap();
            assert_eq!((g.intrinsics.width, g.intrinsics.height), (w, h));
            let depth = g.depth.unwrap();
            let conf = g.confidence.unwrap();
            assert_eq!(depth.len(), (w * h) as usize);
            assert!(conf.iter().all(|c| (0.0..=1.0).contains(c)));
            assert!(depth.iter().all(|d| d.is_finite() && *d >= 0.0));
            // The portrait frame is centre-cropped: its top and bottom rows have no depth.
            let filled = depth.iter().filter(|d| **d > 0.0).count();
            if h > w {
                assert!(filled < depth.len() && filled > depth.len() / 3, "{filled}");
            } else {
                assert_eq!(filled, depth.len());
            }
            assert!(g.intrinsics.fx.is_finite() && g.intrinsics.fx > 0.0);
        }
        assert_eq!(
            engine.memory().global[0].len(),
            3 * engine.memory().tokens_per_frame.unwrap()
        );
    }
}

fn fixture_frames() -> Vec<Tensor> {
    let t = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    let images = &t["input.images"];
    (0..images.dim(0).unwrap())
        .map(|i| images.get(i).unwrap().unsqueeze(0).unwrap())
        .collect()
}

#[test]
fn bounded_camera_cache_equals_the_reference_until_the_window_fills() {
    let model = tiny_model();
    let frames = fixture_frames();
    let run = |cache: CameraCache| -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut m = model.new_stream(None);
        m.camera_cache = cache;
        let mut poses = Vec::new();
        let mut lens = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let o = model.step(f, i, &mut m, &mut |_, _| {}).unwrap();
            poses.push(o.pose_enc);
            lens.push(o.camera_kv_len[0]);
        }
        (poses, lens)
    };
    let (reference, ref_lens) = run(CameraCache::Reference);
    let (windowed, lens) = run(CameraCache::Window(2));
    assert_eq!(ref_lens, vec![4, 8, 12, 16, 20, 24]);
    // Frame 0's 4 entries plus the 2 most recent frames' 8.
    assert_eq!(lens, vec![4, 8, 12, 12, 12, 12]);
    let max_abs = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    for i in 0..3 {
        assert!(max_abs(&reference[i], &windowed[i]) == 0.0, "frame {i}");
    }
    for i in 3..6 {
        let d = max_abs(&reference[i], &windowed[i]);
        let scale = reference[i].iter().fold(0f32, |m, v| m.max(v.abs()));
        println!(
            "camera window 2 vs reference, frame {i}: max |Δ pose_enc| = {d:.3e} ({:.3e} of max)",
            d / scale
        );
        assert!(
            d > 0.0,
            "frame {i}: the window must change what the head sees"
        );
    }
}

#[test]
fn a_restored_snapshot_continues_bit_for_bit() {
    let frames = fixture_frames();
    let dir = tempfile::tempdir().unwrap();
    for (budget, cache) in [
        (None, CameraCache::Reference),
        (Some(200), CameraCache::Window(2)),
    ] {
        let mut whole = VggtEngine::from_model(tiny_model(), budget, cache);
        let mut first = VggtEngine::from_model(tiny_model(), budget, cache);
        let mut resumed = VggtEngine::from_model(tiny_model(), None, CameraCache::Reference);
        let snap = dir.path().join("snap.safetensors");
        let frame = |i: usize| {
            let t = (frames[i].squeeze(0).unwrap() * 255.0)
                .unwrap()
                .round()
                .unwrap();
            let v: Vec<f32> = t
                .permute((1, 2, 0))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bytes: Vec<u8> = v.iter().map(|x| *x as u8).collect();
            Frame {
                index: i as u64,
                source_index: i as u64,
                timestamp: i as f64,
                image: image::RgbImage::from_raw(70, 56, bytes).unwrap(),
                intrinsics: None,
                gt: None,
            }
        };
        let mut expected = Vec::new();
        for i in 0..6 {
            expected.push(whole.push(&frame(i), None).unwrap().remove(0));
        }
        for i in 0..3 {
            first.push(&frame(i), None).unwrap();
        }
        assert!(first.snapshot(&snap, 3, None).unwrap());
        drop(first);
        assert_eq!(resumed.restore(&snap).unwrap(), 3);
        for (i, want) in expected.iter().enumerate().skip(3) {
            let got = resumed.push(&frame(i), None).unwrap().remove(0);
            assert_eq!(got.depth, want.depth, "frame {i} depth ({budget:?})");
            assert_eq!(got.confidence, want.confidence, "frame {i} confidence");
            assert_eq!(got.world_from_cam, want.world_from_cam, "frame {i} pose");
            assert_eq!(
                got.memory.as_ref().unwrap().tokens_per_layer,
                want.memory.as_ref().unwrap().tokens_per_layer
            );
        }
        // Snapshots of another model size, and damaged files, are refused with the file named.
        let mut other = VggtEngine::from_model(
            StreamVggt::new(&Weights::random(1, DType::F32), VggtConfig::small()).unwrap(),
            None,
            CameraCache::Reference,
        );
        let err = other.restore(&snap).unwrap_err().to_string();
        assert!(err.contains("snap.safetensors"), "{err}");
        let bytes = std::fs::read(&snap).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        assert!(resumed
            .restore(&cut)
            .unwrap_err()
            .to_string()
            .contains("cut.safetensors"));
    }
}

#[test]
fn pipeline_run_with_vggt_resumes_from_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_streamrecon");
    let data = dir.path().join("data");
    let ok = Command::new(bin)
        .args(["synth", "--frames", "12", "--size", "160x120", "--out"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(ok.success());
    let run = |out: &str, extra: &[&str]| {
        let o = Command::new(bin)
            .arg("run")
            .arg(&data)
            .arg("--weights")
            .arg(fixture("model.safetensors"))
            .arg("--model-config")
            .arg(fixture("config.json"))
            .args(["--total-budget", "200", "--camera-window", "2", "--out"])
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(dir.path().join(out).join("trajectory.txt")).unwrap()
    };
    let whole = run("whole", &[]);
    let first = run("first", &["--max-frames", "6", "--snapshot-every", "4"]);
    let snap = dir.path().join("first").join("snapshot.safetensors");
    assert!(
        snap.exists(),
        "the final snapshot of an ended run is written"
    );
    let rest = run("rest", &["--resume", snap.to_str().unwrap()]);
    let lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let (whole, first, rest) = (lines(&whole), lines(&first), lines(&rest));
    assert_eq!(whole.len(), 12);
    assert_eq!(first.len(), 6);
    // Resumed into a folder of its own, the run takes the poses before the snapshot from the
    // first run's checkpoint.
    assert_eq!(rest, whole, "the resumed run continues bit for bit");
    let run_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("rest/run.json")).unwrap()).unwrap();
    let mem = &run_json["model_memory"];
    assert_eq!(mem["per_frame"].as_array().unwrap().len(), 6);
    assert!(mem["last"]["tokens_per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_u64().unwrap() <= 200));
}

#[test]
fn half_precision_runs_and_stays_close_to_f32() {
    let frames = fixture_frames();
    let cfg = tiny_config();
    let f32_model = tiny_model();
    let err = StreamVggt::new(
        &Weights::from_map(tiny_tensors(), DType::BF16, "tiny".into()),
        cfg.clone(),
    )
    .err()
    .expect("bf16 on the CPU");
    assert!(err.to_string().contains("bf16"), "{err}");
    for dtype in [DType::F16] {
        let half = StreamVggt::new(
            &Weights::from_map(tiny_tensors(), dtype, "tiny".into()),
            cfg.clone(),
        )
        .unwrap();
        let (mut a, mut b) = (f32_model.new_stream(None), half.new_stream(None));
        let mut worst = 0f32;
        for (i, f) in frames.iter().enumerate() {
            let x = f32_model.step(f, i, &mut a, &mut |_, _| {}).unwrap();
            let y = half.step(f, i, &mut b, &mut |_, _| {}).unwrap();
            assert_eq!(y.depth.dtype(), dtype);
            let scale = x.pose_enc.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = x
                .pose_enc
                .iter()
                .zip(&y.pose_enc)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            worst = worst.max(d / scale);
        }
        println!("{dtype:?} vs f32 over the 6 fixture frames: max |Δ pose_enc| / max|pose_enc| = {worst:.3e}");
        assert!(worst < 0.1, "{dtype:?}: {worst}");
    }
}

/// A textured frame whose content is shifted by `shift` pixels (0 = the base view).
fn scene_frame(i: u64, shift: u32, w: u32, h: u32) -> Frame {
    Frame {
        index: i,
        source_index: i,
        timestamp: i as f64,
        image: image::RgbImage::from_fn(w, h, |x, y| {
            let xs = f64::from(x + shift);
            let v = 128.0
                + 70.0 * (xs / 9.0).sin() * (f64::from(y) / 7.0).cos()
                + 30.0 * ((xs * 0.13 + f64::from(y) * 0.11).sin());
            let v = v.clamp(0.0, 255.0) as u8;
            image::Rgb([v, 255 - v, v / 2])
        }),
        intrinsics: None,
        gt: None,
    }
}

#[test]
fn adaptive_memory_skips_near_duplicates_and_stays_in_budget() {
    let mut engine = VggtEngine::from_model(tiny_model(), Some(200), CameraCache::Window(4));
    engine.set_update(MemoryUpdate::Adaptive {
        threshold: 0.1,
        gamma: 0.2,
    });
    let shifts = [0, 0, 12, 12, 24, 24, 40, 40, 60];
    // Repeats differ from their original by sensor-like ±2 noise: near-duplicates, not copies.
    let near = |i: usize, s: u32| {
        let mut f = scene_frame(i as u64, s, 70, 56);
        if i > 0 && shifts[i - 1] == s {
            for (k, p) in f.image.pixels_mut().enumerate() {
                let d = [0u8, 1, 2, 1][k % 4];
                p.0 = p.0.map(|c| c.saturating_add(d));
            }
        }
        f
    };
    let mut admitted = Vec::new();
    for (i, &s) in shifts.iter().enumerate() {
        let g = engine.push(&near(i, s), None).unwrap().remove(0);
        let m = g.memory.unwrap();
        admitted.push(m.admitted);
        let held: usize = m.tokens_per_layer.iter().sum();
        assert!(
            held <= 200,
            "frame {i}: {held} tokens held over a budget of 200"
        );
        println!(
            "frame {i} shift {s}: w = {:.3}, admitted {}, tokens {:?}",
            m.novelty.unwrap(),
            m.admitted,
            m.tokens_per_layer
        );
    }
    // Repeats of the previous view are not stored; new views are.
    assert_eq!(
        admitted,
        vec![true, false, true, false, true, false, true, false, true]
    );
    // Uniform updates store everything (the reference behaviour).
    let mut uniform = VggtEngine::from_model(tiny_model(), None, CameraCache::Window(4));
    for (i, &s) in shifts.iter().enumerate() {
        let g = uniform
            .push(&scene_frame(i as u64, s, 70, 56), None)
            .unwrap()
            .remove(0);
        assert!(g.memory.unwrap().admitted);
    }
    assert_eq!(uniform.memory().global[0].len(), 25 * shifts.len());
}

#[test]
fn novel_frames_tokens_outlive_redundant_ones() {
    // Frame 4 is a new view after small steps, followed by small steps; everything is admitted
    // (threshold 0) and the budget forces evictions. Count frame 4's entries left at the end.
    let shifts = [0, 1, 2, 3, 30, 31, 32, 33, 34];
    let survivors = |update: MemoryUpdate| -> usize {
        let mut e = VggtEngine::from_model(tiny_model(), Some(240), CameraCache::Window(4));
        e.set_update(update);
        for (i, &s) in shifts.iter().enumerate() {
            e.push(&scene_frame(i as u64, s, 70, 56), None).unwrap();
        }
        e.memory()
            .global
            .iter()
            .flat_map(|l| l.ids().iter().flatten())
            .filter(|&&id| id / 25 == 4)
            .count()
    };
    let uniform = survivors(MemoryUpdate::Uniform);
    let adaptive = survivors(MemoryUpdate::Adaptive {
        threshold: 0.0,
        gamma: 1.0,
    });
    println!(
        "frame 4 entries surviving (all layers, all heads): uniform {uniform}, adaptive {adaptive}"
    );
    assert!(
        adaptive > uniform,
        "adaptive {adaptive} vs uniform {uniform}"
    );
}
