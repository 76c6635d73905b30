//! `flowvo` accuracy over many synthetic sequences (room, 640×480, `dis` ultrafast): per seed and
//! trajectory, ATE RMSE after Sim(3) alignment (% of the path length), map segments, tracked
//! frames, median reprojection error and depth AbsRel on confident pixels (per-frame median
//! scaling), for the default configuration and the variants named on the command line.
//!
//! `cargo bench --bench flowvo_seeds [-- FRAMES [--seeds=N|a,b,…] [--trajectories=smooth,handheld]
//! [--variants=default,init0,ba,ba2,ba4,baseline,twoview] [--flow-refine=N] [--no-fill] [--no-temporal-prior] [--no-spatial-fill] [--degrade=SPEC]
//! [--photos=DIR] [--speed=F] [--no-rolling-model] [--dump=DIR]]` (defaults 300 frames, seeds 1–6, smooth and handheld,
//! default; `init0` = the initialisation rule before the median-angle test, `ba` = windowed
//! bundle adjustment on, `ba2`/`ba4` = with 2 or 4 fixed frames instead of 6, `baseline` = new
//! points let in by their frame pair's baseline, `FlowVoConfig::new_points_by_baseline`, `twoview` =
//! points from their track's oldest and newest observations alone, without
//! `FlowVoConfig::triangulate_all_views`).
//! Each sequence is rendered once (in memory) and every variant runs on the same frames; through
//! a lens (`--degrade=…,lens=K1`) the frames are undistorted with the world's calibration first;
//! with a rolling shutter (`--degrade=…,rolling=R`) flowvo is told its readout R
//! (`--rolling-shutter`), unless `--no-rolling-model`.

use streamrecon::datasets::formats::tum::{write_tum, StampedPose};
use streamrecon::datasets::synth::{SceneKind, SynthConfig, SynthWorld, TrajectoryKind};
use streamrecon::eval::depth::{median_scale, DepthMetricsAcc};
use streamrecon::eval::pose::pose_metrics;
use streamrecon::flow::dis::{DisConfig, DisEngine};
use streamrecon::flow::FlowEngine;
use streamrecon::frame::Pose;
use streamrecon::geometry::flowvo::{FlowVo, FlowVoConfig, WindowBaConfig};
use streamrecon::geometry::GeometryEngine;
use streamrecon::pipeline::calibration::Calibration;

/// Least confidence of a depth pixel counted in AbsRel (the fusion default).
const MIN_DEPTH_CONFIDENCE: f32 = 0.3;

fn variant(name: &str) -> Option<FlowVoConfig> {
    let d = FlowVoConfig::default();
    Some(match name {
        "default" => d,
        "ba" => FlowVoConfig {
            window_ba: Some(WindowBaConfig::default()),
            ..d
        },
        // The initialisation rule before session 6: enough pixel displacement, points from
        // half the triangulation angle.
        "init0" => FlowVoConfig {
            init_min_angle_deg: 0.0,
            init_point_angle_fraction: 0.5,
            ..d
        },
        // New points by their frame pair's baseline, not their own ray angle.
        "baseline" => FlowVoConfig {
            new_points_by_baseline: true,
            ..d
        },
        // Points from their track's oldest and newest observations alone.
        "twoview" => FlowVoConfig {
            triangulate_all_views: false,
            ..d
        },
        "ba2" | "ba4" => FlowVoConfig {
            window_ba: Some(WindowBaConfig {
                fixed_frames: if name == "ba2" { 2 } else { 4 },
                ..WindowBaConfig::default()
            }),
            ..d
        },
        _ => return None,
    })
}

