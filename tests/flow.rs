//! The `dis` engine, flow metrics and the colour wheel.

mod common;

use streamrecon::datasets::synth::{SynthWorld, TrajectoryKind};
use streamrecon::flow::dis::{DisConfig, DisEngine, DisPreset};
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
