//! Parity of the `vggt` model with the official InfiniteVGGT code on the tiny fixture
//! (tests/fixtures/geometry-tiny, produced by the reference; see its config.json).
//!
//! Float tensors: max|rust − ref| ≤ 1e-4 · max|ref|; integer tensors exact. The worst ratio per
//! tensor family is printed (run with `--nocapture`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use streamrecon::models::vggt::{pose, preprocess, StreamVggt, VggtConfig};
use streamrecon::models::weights::Weights;

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/geometry-tiny")
        .join(name)
}

fn io() -> HashMap<String, Tensor> {
    let bytes = std::fs::read(fixture("io.safetensors")).expect("fixture io.safetensors");
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("parse io.safetensors")
}

fn model() -> StreamVggt {
    let cfg = VggtConfig::from_json_file(&fixture("config.json")).expect("config");
    let w = Weights::load(&fixture("model.safetensors"), DType::F32).expect("weights");
    StreamVggt::new(&w, cfg).expect("model")
}

/// Worst error ratio per tensor family.
#[derive(Default)]
struct Report {
    worst: BTreeMap<String, f64>,
    failures: Vec<String>,
}

impl Report {
    fn family(name: &str) -> String {
        // stream.frame3.depth → stream.depth; frame0.agg.global_block2 → frame0.agg.global_block
        let parts: Vec<&str> = name
            .split('.')
            .filter(|p| {
                !(p.starts_with("frame")
                    && p[5..].chars().all(|c| c.is_ascii_digit())
                    && p.len() > 5)
            })
            .collect();
        parts
            .join(".")
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_string()
    }

    fn float(&mut self, name: &str, ours: &Tensor, reference: &Tensor) {
        let r = reference
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let o = match ours.flatten_all().and_then(|t| t.to_dtype(DType::F64)) {
            Ok(o) => o,
            Err(e) => {
                self.failures.push(format!("{name}: {e}"));
                return;
            }
        };
        if ours.dims() != reference.dims() {
            self.failures.push(format!(
                "{name}: shape {:?} vs reference {:?}",
                ours.dims(),
                reference.dims()
            ));
            return;
        }
        let max_ref = r.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        let diff = (o - &r)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let ratio = if max_ref > 0.0 { diff / max_ref } else { diff };
        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
        let w = self.worst.entry(Self::family(name)).or_insert(0.0);
        *w = w.max(ratio);
        if ratio > TOL {
            self.failures.push(format!(
                "{name}: max|Δ|/max|ref| = {ratio:.3e} (max|ref| {max_ref:.3e})"
            ));
        }
    }

    fn ints(&mut self, name: &str, ours: &[i64], reference: &Tensor) {
        let r: Vec<i64> = reference.flatten_all().unwrap().to_vec1().unwrap();
        self.worst.entry(Self::family(name)).or_insert(0.0);
        if ours != r.as_slice() {
            self.failures
                .push(format!("{name}: {ours:?} vs reference {r:?}"));
            *self.worst.get_mut(&Self::family(name)).unwrap() = f64::INFINITY;
        }
    }

