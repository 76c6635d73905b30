//! Metrics with known answers.

use nalgebra::{Point3, Rotation3, Translation3, UnitQuaternion, Vector3};
use streamrecon::eval::depth::{median_scale, DepthMetricsAcc};
use streamrecon::eval::pose::{pose_metrics, umeyama};
use streamrecon::frame::Pose;

#[test]
fn umeyama_recovers_a_known_similarity() {
    let src: Vec<Point3<f64>> = (0..20)
        .map(|i| {
            let t = f64::from(i);
            Point3::new(t.sin() * 2.0, (0.7 * t).cos(), 0.1 * t * t - 1.0)
        })
        .collect();
    let r = Rotation3::from_euler_angles(0.3, -1.1, 2.0);
    let (s, t) = (2.5, Vector3::new(1.0, -2.0, 0.5));
    let dst: Vec<Point3<f64>> = src
        .iter()
        .map(|p| Point3::from(r * p.coords * s + t))
        .collect();
    let sim = umeyama(&src, &dst, true).unwrap();
    assert!((sim.scale - s).abs() < 1e-6);
    assert!(
        sim.rotation.angle_to(&r) < 1e-6,
        "rotation off by {}",
        sim.rotation.angle_to(&r)
    );
    assert!((sim.translation - t).norm() < 1e-6);
    let rigid = umeyama(
        &src,
        &src.iter()
            .map(|p| Point3::from(r * p.coords + t))
            .collect::<Vec<_>>(),
        false,
    )
    .unwrap();
    assert!((rigid.scale - 1.0).abs() < 1e-12 && rigid.rotation.angle_to(&r) < 1e-6);
    assert!(umeyama(&src[..2], &dst[..2], true).is_err());
}

#[test]
fn ate_is_zero_for_a_similar_trajectory_and_exact_for_a_known_offset() {
    let gt: Vec<Pose> = (0..30)
        .map(|i| {
            let t = f64::from(i) * 0.1;
            Pose::from_parts(
                Translation3::new(t.cos(), t.sin(), 0.2 * t),
                UnitQuaternion::from_euler_angles(0.0, t, 0.0),
            )
        })
        .collect();
    let g = Pose::from_parts(
        Translation3::new(3.0, 1.0, -2.0),
        UnitQuaternion::from_euler_angles(0.4, 0.1, -0.2),
    );
    let est: Vec<Pose> = gt
        .iter()
        .map(|p| {
            let q = g * p;
            Pose::from_parts((q.translation.vector * 0.5).into(), q.rotation)
        })
        .collect();
    let m = pose_metrics(&gt, &est, 1).unwrap();
    assert!(
        m.ate_rmse < 1e-9
            && (m.scale - 2.0).abs() < 1e-9
            && m.rpe_trans_rmse < 1e-9
            && m.rpe_rot_deg < 1e-6,
        "{m:?}"
    );
}

#[test]
fn depth_metrics_by_hand() {
    let gt = [1.0f32, 2.0, 4.0, 0.0];
    let pred = [0.5f32, 1.0, 2.5, 3.0];
    let s = median_scale(&gt, &pred, None).unwrap();
    assert!((s - 2.0).abs() < 1e-12);
    let mut acc = DepthMetricsAcc::default();
    acc.add(&gt, &pred, s, None);
    let m = acc.finish();
    // Scaled: 1, 2, 5 against 1, 2, 4 → abs rel (0 + 0 + 0.25) / 3; rmse sqrt(1/3); δ: 5/4 = 1.25 is not < 1.25.
    assert!((m.abs_rel - 0.25 / 3.0).abs() < 1e-9);
    assert!((m.rmse - (1.0f64 / 3.0).sqrt()).abs() < 1e-9);
    assert!((m.delta_1_25 - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(m.pixels, 3);
}
