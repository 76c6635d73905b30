//! The `dis` engine against plain two-frame OpenCV DIS on synthetic sequences with exact flow:
//! EPE and time per pair for each preset, and throughput at 640×480 and 1024×436. Plain DIS
//! runs each preset as OpenCV defines it, and so does the engine (its finest level is the
//! preset's); its "no refinement" and "bare" runs check, fuse and fill on DIS's own grid; "no spatial
//! fill" runs show what the edge-aware fill (`spatial.rs`) changes. The engine runs on its default
//! DIS (ours, `inverse_search.rs`); "on OpenCV's DIS" repeats a run with `--dis-backend opencv`
//! (whose "bare" run, with none of the multi-frame steps, gives OpenCV's flow bit for bit).
//!
//! `cargo bench --bench flow_dis [-- FRAMES]` (default 40 per sequence).

use std::time::Instant;

use opencv::prelude::*;
use streamrecon::datasets::synth::{SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::flow::dis::{
    flow_from_mat, grey_mat, DisBackend, DisConfig, DisEngine, DisPreset,
};
use streamrecon::flow::metrics::FlowMetricsAcc;
use streamrecon::flow::{FlowEngine, FlowField};
use streamrecon::frame::Frame;

// The binary's allocator (jemalloc, configured in .cargo/config.toml), so the engine's times
// include what its per-frame buffers cost in `streamrecon flow` and `run`.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Seq {
    frames: Vec<image::RgbImage>,
    /// Forward ground truth of pair i (frame i → i + 1) and its occlusion.
    gt: Vec<(FlowField, Vec<bool>)>,
    /// Backward ground truth of pair i (frame i + 1 → i).
    gt_bwd: Vec<(FlowField, Vec<bool>)>,
}

fn sequence(traj: TrajectoryKind, frames: usize, w: u32, h: u32) -> Seq {
    let world = SynthWorld::new(SynthConfig {
        scene: SceneKind::Room,
        trajectory: traj,
        frames,
        width: w,
        height: h,
        seed: 17,
        ..SynthConfig::default()
    });
    let mut s = Seq {
        frames: Vec::new(),
        gt: Vec::new(),
        gt_bwd: Vec::new(),
    };
    for f in world.frames() {
        s.frames.push(f.image);
        if let Some(g) = f.flow_fwd {
            s.gt.push(g);
        }
        if let Some(g) = f.flow_bwd {
            s.gt_bwd.push(g);
        }
    }
    s
}

fn frame(i: usize, img: &image::RgbImage) -> Frame {
    Frame {
        index: i as u64,
        source_index: i as u64,
        timestamp: i as f64 / 30.0,
        image: img.clone(),
        intrinsics: None,
        gt: None,
    }
}

fn opencv_preset(preset: DisPreset) -> i32 {
    match preset {
        DisPreset::Ultrafast => opencv::video::DISOpticalFlow_PRESET_ULTRAFAST,
        DisPreset::Fast => opencv::video::DISOpticalFlow_PRESET_FAST,
        DisPreset::Medium => opencv::video::DISOpticalFlow_PRESET_MEDIUM,
    }
}

/// Plain two-frame OpenCV DIS, forward only, one pair at a time, on `threads` of OpenCV's own
/// threads: (EPE, ms per pair). Timed from the RGB frame, grey conversion included, as the
/// engine is.
fn plain(seq: &Seq, preset: DisPreset, threads: i32) -> (f64, f64) {
    opencv::core::set_num_threads(threads).expect("threads");
    let mut dis = opencv::video::DISOpticalFlow::create(opencv_preset(preset)).expect("DIS");
    let mut acc = FlowMetricsAcc::default();
    let mut ms = 0.0;
    let mut prev = grey_mat(&seq.frames[0]).expect("grey");
    for i in 0..seq.gt.len() {
        let t = Instant::now();
        let next = grey_mat(&seq.frames[i + 1]).expect("grey");
        let mut flow = opencv::core::Mat::default();
        dis.calc(&prev, &next, &mut flow).expect("calc");
        ms += t.elapsed().as_secs_f64() * 1e3;
        let f = flow_from_mat(&flow).expect("flow");
        acc.add(&seq.gt[i].0, &f, None, Some(&seq.gt[i].1))
            .expect("metrics");
        prev = next;
    }
    (acc.finish().epe, ms / seq.gt.len() as f64)
}

