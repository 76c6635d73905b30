//! Speed and memory of the `vggt` model, one stream on the CPU: the tiny fixture config (56×70
//! frames, the fixture's weights) and the "small" config of issue 6 (224×224, random weights),
//! with the plain growing KV cache and with the rolling-memory budget.
//!
//! `cargo bench --bench vggt [-- FRAMES]` (default 60). Each case runs in its own process so its
//! peak RSS is its own.
//!
//! `cargo bench --bench vggt -- --soak [FRAMES]` (default 10000): the tiny model with a small total
//! budget over a long stream, with the bounded camera cache and with the reference's growing one:
//! RSS and mean per-frame time around frame 1,000 vs the end.
//!
//! Against the PyTorch reference on the same CPU: `benches/REFERENCE.md` (procedure and last
//! figures); `streamrecon model bench` is the tool for both.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use candle_core::DType;
use streamrecon::models::bench::{bench_vggt, vggt_frame};
use streamrecon::models::vggt::memory::CameraCache;
use streamrecon::models::vggt::{StreamVggt, VggtConfig};
use streamrecon::models::weights::Weights;
use streamrecon::stats::rss_mib;

const CASES: [&str; 4] = ["tiny", "tiny-pruned", "small", "small-pruned"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let soak = args.iter().any(|a| a == "--soak");
    let frames: usize =
        args.iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or(if soak { 10_000 } else { 60 });
    if let Some(case) = args.iter().find_map(|a| a.strip_prefix("--case=")) {
        if let Some(cache) = case.strip_prefix("soak-") {
            run_soak(cache, frames);
        } else {
            run_case(case, frames);
        }
        return;
    }
    let cases: &[&str] = if soak {
        &["soak-window", "soak-reference"]
    } else {
        &CASES
    };
    println!(
        "vggt, one stream, CPU, {} threads, {frames} frames",
        rayon::current_num_threads()
    );
    let exe = std::env::current_exe().expect("bench executable");
    for &case in cases {
        let status = Command::new(&exe)
            .arg(format!("--case={case}"))
            .arg(frames.to_string())
            .arg("--bench")
            .status()
            .expect("run case");
        assert!(status.success(), "case {case} failed");
    }
}

fn run_case(case: &str, frames: usize) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geometry-tiny");
    let (model, h, w) = if case.starts_with("tiny") {
        let cfg = VggtConfig::from_json_file(&fixture.join("config.json")).expect("config");
        let model = StreamVggt::load(&fixture.join("model.safetensors"), cfg).expect("weights");
        (model, 56, 70)
    } else {
        let model = StreamVggt::new(&Weights::random(0, DType::F32), VggtConfig::small())
            .expect("small model");
        (model, 224, 224)
    };
    let tokens = model.config.tokens_per_frame(h, w);
    let depth = model.config.aggregator.depth;
    // Pruned cases: room for about 10 frames per layer.
    let budget = case.ends_with("pruned").then_some(10 * tokens * depth);
    let mut ms = Vec::with_capacity(frames);
    let r = bench_vggt(&model, (w, h), frames, budget, &mut |_, t| ms.push(t)).expect("stream");
    let at = |i: usize| ms.get(i).copied().unwrap_or(f64::NAN);
    println!(
        "{case:<13} {w}×{h}, {tokens} tokens/frame: {:.2} frames/s; frame 1 {:.1} ms, frame {} {:.1} ms; \
         cache {} tokens/layer; peak RSS {:.0} MiB\n              mean ms: aggregator {:.1}, camera head {:.1}, depth head {:.1}, point head {:.1}",
        r.fps,
        at(1),
        frames.min(51) - 1,
        at(frames.min(51) - 1),
        r.kv_len_last,
        r.peak_rss_mib,
        r.stage_ms[0],
        r.stage_ms[1],
        r.stage_ms[2],
        r.stage_ms[3]
    );
}

fn run_soak(cache: &str, frames: usize) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/geometry-tiny");
    let cfg = VggtConfig::from_json_file(&fixture.join("config.json")).expect("config");
    let model = StreamVggt::load(&fixture.join("model.safetensors"), cfg).expect("weights");
    let (h, w) = (56, 70);
    let tokens = model.config.tokens_per_frame(h, w);
    let budget = 10 * tokens * model.config.aggregator.depth;
    let mut memory = model.new_stream(Some(budget));
    memory.camera_cache = if cache == "window" {
        CameraCache::Window(32)
    } else {
        CameraCache::Reference
    };
    let early = 1000.min(frames / 2);
    let mut ms = Vec::with_capacity(frames);
    let (mut rss_early, mut bytes_early) = (0.0, 0);
    for i in 0..frames {
        let img = vggt_frame(h, w, i % 200).expect("frame");
        let t0 = Instant::now();
        model
            .step(&img, i, &mut memory, &mut |_, _| {})
            .expect("step");
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if i + 1 == early {
            rss_early = rss_mib();
            bytes_early = memory.bytes();
        }
    }
    let mean = |r: std::ops::Range<usize>| ms[r.clone()].iter().sum::<f64>() / r.len() as f64;
    let (a, b) = (mean(early - 100..early), mean(frames - 100..frames));
    let rss_end = rss_mib();
    println!(
        "soak, camera cache {cache}, budget {budget}: frame {early}: {a:.2} ms/frame (mean of 100), RSS {rss_early:.1} MiB, \
         cache {:.2} MiB; frame {frames}: {b:.2} ms/frame, RSS {rss_end:.1} MiB, cache {:.2} MiB; \
         time ratio {:.3}, RSS growth {:+.2}%",
        bytes_early as f64 / f64::from(1 << 20),
        memory.bytes() as f64 / f64::from(1 << 20),
        b / a,
        (rss_end / rss_early - 1.0) * 100.0
    );
}
