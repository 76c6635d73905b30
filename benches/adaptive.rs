//! Pose-adaptive updates and stabilization on `flowvo`, against synthetic ground truth (640×480):
//! 1. `jumpy` and `static`-segment sequences: ATE with uniform vs adaptive keyframes;
//! 2. `handheld` sequences: raw vs stabilized output — ATE (Sim(3)), high-frequency energy of the
//!    trajectory (sum of squared second differences of camera centres) and lag (the frame shift
//!    that best matches the stabilized to the raw trajectory), for several filter settings.
//!
//! 3. `smooth` sequences with sensor noise (σ = 0.03): jitter that is estimation error, not
//!    camera motion — the case a stabilizer is for; same figures as 2.
//!
//! `cargo bench --bench adaptive [-- FRAMES] [--stabilize-only] [--seeds=N|a,b,…] [--bundle-adjust]`
//! (default 300 frames, seeds 1 and 2 for cases 2 and 3; `--seeds=N` runs 1..=N;
//! `--bundle-adjust` runs case 1 with flowvo's windowed bundle adjustment, where adaptive mode
//! also weighs each frame's observations by its novelty).

use nalgebra::Vector3;
use streamrecon::datasets::synth::{Degrade, SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::eval::pose::pose_metrics;
use streamrecon::flow::dis::{DisConfig, DisEngine};
use streamrecon::flow::FlowEngine;
use streamrecon::frame::Pose;
use streamrecon::geometry::flowvo::{AdaptiveKeyframes, FlowVo, FlowVoConfig, WindowBaConfig};
use streamrecon::geometry::stabilize::{
    FixedLagSmoother, StabilizeConfig, Stabilizer, DEFAULT_CONSTANT_VELOCITY_GAIN,
    DEFAULT_LATENCY_FRAMES, DEFAULT_SMOOTHER_BLEND,
};
use streamrecon::geometry::GeometryEngine;

fn hf_energy(p: &[Pose]) -> f64 {
    p.windows(3)
        .map(|w| {
            let c: Vec<Vector3<f64>> = w.iter().map(|q| q.translation.vector).collect();
            (c[2] - 2.0 * c[1] + c[0]).norm_squared()
        })
        .sum()
}

/// Shift k (frames) minimising the mean distance between `a[t]` and `b[t − k]`.
fn lag(a: &[Pose], b: &[Pose]) -> usize {
    (0..=5)
        .min_by(|&x, &y| {
            let err = |k: usize| -> f64 {
                a[k..]
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p.translation.vector - q.translation.vector).norm())
                    .sum::<f64>()
                    / (a.len() - k) as f64
            };
            err(x).total_cmp(&err(y))
        })
        .unwrap_or(0)
}

/// What a dis + flowvo run over a synthetic sequence output, with GT for the same frames.
struct VoRun {
    gt: Vec<Pose>,
    est: Vec<Pose>,
    timestamps: Vec<f64>,
    segments: u32,
    tracked: usize,
}

fn run_vo(
    trajectory: TrajectoryKind,
    frames: usize,
    seed: u64,
    config: FlowVoConfig,
    noise: f32,
) -> VoRun {
    let world = SynthWorld::new(SynthConfig {
        scene: SceneKind::Room,
        trajectory,
        frames,
        seed,
        degrade: Degrade {
            noise,
            ..Degrade::default()
        },
        ..SynthConfig::default()
    });
    let mut flow = DisEngine::new(DisConfig::default()).expect("dis");
    let mut vo = FlowVo::new(config);
    let mut gt_all = Vec::new();
    let mut out = Vec::new();
    for (frame, view) in world.input_frames() {
        gt_all.push(view.world_from_cam);
        let pairs = flow.push(&frame).expect("flow");
        out.extend(vo.push(&frame, pairs.last()).expect("vo"));
    }
    out.extend(vo.flush().expect("flush"));
    VoRun {
        gt: out.iter().map(|g| gt_all[g.index as usize]).collect(),
        est: out.iter().map(|g| g.world_from_cam).collect(),
        timestamps: out.iter().map(|g| g.timestamp).collect(),
        segments: vo.segments(),
        tracked: out.iter().filter(|g| g.stats.tracked).count(),
    }
}