/// Plain OpenCV DIS in both directions, each on its own core (the outputs the engine gives):
/// ms per pair.
fn plain_both(seq: &Seq, preset: DisPreset) -> f64 {
    opencv::core::set_num_threads(1).expect("threads");
    let p = opencv_preset(preset);
    let mut f = opencv::video::DISOpticalFlow::create(p).expect("DIS");
    let mut b = opencv::video::DISOpticalFlow::create(p).expect("DIS");
    let mut ms = 0.0;
    let mut prev = grey_mat(&seq.frames[0]).expect("grey");
    for i in 0..seq.gt.len() {
        let t = Instant::now();
        let next = grey_mat(&seq.frames[i + 1]).expect("grey");
        let (mut ff, mut bf) = (opencv::core::Mat::default(), opencv::core::Mat::default());
        rayon::join(
            || f.calc(&prev, &next, &mut ff).expect("calc"),
            || b.calc(&next, &prev, &mut bf).expect("calc"),
        );
        ms += t.elapsed().as_secs_f64() * 1e3;
        prev = next;
    }
    ms / seq.gt.len() as f64
}

struct EngineRun {
    epe: f64,
    epe_noc: f64,
    epe_occ: f64,
    bwd_epe: f64,
    ms: f64,
}

/// The engine (forward + backward + confidence), every pair it returns scored against the
/// ground truth, flush included.
fn engine(seq: &Seq, config: DisConfig) -> EngineRun {
    let mut e = DisEngine::new(config).expect("engine");
    let mut acc = FlowMetricsAcc::default();
    let mut acc_bwd = FlowMetricsAcc::default();
    let mut ms = 0.0;
    let mut score = |pairs: Vec<streamrecon::flow::PairFlow>| {
        for p in pairs {
            let (g, gb) = (&seq.gt[p.from as usize], &seq.gt_bwd[p.from as usize]);
            acc.add(&g.0, &p.fwd, None, Some(&g.1)).expect("metrics");
            acc_bwd
                .add(&gb.0, &p.bwd, None, Some(&gb.1))
                .expect("metrics");
        }
    };
    for (i, img) in seq.frames.iter().enumerate() {
        let fr = frame(i, img);
        let t = Instant::now();
        let pairs = e.push(&fr).expect("push");
        ms += t.elapsed().as_secs_f64() * 1e3;
        score(pairs);
    }
    let t = Instant::now();
    let pairs = e.flush().expect("flush");
    ms += t.elapsed().as_secs_f64() * 1e3;
    score(pairs);
    let m = acc.finish();
    EngineRun {
        epe: m.epe,
        epe_noc: m.epe_noc,
        epe_occ: m.epe_occ,
        bwd_epe: acc_bwd.finish().epe,
        ms: ms / (seq.frames.len() - 1) as f64,
    }
}

fn config(preset: DisPreset) -> DisConfig {
    DisConfig {
        preset,
        ..DisConfig::default()
    }
}

