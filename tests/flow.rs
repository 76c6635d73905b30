//! The `dis` engine, flow metrics and the colour wheel.

mod common;

use streamrecon::datasets::synth::{SynthWorld, TrajectoryKind};
use streamrecon::flow::dis::{DisBackend, DisConfig, DisEngine, DisPreset};
use streamrecon::flow::metrics::{flow_metrics, FlowMetricsAcc};
use streamrecon::flow::{colorwheel, FlowEngine, FlowField};
use streamrecon::frame::Frame;

fn frame(i: u64, image: image::RgbImage) -> Frame {
    Frame {
        index: i,
        source_index: i,
        timestamp: i as f64 / 30.0,
        image,
        intrinsics: None,
        gt: None,
    }
}

#[test]
fn dis_follows_the_ground_truth_on_a_synthetic_sequence() {
    let world = SynthWorld::new(common::synth_config(
        TrajectoryKind::Handheld,
        12,
        320,
        240,
        21,
    ));
    let mut results = Vec::new();
    for prior in [false, true] {
        let mut engine = DisEngine::new(DisConfig {
            preset: DisPreset::Medium,
            temporal_prior: prior,
            ..DisConfig::default()
        })
        .unwrap();
        let mut acc = FlowMetricsAcc::default();
        let mut gts = Vec::new();
        for f in world.frames() {
            let gt = f.flow_fwd.clone();
            for p in engine
                .push(&frame(f.index as u64, f.image.clone()))
                .unwrap()
            {
                let (g, occ): &(FlowField, Vec<bool>) = gts
                    .iter()
                    .find(|(i, _)| *i == p.from)
                    .map(|(_, g)| g)
                    .unwrap();
                acc.add(g, &p.fwd, None, Some(occ)).unwrap();
                assert_eq!(p.fwd_conf.len(), 320 * 240);
            }
            if let Some(g) = gt {
                gts.push((f.index as u64, g));
            }
        }
        let m = acc.finish();
        println!(
            "temporal prior {prior}: EPE {:.3} (noc {:.3}), Fl-all {:.4}",
            m.epe, m.epe_noc, m.fl_all
        );
        results.push(m);
    }
    for m in &results {
        assert!(m.epe_noc < 1.5, "{m:?}");
    }
}

/// Frames and forward/backward ground truth (indexed by the pair's first frame) of a synthetic
/// sequence.
type Truth = Vec<(FlowField, Vec<bool>)>;