fn main() {
    let frames: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let stabilize_only = std::env::args().any(|a| a == "--stabilize-only");
    let bundle_adjust = std::env::args().any(|a| a == "--bundle-adjust");
    // `--seeds=N`: seeds 1..=N; `--seeds=a,b,…`: those seeds.
    let seeds: Vec<u64> =
        match std::env::args().find_map(|a| a.strip_prefix("--seeds=").map(str::to_string)) {
            Some(v) if v.contains(',') => v.split(',').filter_map(|s| s.parse().ok()).collect(),
            Some(v) => (1..=v.parse().unwrap_or(2)).collect(),
            None => vec![1, 2],
        };
    let adaptive_cases: &[TrajectoryKind] = if stabilize_only {
        &[]
    } else {
        &[TrajectoryKind::Jumpy, TrajectoryKind::Static]
    };
    for &trajectory in adaptive_cases {
        for seed in [1u64, 2] {
            for adaptive in [None, Some(AdaptiveKeyframes::default())] {
                let VoRun {
                    gt,
                    est,
                    segments,
                    tracked,
                    ..
                } = run_vo(
                    trajectory,
                    frames,
                    seed,
                    FlowVoConfig {
                        adaptive,
                        window_ba: bundle_adjust.then(WindowBaConfig::default),
                        ..FlowVoConfig::default()
                    },
                    0.0,
                );
                let m = pose_metrics(&gt, &est, 1).expect("metrics");
                println!(
                    "{trajectory:?} seed {seed}, {} keyframes: ATE {:.4} ({:.2}% of length), {} output / {tracked} tracked frames, {segments} segments",
                    if adaptive.is_some() { "adaptive" } else { "uniform " },
                    m.ate_rmse,
                    m.ate_rmse_over_length * 100.0,
                    est.len()
                );
            }
        }
    }
    for (trajectory, noise) in [
        (TrajectoryKind::Handheld, 0.0),
        (TrajectoryKind::Smooth, 0.03),
    ] {
        for &seed in &seeds {
            stabilize_case(trajectory, noise, frames, seed);
        }
    }
}

fn stabilize_case(trajectory: TrajectoryKind, noise: f32, frames: usize, seed: u64) {
    let VoRun {
        gt,
        est: raw,
        timestamps: stamps,
        ..
    } = run_vo(trajectory, frames, seed, FlowVoConfig::default(), noise);
    let m_raw = pose_metrics(&gt, &raw, 1).expect("metrics");
    println!(
        "{trajectory:?} (noise {noise}) seed {seed}, {} frames: raw ATE {:.4} ({:.2}% of length), HF energy {:.3e} (GT {:.3e} in GT units)",
        raw.len(),
        m_raw.ate_rmse,
        m_raw.ate_rmse_over_length * 100.0,
        hf_energy(&raw),
        hf_energy(&gt)
    );
    // Prints one smoothed trajectory's row against the raw one.
    let row = |label: &str, stab: &[Pose]| {
        let m = pose_metrics(&gt, stab, 1).expect("metrics");
        println!(
            "  {label}: ATE {:.4} ({:+.2}% vs raw), HF energy {:.1}% of raw, lag {} frames",
            m.ate_rmse,
            (m.ate_rmse / m_raw.ate_rmse - 1.0) * 100.0,
            hf_energy(stab) / hf_energy(&raw) * 100.0,
            lag(stab, &raw)
        );
    };
    // Filters the raw trajectory with one setting and prints its row.
    let report = |label: String, config: StabilizeConfig| {
        let mut s = Stabilizer::new(config);
        let stab: Vec<Pose> = raw
            .iter()
            .zip(&stamps)
            .map(|(p, t)| s.filter(*t, p).0)
            .collect();
        row(&label, &stab);
    };
    for (min_cutoff_hz, beta) in [(8.0, 1.0), (6.0, 0.5), (4.0, 1.0), (2.0, 1.0), (1.0, 0.5)] {
        report(
            format!("min cutoff {min_cutoff_hz} Hz, beta {beta}"),
            StabilizeConfig {
                min_cutoff_hz,
                beta,
                constant_velocity_gain: None,
                latency_frames: 0,
                ..StabilizeConfig::default()
            },
        );
    }
    // Constant-velocity (alpha-beta) translation, One-Euro rotation at the default settings.
    for gain in [0.6, 0.5, 0.4, 0.25] {
        let default = if (gain - DEFAULT_CONSTANT_VELOCITY_GAIN).abs() < 1e-12 {
            " (the causal default)"
        } else {
            ""
        };
        report(
            format!("constant velocity, gain {gain}{default}"),
            StabilizeConfig {
                constant_velocity_gain: Some(gain),
                latency_frames: 0,
                ..StabilizeConfig::default()
            },
        );
    }
    // The fixed-latency centred smoother (the default: latency 2, blend 0.8).
    for (latency, blend) in [(1, 0.8), (1, 1.0), (2, 0.6), (2, 0.8), (2, 1.0)] {
        let mut s = FixedLagSmoother::new(latency, blend);
        let mut stab: Vec<Pose> = Vec::with_capacity(raw.len());
        for p in &raw {
            stab.extend(s.push(*p, ()).into_iter().map(|(q, _, ())| q));
        }
        stab.extend(s.finish().into_iter().map(|(q, _, ())| q));
        let default = if latency == DEFAULT_LATENCY_FRAMES && blend == DEFAULT_SMOOTHER_BLEND {
            " (the default)"
        } else {
            ""
        };
        row(
            &format!("centred smoother, latency {latency} frames, blend {blend}{default}"),
            &stab,
        );
    }
}
