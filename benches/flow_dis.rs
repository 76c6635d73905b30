//! The `dis` engine against plain two-frame OpenCV DIS on synthetic sequences with exact flow:
//! EPE and time per pair for each preset, and throughput at 640×480 and 1024×436.
//!
//! `cargo bench --bench flow_dis [-- FRAMES]` (default 40 per sequence).

use std::time::Instant;

use opencv::prelude::*;
use streamrecon::datasets::synth::{SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::flow::dis::{flow_from_mat, grey_mat, DisConfig, DisEngine, DisPreset};
use streamrecon::flow::metrics::FlowMetricsAcc;
use streamrecon::flow::{FlowEngine, FlowField};
use streamrecon::frame::Frame;

struct Seq {
    frames: Vec<image::RgbImage>,
    gt: Vec<(FlowField, Vec<bool>)>,
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
    };
    for f in world.frames() {
        s.frames.push(f.image);
        if let Some(g) = f.flow_fwd {
            s.gt.push(g);
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

fn greys(seq: &Seq) -> Vec<opencv::core::Mat> {
    seq.frames
        .iter()
        .map(|f| grey_mat(f).expect("grey"))
        .collect()
}

/// Plain OpenCV DIS, forward only, one pair at a time: (EPE, EPE noc, ms per pair).
fn plain(seq: &Seq, preset: DisPreset) -> (f64, f64, f64) {
    let p = opencv_preset(preset);
    let mut dis = opencv::video::DISOpticalFlow::create(p).expect("DIS");
    let greys = greys(seq);
    let mut acc = FlowMetricsAcc::default();
    let mut ms = 0.0;
    for i in 0..seq.gt.len() {
        let t = Instant::now();
        let mut flow = opencv::core::Mat::default();
        dis.calc(&greys[i], &greys[i + 1], &mut flow).expect("calc");
        ms += t.elapsed().as_secs_f64() * 1e3;
        let f = flow_from_mat(&flow).expect("flow");
        acc.add(&seq.gt[i].0, &f, None, Some(&seq.gt[i].1))
            .expect("metrics");
    }
    let m = acc.finish();
    (m.epe, m.epe_noc, ms / seq.gt.len() as f64)
}

/// Iterations of the engine's optional full-resolution refinement measured here.
const REFINE: u32 = 5;

/// Plain OpenCV DIS in both directions, each on its own core (what the engine's confidence
/// needs): (forward EPE, ms per pair).
fn plain_both(seq: &Seq, preset: DisPreset) -> (f64, f64) {
    let p = opencv_preset(preset);
    let mut f = opencv::video::DISOpticalFlow::create(p).expect("DIS");
    let mut b = opencv::video::DISOpticalFlow::create(p).expect("DIS");
    let greys = greys(seq);
    let mut acc = FlowMetricsAcc::default();
    let mut ms = 0.0;
    for i in 0..seq.gt.len() {
        let t = Instant::now();
        let (mut ff, mut bf) = (opencv::core::Mat::default(), opencv::core::Mat::default());
        rayon::join(
            || f.calc(&greys[i], &greys[i + 1], &mut ff).expect("calc"),
            || b.calc(&greys[i + 1], &greys[i], &mut bf).expect("calc"),
        );
        ms += t.elapsed().as_secs_f64() * 1e3;
        let fl = flow_from_mat(&ff).expect("flow");
        acc.add(&seq.gt[i].0, &fl, None, Some(&seq.gt[i].1))
            .expect("metrics");
    }
    (acc.finish().epe, ms / seq.gt.len() as f64)
}

/// The engine (forward + backward + confidence): (EPE, EPE noc, ms per frame).
fn engine(seq: &Seq, preset: DisPreset, prior: bool, fusion: bool, refine: u32) -> (f64, f64, f64) {
    let mut e = DisEngine::new(DisConfig {
        preset,
        temporal_prior: prior,
        symmetric_fusion: fusion,
        refine_iterations: refine,
        ..DisConfig::default()
    })
    .expect("engine");
    let mut acc = FlowMetricsAcc::default();
    let mut ms = 0.0;
    for (i, img) in seq.frames.iter().enumerate() {
        let fr = frame(i, img);
        let t = Instant::now();
        let pairs = e.push(&fr).expect("push");
        ms += t.elapsed().as_secs_f64() * 1e3;
        for p in pairs {
            let g = &seq.gt[p.from as usize];
            acc.add(&g.0, &p.fwd, None, Some(&g.1)).expect("metrics");
        }
    }
    let m = acc.finish();
    (m.epe, m.epe_noc, ms / (seq.frames.len() - 1) as f64)
}

fn main() {
    let frames: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40);
    for traj in [TrajectoryKind::Smooth, TrajectoryKind::Handheld] {
        let seq = sequence(traj, frames, 640, 480);
        for preset in [DisPreset::Ultrafast, DisPreset::Fast, DisPreset::Medium] {
            let (pe, pn, pt) = plain(&seq, preset);
            let (pbe, pbt) = plain_both(&seq, preset);
            let (ee, en, et) = engine(&seq, preset, true, true, 0);
            let (re, rn, rt) = engine(&seq, preset, true, true, REFINE);
            let (ue, un, ut) = engine(&seq, preset, true, false, 0);
            let (be, bn, bt) = engine(&seq, preset, false, false, 0);
            println!(
                "{traj:?} 640x480 {preset:?}: plain DIS fwd EPE {pe:.3} (noc {pn:.3}) {pt:.1} ms, fwd+bwd on 2 cores {pbt:.1} ms (EPE {pbe:.3})\n  \
                 engine default (prior+fusion) EPE {ee:.3} (noc {en:.3}) {et:.1} ms: EPE ratio {:.3}, time ratio {:.2} (vs fwd+bwd {:.2})\n  \
                 engine + refine {REFINE} EPE {re:.3} (noc {rn:.3}) {rt:.1} ms: EPE ratio {:.3}, time ratio {:.2} (vs fwd+bwd {:.2})\n  \
                 prior only EPE {ue:.3} (noc {un:.3}) {ut:.1} ms | neither EPE {be:.3} (noc {bn:.3}) {bt:.1} ms",
                ee / pe,
                et / pt,
                et / pbt,
                re / pe,
                rt / pt,
                rt / pbt,
            );
        }
    }
    for (w, h) in [(640, 480), (1024, 436)] {
        let seq = sequence(TrajectoryKind::Smooth, frames.min(30), w, h);
        for preset in [DisPreset::Ultrafast, DisPreset::Fast, DisPreset::Medium] {
            let (_, _, t) = engine(&seq, preset, true, true, 0);
            let (_, _, tr) = engine(&seq, preset, true, true, REFINE);
            println!("throughput {w}x{h} {preset:?}: {t:.1} ms per frame (fwd+bwd+confidence) = {:.1} frames/s; with refine {REFINE}: {tr:.1} ms = {:.1} frames/s", 1e3 / t, 1e3 / tr);
        }
    }
}