fn synthetic(frames: usize, w: u32, h: u32) -> (Vec<Frame>, Truth, Truth) {
    let world = SynthWorld::new(common::synth_config(
        TrajectoryKind::Handheld,
        frames,
        w,
        h,
        5,
    ));
    let (mut out, mut fwd, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
    for f in world.frames() {
        if let Some(g) = f.flow_fwd {
            fwd.push(g);
        }
        if let Some(g) = f.flow_bwd {
            bwd.push(g);
        }
        out.push(frame(f.index as u64, f.image));
    }
    (out, fwd, bwd)
}

/// Every pair an engine gives over `frames` (flush included), in order.
fn all_pairs(engine: &mut DisEngine, frames: &[Frame]) -> Vec<streamrecon::flow::PairFlow> {
    let mut pairs = Vec::new();
    for f in frames {
        pairs.extend(engine.push(f).unwrap());
    }
    pairs.extend(engine.flush().unwrap());
    pairs
}

#[test]
fn refinement_and_temporal_fill_beat_plain_dis() {
    // Plain two-frame OpenCV DIS against the engine's default (refinement, fusion, fill), same
    // preset. On the benchmark's 640×480 sequences the engine's EPE is 0.43–0.52× DIS's.
    let (frames, gt, _) = synthetic(8, 320, 240);
    let mut dis =
        opencv::video::DISOpticalFlow::create(opencv::video::DISOpticalFlow_PRESET_ULTRAFAST)
            .unwrap();
    let greys: Vec<_> = frames
        .iter()
        .map(|f| streamrecon::flow::dis::grey_mat(&f.image).unwrap())
        .collect();
    let mut plain = FlowMetricsAcc::default();
    for (i, g) in gt.iter().enumerate() {
        let mut m = opencv::core::Mat::default();
        opencv::prelude::DenseOpticalFlowTrait::calc(&mut dis, &greys[i], &greys[i + 1], &mut m)
            .unwrap();
        let f = streamrecon::flow::dis::flow_from_mat(&m).unwrap();
        plain.add(&g.0, &f, None, Some(&g.1)).unwrap();
    }
    let mut engine = DisEngine::new(DisConfig::default()).unwrap();
    let mut ours = FlowMetricsAcc::default();
    for p in all_pairs(&mut engine, &frames) {
        let g = &gt[p.from as usize];
        ours.add(&g.0, &p.fwd, None, Some(&g.1)).unwrap();
    }
    let (plain, ours) = (plain.finish(), ours.finish());
    println!("plain DIS EPE {:.3}, engine {:.3}", plain.epe, ours.epe);
    assert!(ours.epe < 0.75 * plain.epe, "{plain:?} vs {ours:?}");
}

/// Plain two-frame OpenCV DIS from `a` to `b`, as OpenCV defines `preset`.
fn plain_dis(preset: i32, a: &Frame, b: &Frame) -> FlowField {
    use streamrecon::flow::dis::{flow_from_mat, grey_mat};
    let mut dis = opencv::video::DISOpticalFlow::create(preset).unwrap();
    let mut m = opencv::core::Mat::default();
    let (a, b) = (grey_mat(&a.image).unwrap(), grey_mat(&b.image).unwrap());
    opencv::prelude::DenseOpticalFlowTrait::calc(&mut dis, &a, &b, &mut m).unwrap();
    flow_from_mat(&m).unwrap()
}

/// Presets with 8-pixel patches at ¼ resolution, and OpenCV's names for them.
const WITH_OPENCV_PRESETS: [(DisPreset, i32); 2] = [
    (
        DisPreset::Ultrafast,
        opencv::video::DISOpticalFlow_PRESET_ULTRAFAST,
    ),
    (DisPreset::Fast, opencv::video::DISOpticalFlow_PRESET_FAST),
];

/// The engine with none of its multi-frame steps: DIS alone.
fn bare() -> DisConfig {
    DisConfig {
        temporal_prior: false,
        symmetric_fusion: false,
        refine_iterations: 0,
        temporal_fill: false,
        spatial_fill: None,
        ..DisConfig::default()
    }
}

#[test]
fn the_spatial_fill_repairs_dis_on_a_real_large_displacement_pair() {
    // The Middlebury aloe stereo pair (opencv-doc) as a flow, u = −disparity: DIS locks onto
    // wrong matches over about a third of it at ¼ resolution (EPE 33 px); filling the pixels
    // whose two directions disagree from their region's reliable ones gives ~10.8 px
    // (`benches/flow_real.rs`).
    let data = std::path::Path::new("/usr/share/doc/opencv-doc/examples/data");
    let read = |name: &str| image::open(data.join(name)).map(image::DynamicImage::into_rgb8);
    let (Ok(a), Ok(b), Ok(gt)) = (read("aloeL.jpg"), read("aloeR.jpg"), read("aloeGT.png")) else {
        eprintln!("skipped: opencv-doc's aloe pair is not installed");
        return;
    };
    let (w, h) = (a.width() as usize, a.height() as usize);
    let mut truth = FlowField::zeros(w, h);
    let mut known = vec![false; w * h];
    for (i, p) in gt.pixels().enumerate() {
        truth.data[2 * i] = -f32::from(p.0[0]);
        known[i] = p.0[0] > 0;
    }
    let epe = |fill: bool| {
        let mut engine = DisEngine::new(DisConfig {
            refine_iterations: 0,
            spatial_fill: fill.then(Default::default),
            ..DisConfig::default()
        })
        .unwrap();
        let pairs = all_pairs(&mut engine, &[frame(0, a.clone()), frame(1, b.clone())]);
        let mut acc = FlowMetricsAcc::default();
        acc.add(&truth, &pairs[0].fwd, Some(&known), None).unwrap();
        acc.finish().epe
    };
    let (without, with) = (epe(false), epe(true));
    println!("aloe EPE without the fill {without:.2}, with it {with:.2}");
    assert!(without > 25.0 && with < 0.5 * without, "{without} → {with}");
}

#[test]
fn without_its_multi_frame_steps_the_engine_is_opencv_dis_exactly() {
    // The engine gives DIS images already at its finest level, made once per frame, and
    // upsamples DIS's flow itself: with prior, fusion, refinement and fill off, both directions
    // must be OpenCV's own, bit for bit. 330×250 is not a multiple of 4 (DIS works at 82×62).
    let (frames, _, _) = synthetic(3, 330, 250);
    for (preset, opencv_preset) in WITH_OPENCV_PRESETS {
        let mut engine = DisEngine::new(DisConfig {
            preset,
            backend: DisBackend::Opencv,
            ..bare()
        })
        .unwrap();
        let pairs = all_pairs(&mut engine, &frames);
        assert_eq!(pairs.len(), 2);
        for p in pairs {
            let (a, b) = (&frames[p.from as usize], &frames[p.to as usize]);
            assert_eq!(p.fwd, plain_dis(opencv_preset, a, b), "{preset:?} forward");
            assert_eq!(p.bwd, plain_dis(opencv_preset, b, a), "{preset:?} backward");
            assert_eq!((p.fwd_conf.len(), p.bwd_occ.len()), (330 * 250, 330 * 250));
        }
    }
}

#[test]
fn the_native_dis_gives_opencv_dis_flows() {
    // Our DIS (`inverse_search.rs`, the default backend) against OpenCV's own on the same
    // frames, with and without the variational refinement: the same algorithm, rounded
    // differently, so flows differ by little and score the same against the ground truth.
    let (frames, gt, _) = synthetic(6, 330, 250);
    for (preset, opencv_preset) in WITH_OPENCV_PRESETS {
        let mut engine = DisEngine::new(DisConfig { preset, ..bare() }).unwrap();
        let (mut ours, mut theirs) = (FlowMetricsAcc::default(), FlowMetricsAcc::default());
        let (mut diff, mut n) = (0.0f64, 0usize);
        for p in all_pairs(&mut engine, &frames) {
            let (i, j) = (p.from as usize, p.to as usize);
            for (got, want) in [
                (&p.fwd, plain_dis(opencv_preset, &frames[i], &frames[j])),
                (&p.bwd, plain_dis(opencv_preset, &frames[j], &frames[i])),
            ] {
                assert_eq!((got.width, got.height), (want.width, want.height));
                diff += got
                    .data
                    .iter()
                    .zip(&want.data)
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .sum::<f64>();
                n += got.data.len();
            }
            ours.add(&gt[i].0, &p.fwd, None, Some(&gt[i].1)).unwrap();
            let plain = plain_dis(opencv_preset, &frames[i], &frames[j]);
            theirs.add(&gt[i].0, &plain, None, Some(&gt[i].1)).unwrap();
        }
        let (ours, theirs) = (ours.finish(), theirs.finish());
        let mean_diff = diff / n as f64;
        println!(
            "{preset:?}: native EPE {:.4}, OpenCV {:.4}, mean |difference| {mean_diff:.5} px",
            ours.epe, theirs.epe
        );
        assert!(
            mean_diff < 0.01,
            "{preset:?}: flows differ by {mean_diff} px on average"
        );
        assert!(
            (ours.epe - theirs.epe).abs() < 0.02 * theirs.epe,
            "{preset:?}: {ours:?} vs {theirs:?}"
        );
    }
}

#[test]
fn at_dis_resolution_the_multi_frame_steps_still_beat_plain_dis() {
    // Without the full-resolution refinement, the engine checks, fuses and fills on DIS's own
    // ¼-resolution grid and upsamples only its results.
    let (frames, gt, gt_bwd) = synthetic(8, 320, 240);
    let mut engine = DisEngine::new(DisConfig {
        refine_iterations: 0,
        ..DisConfig::default()
    })
    .unwrap();
    let (mut plain, mut ours, mut ours_bwd) = (
        FlowMetricsAcc::default(),
        FlowMetricsAcc::default(),
        FlowMetricsAcc::default(),
    );
    let mut occluded = 0;
    for p in all_pairs(&mut engine, &frames) {
        let i = p.from as usize;
        let (a, b) = (&frames[i], &frames[i + 1]);
        let ultrafast = opencv::video::DISOpticalFlow_PRESET_ULTRAFAST;
        plain
            .add(&gt[i].0, &plain_dis(ultrafast, a, b), None, Some(&gt[i].1))
            .unwrap();
        ours.add(&gt[i].0, &p.fwd, None, Some(&gt[i].1)).unwrap();
        ours_bwd
            .add(&gt_bwd[i].0, &p.bwd, None, Some(&gt_bwd[i].1))
            .unwrap();
        assert_eq!((p.fwd.width, p.fwd.height), (320, 240));
        assert!(p.fwd_conf.iter().all(|c| (0.0..=1.0).contains(c)));
        occluded += p.fwd_occ.iter().filter(|o| **o).count();
    }
    let (plain, ours, ours_bwd) = (plain.finish(), ours.finish(), ours_bwd.finish());
    println!(
        "plain DIS EPE {:.3}, engine at DIS resolution {:.3} (backward {:.3})",
        plain.epe, ours.epe, ours_bwd.epe
    );
    assert!(ours.epe < 0.9 * plain.epe, "{plain:?} vs {ours:?}");
    assert!(ours_bwd.epe < plain.epe, "{plain:?} vs {ours_bwd:?}");
    // The camera moves: some pixels leave the image, and are marked.
    assert!(occluded > 0);
    // With the look-ahead, the held pair is upsampled when it is returned, flush included.
    let mut engine = DisEngine::new(DisConfig {
        refine_iterations: 0,
        look_ahead: true,
        ..DisConfig::default()
    })
    .unwrap();
    let pairs = all_pairs(&mut engine, &frames);
    assert_eq!(pairs.len(), frames.len() - 1);
    for p in pairs {
        assert_eq!(
            (p.bwd.width, p.bwd.height, p.bwd_occ.len()),
            (320, 240, 320 * 240)
        );
    }
}

#[test]
fn tiny_frames_get_their_flow_from_a_finer_dis_level() {
    // 40×30 at ¼ resolution is 10×7, under DIS's 8-pixel patch (OpenCV's pyramid would have no
    // level there): DIS runs at ½ resolution instead, with and without the refinement.
    let (frames, gt, _) = synthetic(4, 40, 30);
    for refine_iterations in [0, 1] {
        let mut engine = DisEngine::new(DisConfig {
            refine_iterations,
            ..DisConfig::default()
        })
        .unwrap();
        let mut acc = FlowMetricsAcc::default();
        let pairs = all_pairs(&mut engine, &frames);
        assert_eq!(pairs.len(), 3);
        for p in pairs {
            assert_eq!(
                (p.fwd.width, p.fwd.height, p.bwd_conf.len()),
                (40, 30, 40 * 30)
            );
            let g = &gt[p.from as usize];
            acc.add(&g.0, &p.fwd, None, Some(&g.1)).unwrap();
        }
        let m = acc.finish();
        println!("40x30, refinement {refine_iterations}: EPE {:.3}", m.epe);
        assert!(m.epe < 0.5, "refinement {refine_iterations}: {m:?}");
    }
}

#[test]
fn look_ahead_returns_every_pair_a_frame_later_with_a_better_backward_flow() {
    let (frames, _, gt_bwd) = synthetic(7, 320, 240);
    let causal_config = DisConfig::default();
    let mut causal = DisEngine::new(causal_config.clone()).unwrap();
    let mut ahead = DisEngine::new(DisConfig {
        look_ahead: true,
        ..causal_config
    })
    .unwrap();
    // The first pair comes with frame 2, not frame 1; the last from flush.
    assert!(ahead.push(&frames[0]).unwrap().is_empty());
    assert!(ahead.push(&frames[1]).unwrap().is_empty());
    let second = ahead.push(&frames[2]).unwrap();
    assert_eq!(
        second.iter().map(|p| (p.from, p.to)).collect::<Vec<_>>(),
        [(0, 1)]
    );
    ahead.reset();
    let (a, c) = (
        all_pairs(&mut ahead, &frames),
        all_pairs(&mut causal, &frames),
    );
    assert_eq!(a.len(), frames.len() - 1);
    let (mut acc_a, mut acc_c) = (FlowMetricsAcc::default(), FlowMetricsAcc::default());
    for (pa, pc) in a.iter().zip(&c) {
        assert_eq!((pa.from, pa.to), (pc.from, pc.to));
        // Only the backward flow waits for the next pair.
        assert_eq!(pa.fwd, pc.fwd);
        let g = &gt_bwd[pa.from as usize];
        acc_a.add(&g.0, &pa.bwd, None, Some(&g.1)).unwrap();
        acc_c.add(&g.0, &pc.bwd, None, Some(&g.1)).unwrap();
    }
    let (ma, mc) = (acc_a.finish(), acc_c.finish());
    println!(
        "backward EPE: causal {:.3}, look-ahead {:.3}",
        mc.epe, ma.epe
    );
    assert!(ma.epe < mc.epe, "{mc:?} vs {ma:?}");
}

#[test]
fn dis_rejects_a_frame_of_another_size() {
    let mut engine = DisEngine::new(DisConfig::default()).unwrap();
    engine
        .push(&frame(0, image::RgbImage::new(64, 48)))
        .unwrap();
    let e = engine
        .push(&frame(1, image::RgbImage::new(32, 48)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("32x48") && e.contains("64x48"), "{e}");
    let mut engine = DisEngine::new(DisConfig::default()).unwrap();
    assert!(
        engine.push(&frame(0, image::RgbImage::new(4, 4))).is_err(),
        "tiny frames"
    );
}

#[test]
fn textureless_and_noisy_frames_give_finite_flows() {
    // A flat frame (every patch's structure tensor singular) and pure noise, on both backends
    // and with and without the refinement: flows and confidences stay finite.
    let flat = |i| {
        frame(
            i,
            image::RgbImage::from_pixel(96, 64, image::Rgb([90, 90, 90])),
        )
    };
    let noise = |i: u64| {
        frame(
            i,
            image::RgbImage::from_fn(96, 64, |x, y| {
                let v = ((u64::from(x) * 7919 + u64::from(y) * 104_729 + i * 31) % 251) as u8;
                image::Rgb([v, v.wrapping_mul(3), v.wrapping_add(17)])
            }),
        )
    };
    for backend in [DisBackend::Native, DisBackend::Opencv] {
        for refine_iterations in [0, 1] {
            let mut engine = DisEngine::new(DisConfig {
                backend,
                refine_iterations,
                ..DisConfig::default()
            })
            .unwrap();
            let frames = [flat(0), flat(1), noise(2), noise(3), flat(4)];
            let pairs: Vec<_> = frames
                .iter()
                .flat_map(|f| engine.push(f).unwrap())
                .collect();
            assert_eq!(pairs.len(), 4);
            for p in pairs {
                let finite = p
                    .fwd
                    .data
                    .iter()
                    .chain(&p.bwd.data)
                    .chain(&p.fwd_conf)
                    .all(|v| v.is_finite());
                assert!(
                    finite,
                    "{backend:?}, refinement {refine_iterations}: pair {}-{}",
                    p.from, p.to
                );
            }
        }
    }
}

#[test]
fn flow_metrics_match_hand_computed_values() {
    let mut gt = FlowField::zeros(2, 2);
    let mut pred = FlowField::zeros(2, 2);
    // Errors: 0, 5 (3-4-5), 1, 10 on a gt magnitude of 100 (not an outlier by the 5 % rule… 10 > 5: outlier).
    gt.set(3 % 2, 0, 0.0, 0.0);
    pred.set(1, 0, 3.0, 4.0);
    pred.set(0, 1, 1.0, 0.0);
    gt.set(1, 1, 100.0, 0.0);
    pred.set(1, 1, 110.0, 0.0);
    let occ = [false, false, true, true];
    let m = flow_metrics(&gt, &pred, None, Some(&occ)).unwrap();
    assert!((m.epe - 4.0).abs() < 1e-9);
    assert!((m.epe_noc - 2.5).abs() < 1e-9);
    assert!((m.epe_occ - 5.5).abs() < 1e-9);
    assert!(
        (m.fl_all - 0.5).abs() < 1e-9,
        "5 px of 0 and 10 px of 100 are outliers"
    );
    assert!((m.acc_1px - 0.25).abs() < 1e-9);
    assert!((m.acc_3px - 0.5).abs() < 1e-9);
    assert!((m.acc_5px - 0.5).abs() < 1e-9);
    let valid = [true, false, false, false];
    assert!(
        flow_metrics(&gt, &pred, Some(&valid), None)
            .unwrap()
            .epe
            .abs()
            < 1e-12
    );
    assert!(flow_metrics(&gt, &FlowField::zeros(3, 2), None, None).is_err());
}

#[test]
fn colour_wheel_has_the_standard_hues() {
    let mut f = FlowField::zeros(4, 1);
    f.set(0, 0, 1.0, 0.0); // right: red
    f.set(1, 0, 0.0, 1.0); // down: blue-ish… per Baker's wheel, +v is 'down' = between blue and cyan? check it is not red
    f.set(2, 0, -1.0, 0.0); // left: cyan-green side
    let img = colorwheel::flow_to_rgb(&f, Some(1.0));
    assert_eq!(img.get_pixel(0, 0).0, [255, 0, 0], "rightward flow is red");
    assert_eq!(img.get_pixel(3, 0).0, [255, 255, 255], "zero flow is white");
    let left = img.get_pixel(2, 0).0;
    assert!(
        left[0] < 10 && left[1] > 200,
        "leftward flow is cyan-green: {left:?}"
    );
}

#[test]
fn dis_parameters_override_the_preset_and_bad_ones_are_refused() {
    let world = SynthWorld::new(common::synth_config(
        TrajectoryKind::Handheld,
        3,
        160,
        120,
        5,
    ));
    let frames: Vec<Frame> = world
        .frames()
        .map(|f| frame(f.index as u64, f.image))
        .collect();
    let flows = |config: DisConfig| -> Vec<f32> {
        let mut e = DisEngine::new(config).unwrap();
        frames
            .iter()
            .flat_map(|f| e.push(f).unwrap())
            .flat_map(|p| p.fwd.data)
            .collect()
    };
    let medium = |finest_scale| DisConfig {
        preset: DisPreset::Medium,
        finest_scale,
        ..DisConfig::default()
    };
    // `medium` keeps its own finest level (½) with refinement too, unless told otherwise.
    let default = flows(medium(None));
    assert!(!default.is_empty());
    assert_eq!(default, flows(medium(Some(1))));
    assert_ne!(default, flows(medium(Some(2))));
    // A stride that leaves gaps between patches is refused, naming both values.
    let Err(e) = DisEngine::new(DisConfig {
        patch_stride: Some(8),
        ..DisConfig::default()
    }) else {
        panic!("a stride of the patch size was accepted");
    };
    let e = e.to_string();
    assert!(e.contains("stride 8") && e.contains("patch size 8"), "{e}");
    // A patch larger than the frames: OpenCV refuses, and the error says where and with what.
    let mut big = DisEngine::new(DisConfig {
        patch_size: Some(64),
        ..DisConfig::default()
    })
    .unwrap();
    let small = |i| {
        frame(
            i,
            image::RgbImage::from_pixel(32, 24, image::Rgb([90, 120, 30])),
        )
    };
    assert!(big.push(&small(0)).unwrap().is_empty());
    let e = big
        .push(&small(1))
        .expect_err("a 64-pixel patch on 32x24 frames")
        .to_string();
    assert!(
        e.contains("frames 0 and 1") && e.contains("32x24, patch size 64"),
        "{e}"
    );
}