fn arg<'a>(name: &str, args: &'a [String]) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(name))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let frames: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(300);
    // `--seeds=N` runs seeds 1..=N, `--seeds=a,b,…` those seeds.
    let seeds: Vec<u64> = match arg("--seeds=", &args) {
        Some(v) if v.contains(',') => v.split(',').filter_map(|s| s.parse().ok()).collect(),
        Some(v) => (1..=v.parse().unwrap_or(6)).collect(),
        None => (1..=6).collect(),
    };
    let trajectories: Vec<TrajectoryKind> = arg("--trajectories=", &args)
        .unwrap_or("smooth,handheld")
        .split(',')
        .filter_map(|t| match t {
            "smooth" => Some(TrajectoryKind::Smooth),
            "handheld" => Some(TrajectoryKind::Handheld),
            "jumpy" => Some(TrajectoryKind::Jumpy),
            "static" => Some(TrajectoryKind::Static),
            "loop" => Some(TrajectoryKind::Loop),
            _ => None,
        })
        .collect();
    let variants: Vec<(String, FlowVoConfig)> = arg("--variants=", &args)
        .unwrap_or("default")
        .split(',')
        .filter_map(|v| variant(v).map(|c| (v.to_string(), c)))
        .collect();
    // The flow engine's refinement, temporal fill, temporal prior and spatial fill (on by default).
    let flow_config = DisConfig {
        refine_iterations: arg("--flow-refine=", &args)
            .and_then(|v| v.parse().ok())
            .unwrap_or(DisConfig::default().refine_iterations),
        temporal_fill: !args.iter().any(|a| a == "--no-fill"),
        temporal_prior: !args.iter().any(|a| a == "--no-temporal-prior"),
        spatial_fill: if args.iter().any(|a| a == "--no-spatial-fill") {
            None
        } else {
            DisConfig::default().spatial_fill
        },
        ..DisConfig::default()
    };
    // `--degrade=noise=0.01,shot=0.02,blur=4,exposure=0.15,jpeg=75`: camera-like frames.
    let degrade = arg("--degrade=", &args)
        .map(|v| streamrecon::datasets::synth::Degrade::parse(v).expect("--degrade"))
        .unwrap_or_default();
    // `--photos=DIR`: the first ten .jpg files in DIR (sorted) as the scene's textures, e.g.
    // opencv-doc's examples/data.
    let photos: Vec<std::path::PathBuf> = arg("--photos=", &args)
        .map(|dir| {
            let mut v: Vec<_> = std::fs::read_dir(dir)
                .expect("--photos folder")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
                .collect();
            v.sort();
            v.truncate(10);
            v
        })
        .unwrap_or_default();
    // A rolling shutter's readout is the camera's, known as its calibration is: flowvo is told
    // it unless `--no-rolling-model`.
    let readout = if args.iter().any(|a| a == "--no-rolling-model") {
        0.0
    } else {
        f64::from(degrade.rolling)
    };
    // `--dump=DIR`: each run's estimated and true trajectories as TUM files (frame index as the
    // timestamp), for looking into a sequence.
    let dump = arg("--dump=", &args).map(std::path::PathBuf::from);
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir).expect("--dump folder");
    }
    // `--speed=F`: the camera moves F times as far a frame.
    let speed: f64 = arg("--speed=", &args).map_or(1.0, |v| v.parse().expect("--speed"));
    let mut worst: Vec<f64> = vec![0.0; variants.len()];
    // Sequences run and those within 1 % of the path, per variant.
    let mut within: Vec<(usize, usize)> = vec![(0, 0); variants.len()];
    for &trajectory in &trajectories {
        for &seed in &seeds {
            let world = SynthWorld::new(SynthConfig {
                scene: SceneKind::Room,
                trajectory,
                frames,
                seed,
                degrade,
                photos: photos.clone(),
                speed,
                ..SynthConfig::default()
            });
            // Through a lens (`--degrade=…,lens=K1`), each frame is undistorted with the
            // calibration the world gives, as `--intrinsics-file` does in a run.
            let mut calibration = world.calibration_yaml().map(|yaml| {
                let dir = tempfile::tempdir().expect("temporary folder");
                let path = dir.path().join("calibration.yml");
                std::fs::write(&path, yaml).expect("calibration file");
                Calibration::read(&path).expect("calibration")
            });
            let mut rendered = Vec::with_capacity(frames);
            for (mut frame, view) in world.input_frames() {
                if let Some(c) = &mut calibration {
                    frame.image = c.undistort(&frame.image).expect("undistort");
                }
                rendered.push((frame, view.world_from_cam, view.depth));
            }
            for (vi, (name, config)) in variants.iter().enumerate() {
                let mut flow = DisEngine::new(flow_config.clone()).expect("dis");
                let mut vo = FlowVo::new(FlowVoConfig {
                    rolling_shutter: readout,
                    ..config.clone()
                });
                let mut out = Vec::new();
                for (frame, _, _) in &rendered {
                    let pairs = flow.push(frame).expect("flow");
                    out.extend(vo.push(frame, pairs.last()).expect("vo"));
                }
                out.extend(vo.flush().expect("flush"));
                let gt: Vec<Pose> = out.iter().map(|g| rendered[g.index as usize].1).collect();
                let est: Vec<Pose> = out.iter().map(|g| g.world_from_cam).collect();
                let m = pose_metrics(&gt, &est, 1).expect("metrics");
                let mut depth = DepthMetricsAcc::default();
                let mut reproj: Vec<f64> = Vec::new();
                for g in &out {
                    if let Some(e) = g.stats.reprojection_median_px {
                        reproj.push(e);
                    }
                    let (Some(d), Some(c)) = (&g.depth, &g.confidence) else {
                        continue;
                    };
                    let mask: Vec<bool> = c.iter().map(|&c| c >= MIN_DEPTH_CONFIDENCE).collect();
                    let gt_depth = &rendered[g.index as usize].2;
                    if let Some(s) = median_scale(gt_depth, d, Some(&mask)) {
                        depth.add(gt_depth, d, s, Some(&mask));
                    }
                }
                reproj.sort_by(f64::total_cmp);
                if let Some(dir) = &dump {
                    let stamped = |poses: &[Pose]| -> Vec<StampedPose> {
                        out.iter()
                            .zip(poses)
                            .map(|(g, &p)| StampedPose {
                                timestamp: g.index as f64,
                                world_from_cam: p,
                            })
                            .collect()
                    };
                    let stem = format!("{trajectory:?}-{seed}-{name}").to_lowercase();
                    write_tum(&dir.join(format!("{stem}-est.txt")), &stamped(&est)).expect("dump");
                    write_tum(&dir.join(format!("{stem}-gt.txt")), &stamped(&gt)).expect("dump");
                }
                let ate = m.ate_rmse_over_length * 100.0;
                worst[vi] = worst[vi].max(ate);
                within[vi].0 += 1;
                within[vi].1 += usize::from(ate <= 1.0);
                println!(
                    "{trajectory:?} seed {seed} [{name}]: ATE {ate:.2}% of {:.2} m, {} segments, {}/{} tracked, reprojection median {:.2} px, depth AbsRel {:.4}",
                    m.gt_length,
                    vo.segments(),
                    out.iter().filter(|g| g.stats.tracked).count(),
                    rendered.len(),
                    reproj.get(reproj.len() / 2).copied().unwrap_or(f64::NAN),
                    depth.finish().abs_rel
                );
            }
        }
    }
    for (((name, _), w), (n, ok)) in variants.iter().zip(worst).zip(within) {
        println!("[{name}] worst ATE {w:.2}% of the path length; {ok} of {n} sequences within 1 %");
    }
}