fn main() {
    let frames: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    for traj in [TrajectoryKind::Smooth, TrajectoryKind::Handheld] {
        let seq = sequence(traj, frames, 640, 480);
        for preset in [DisPreset::Ultrafast, DisPreset::Fast, DisPreset::Medium] {
            let (pe, pt2) = plain(&seq, preset, 2);
            let (_, pt1) = plain(&seq, preset, 1);
            let pbt = plain_both(&seq, preset);
            let d = engine(&seq, config(preset));
            let ahead = engine(
                &seq,
                DisConfig {
                    look_ahead: true,
                    ..config(preset)
                },
            );
            let no_fill = engine(
                &seq,
                DisConfig {
                    temporal_fill: false,
                    ..config(preset)
                },
            );
            let no_spatial = engine(
                &seq,
                DisConfig {
                    spatial_fill: None,
                    ..config(preset)
                },
            );
            let no_refine_spatial = engine(
                &seq,
                DisConfig {
                    refine_iterations: 0,
                    spatial_fill: None,
                    ..config(preset)
                },
            );
            let no_refine = engine(
                &seq,
                DisConfig {
                    refine_iterations: 0,
                    ..config(preset)
                },
            );
            let no_refine_cv = engine(
                &seq,
                DisConfig {
                    refine_iterations: 0,
                    backend: DisBackend::Opencv,
                    ..config(preset)
                },
            );
            let bare = engine(
                &seq,
                DisConfig {
                    refine_iterations: 0,
                    temporal_fill: false,
                    spatial_fill: None,
                    symmetric_fusion: false,
                    temporal_prior: false,
                    ..config(preset)
                },
            );
            let bare_cv = engine(
                &seq,
                DisConfig {
                    backend: DisBackend::Opencv,
                    refine_iterations: 0,
                    temporal_fill: false,
                    spatial_fill: None,
                    symmetric_fusion: false,
                    temporal_prior: false,
                    ..config(preset)
                },
            );
            println!(
                "{traj:?} 640x480 {preset:?}: plain DIS forward EPE {pe:.3}; {pt2:.1} ms on OpenCV's 2 threads, {pt1:.1} ms on 1; forward+backward on 2 cores {pbt:.1} ms\n  \
                 engine default: EPE {:.3} (noc {:.3}, occluded {:.3}), backward EPE {:.3}, {:.1} ms: EPE ratio {:.3}; time ratio {:.2} vs plain on 2 threads, {:.2} vs 1, {:.2} vs forward+backward\n  \
                 no refinement: EPE {:.3} (ratio {:.3}), backward EPE {:.3}, {:.2} ms: time ratio {:.2} vs plain on 2 threads, {:.2} vs forward+backward | on OpenCV's DIS: EPE {:.3}, {:.2} ms\n  \
                 no spatial fill: EPE {:.3}, backward EPE {:.3}, {:.1} ms | neither refinement nor spatial fill: EPE {:.3}, backward EPE {:.3}, {:.2} ms\n  \
                 look-ahead: EPE {:.3}, backward EPE {:.3}, {:.1} ms | no temporal fill: EPE {:.3}, {:.1} ms | bare (no prior, fusion, refinement, fill): EPE {:.3}, {:.2} ms; on OpenCV's DIS EPE {:.3}, {:.2} ms",
                d.epe, d.epe_noc, d.epe_occ, d.bwd_epe, d.ms,
                d.epe / pe,
                d.ms / pt2,
                d.ms / pt1,
                d.ms / pbt,
                no_refine.epe, no_refine.epe / pe, no_refine.bwd_epe, no_refine.ms,
                no_refine.ms / pt2, no_refine.ms / pbt,
                no_refine_cv.epe, no_refine_cv.ms,
                no_spatial.epe, no_spatial.bwd_epe, no_spatial.ms,
                no_refine_spatial.epe, no_refine_spatial.bwd_epe, no_refine_spatial.ms,
                ahead.epe, ahead.bwd_epe, ahead.ms,
                no_fill.epe, no_fill.ms,
                bare.epe, bare.ms,
                bare_cv.epe, bare_cv.ms,
            );
        }
    }
    for (w, h) in [(640, 480), (1024, 436)] {
        let seq = sequence(TrajectoryKind::Smooth, frames.min(30), w, h);
        for preset in [DisPreset::Ultrafast, DisPreset::Fast, DisPreset::Medium] {
            let d = engine(&seq, config(preset));
            let bare = engine(
                &seq,
                DisConfig {
                    refine_iterations: 0,
                    temporal_fill: false,
                    spatial_fill: None,
                    ..config(preset)
                },
            );
            println!(
                "throughput {w}x{h} {preset:?}: {:.1} ms per frame (forward + backward + confidence) = {:.1} frames/s; without refinement and fills {:.1} ms = {:.1} frames/s",
                d.ms,
                1e3 / d.ms,
                bare.ms,
                1e3 / bare.ms
            );
        }
    }
}