    fn finish(self, run: &str) {
        println!("worst max|rust − ref| / max|ref| per tensor family ({run}):");
        for (k, v) in &self.worst {
            println!("  {k:<40} {v:.3e}");
        }
        assert!(
            self.failures.is_empty(),
            "{} mismatches:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

fn run(run: &str, total_budget: usize, check_intermediates: bool) {
    let io = io();
    let model = model();
    let images = &io["input.images"];
    let frames = images.dim(0).unwrap();
    let mut memory = model.new_stream(Some(total_budget));
    let mut rep = Report::default();
    let mut encs = Vec::new();
    for i in 0..frames {
        let img = images.get(i).unwrap().unsqueeze(0).unwrap();
        let mut taps: HashMap<String, Tensor> = HashMap::new();
        let mut tap = |name: &str, t: &Tensor| {
            if i == 0 && check_intermediates {
                taps.insert(name.to_string(), t.clone());
            }
        };
        let out = model.step(&img, i, &mut memory, &mut tap).expect("step");
        let p = format!("{run}.frame{i}");
        rep.float(
            &format!("{p}.pose_enc"),
            &Tensor::new(out.pose_enc.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            &io[&format!("{p}.pose_enc")],
        );
        for (name, t) in [
            ("pose_enc_iters", &out.pose_enc_iters),
            ("depth", &out.depth),
            ("depth_conf", &out.depth_conf),
            ("world_points", &out.world_points),
            ("world_points_conf", &out.world_points_conf),
            ("tokens_last", &out.tokens_last),
        ] {
            rep.float(&format!("{p}.{name}"), t, &io[&format!("{p}.{name}")]);
        }
        for (l, len) in out.kv_len.iter().enumerate() {
            rep.ints(
                &format!("{p}.kv_len.layer{l}"),
                &[*len as i64],
                &io[&format!("{p}.kv_len.layer{l}")],
            );
            let ids: Vec<i64> = memory.global[l].ids().concat();
            rep.ints(
                &format!("{p}.kept_ids.layer{l}"),
                &ids,
                &io[&format!("{p}.kept_ids.layer{l}")],
            );
        }
        for (t, len) in out.camera_kv_len.iter().enumerate() {
            rep.ints(
                &format!("{p}.camera_kv_len.layer{t}"),
                &[*len as i64],
                &io[&format!("{p}.camera_kv_len.layer{t}")],
            );
        }
        rep.ints(
            &format!("{p}.budget"),
            &out.budgets,
            &io[&format!("{p}.budget")],
        );
        let scores = Tensor::new(memory.last_scores.as_slice(), &Device::Cpu).unwrap();
        rep.float(
            &format!("{p}.last_scores"),
            &scores,
            &io[&format!("{p}.last_scores")],
        );
        if i == 0 && check_intermediates {
            for (k, reference) in io.iter().filter(|(k, _)| k.starts_with("frame0.")) {
                let name = k.trim_start_matches("frame0.");
                match taps.get(name) {
                    Some(t) => rep.float(k, t, reference),
                    None => rep
                        .failures
                        .push(format!("{k}: no such intermediate in the port")),
                }
            }
        }
        encs.push(out.pose_enc.clone());
    }
    for (l, layer) in memory.global.iter().enumerate() {
        let (k, v) = layer.kv().expect("cache");
        rep.float(
            &format!("{run}.final.kv.layer{l}.k"),
            &k,
            &io[&format!("{run}.final.kv.layer{l}.k")],
        );
        rep.float(
            &format!("{run}.final.kv.layer{l}.v"),
            &v,
            &io[&format!("{run}.final.kv.layer{l}.v")],
        );
    }
    for (t, layer) in memory.camera.iter().enumerate() {
        let (k, v) = layer.kv().expect("cache");
        rep.float(
            &format!("{run}.final.camera_kv.layer{t}.k"),
            &k,
            &io[&format!("{run}.final.camera_kv.layer{t}.k")],
        );
        rep.float(
            &format!("{run}.final.camera_kv.layer{t}.v"),
            &v,
            &io[&format!("{run}.final.camera_kv.layer{t}.v")],
        );
    }
    let (h, w) = (images.dim(2).unwrap(), images.dim(3).unwrap());
    let mut ext = Vec::new();
    let mut intr = Vec::new();
    for e in &encs {
        ext.extend(pose::extrinsic_from_pose_enc(e).iter().flatten().copied());
        let k = pose::intrinsics_from_pose_enc(e, h, w);
        intr.extend([
            k.fx as f32,
            0.0,
            k.cx as f32,
            0.0,
            k.fy as f32,
            k.cy as f32,
            0.0,
            0.0,
            1.0,
        ]);
    }
    let dev = Device::Cpu;
    rep.float(
        &format!("{run}.extrinsic"),
        &Tensor::from_vec(ext, (1, frames, 3, 4), &dev).unwrap(),
        &io[&format!("{run}.extrinsic")],
    );
    rep.float(
        &format!("{run}.intrinsic"),
        &Tensor::from_vec(intr, (1, frames, 3, 3), &dev).unwrap(),
        &io[&format!("{run}.intrinsic")],
    );
    rep.finish(run);
}

#[test]
fn stream_run_matches_reference_with_frame0_intermediates() {
    run("stream", 1_200_000, true);
}

#[test]
fn pruned_run_matches_reference() {
    run("pruned", 200, false);
}

#[test]
fn preprocessing_matches_pil_reference() {
    let bytes = std::fs::read(fixture("preprocess.safetensors")).unwrap();
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let mut cases = 0;
    for case in 0.. {
        let Some(input) = t.get(&format!("preprocess.case{case}.input_u8")) else {
            break;
        };
        let expected = &t[&format!("preprocess.case{case}.output_u8")];
        let (h, w, c) = input.dims3().unwrap();
        let data: Vec<u8> = input.flatten_all().unwrap().to_vec1().unwrap();
        let rgb = if c == 4 {
            let rgba = image::RgbaImage::from_raw(w as u32, h as u32, data).unwrap();
            preprocess::composite_on_white(&rgba)
        } else {
            image::RgbImage::from_raw(w as u32, h as u32, data).unwrap()
        };
        let (ours, oh, ow) = preprocess::preprocess_crop_u8(&rgb, 518, 14).unwrap();
        assert_eq!(&[1, 3, oh, ow], expected.dims(), "case {case} shape");
        let reference: Vec<u8> = expected.flatten_all().unwrap().to_vec1().unwrap();
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let exact = ours.iter().zip(&reference).filter(|(a, b)| a == b).count();
        println!(
            "preprocess case {case}: {w}×{h}×{c} → {ow}×{oh}, max |Δ| = {worst}/255, {exact}/{} exact",
            ours.len()
        );
        assert!(worst <= 1, "case {case}: max difference {worst}/255");
        cases += 1;
    }
    assert!(cases >= 2, "fixture has {cases} preprocessing cases");
}
