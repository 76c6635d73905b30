//! The Long3D protocol with known answers.

use nalgebra::{Matrix4, Rotation3, Vector3};
use streamrecon::cloud::PointCloud;
use streamrecon::eval::long3d::{
    accuracy_completeness, estimate_normals, evaluate, icp_point_to_plane, random_down_sample,
    remove_statistical_outliers, tree, voxel_down_sample, Long3dConfig,
};

/// Points on the three faces of a box corner and a slanted plane: enough structure for ICP.
fn structured() -> Vec<[f64; 3]> {
    let mut v = Vec::new();
    // In-plane jitter (deterministic) so no two neighbours are equidistant: ties would make
    // neighbour sets, and so normals, depend on rounding.
    let jitter = |i: i32, j: i32, k: u32| {
        f64::from((i * 7919 + j * 104_729 + k as i32 * 1_299_709).rem_euclid(1000)) * 0.000_007
    };
    for i in 0..60 {
        for j in 0..60 {
            let (a, b) = (
                f64::from(i) * 0.02 + jitter(i, j, 0),
                f64::from(j) * 0.02 + jitter(i, j, 1),
            );
            v.push([a, b, 0.0]);
            v.push([a, 0.0, b + 0.01]);
            v.push([0.0, a + 0.01, b + 0.01]);
            v.push([a + 0.3, b, 0.5 + 0.3 * a - 0.2 * b]);
        }
    }
    v
}

fn cloud(p: &[[f64; 3]]) -> PointCloud {
    PointCloud::from_points(
        p.iter()
            .map(|q| [q[0] as f32, q[1] as f32, q[2] as f32])
            .collect(),
    )
}

fn identity_protocol() -> Long3dConfig {
    Long3dConfig {
        cam_to_lidar: [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
        scale_init: 1.0,
        ..Long3dConfig::default()
    }
}

#[test]
fn a_cloud_against_itself_is_perfect() {
    let c = cloud(&structured());
    let r = evaluate(&c, &c, &identity_protocol()).unwrap();
    let m = r.metrics;
    println!("self: {m:?}, ICP {} iterations", r.icp_iterations);
    assert!(
        m.Acc < 1e-9 && m.Comp < 1e-9 && m.Acc_med < 1e-9 && m.Comp_med < 1e-9,
        "{m:?}"
    );
    assert!(
        (m.NC1 - 1.0).abs() < 1e-6 && (m.NC2 - 1.0).abs() < 1e-6 && (m.NC_med - 1.0).abs() < 1e-6,
        "{m:?}"
    );
}

#[test]
fn points_that_are_not_finite_are_dropped_and_counted() {
    let c = cloud(&structured());
    let mut with_nan = c.clone();
    with_nan.points.push([f32::NAN, 0.0, 1.0]);
    with_nan.points.push([0.0, f32::INFINITY, 1.0]);
    let r = evaluate(&with_nan, &c, &identity_protocol()).unwrap();
    assert_eq!((r.points_pred_non_finite, r.points_gt_non_finite), (2, 0));
    assert_eq!(r.points_pred, c.len() + 2);
    // The same result as without them (to rounding: the reductions run in parallel).
    let clean = evaluate(&c, &c, &identity_protocol()).unwrap();
    let (a, b) = (r.metrics, clean.metrics);
    for (x, y) in [
        (a.Acc, b.Acc),
        (a.Comp, b.Comp),
        (a.NC1, b.NC1),
        (a.NC2, b.NC2),
        (a.Acc_med, b.Acc_med),
        (a.Comp_med, b.Comp_med),
        (a.NC_mean, b.NC_mean),
        (a.NC_med, b.NC_med),
    ] {
        assert!((x - y).abs() < 1e-9, "{a:?} {b:?}");
    }
    // A cloud with no finite point is refused by name.
    let none = PointCloud::from_points(vec![[f32::NAN; 3]; 4]);
    let e = evaluate(&c, &none, &identity_protocol())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ground-truth cloud has no finite point (4 points, 4 not finite)"),
        "{e}"
    );
}

#[test]
fn icp_recovers_a_known_rigid_motion() {
    let target = structured();
    let rot = Rotation3::from_euler_angles(0.03, -0.02, 0.04);
    let t = Vector3::new(0.012, -0.008, 0.015);
    let mut motion = Matrix4::identity();
    motion.fixed_view_mut::<3, 3>(0, 0).copy_from(rot.matrix());
    motion.fixed_view_mut::<3, 1>(0, 3).copy_from(&t);
    let source: Vec<[f64; 3]> = target
        .iter()
        .map(|p| {
            let v = motion * nalgebra::Vector4::new(p[0], p[1], p[2], 1.0);
            [v.x, v.y, v.z]
        })
        .collect();
    let tt = tree(&target).unwrap();
    let normals = estimate_normals(&target, &tt, 30, Some(0.05));
    let r = icp_point_to_plane(
        &source,
        &target,
        &normals,
        &tt,
        &Matrix4::identity(),
        0.1,
        200,
    )
    .unwrap();
    let err = (r.transform * motion - Matrix4::identity()).abs().max();
    println!(
        "ICP: {} iterations, fitness {:.3}, residual transform error {err:.2e}",
        r.iterations, r.fitness
    );
    assert!(err < 1e-6, "{err}");
}

#[test]
fn accuracy_and_completeness_by_hand() {
    let gt = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]];
    let pred = [[0.0, 0.0, 0.1], [1.0, 0.0, 0.3], [5.0, 0.0, 0.0]];
    let up = [[0.0, 0.0, 1.0]; 3];
    let side = [[0.6, 0.8, 0.0]; 3];
    let m = accuracy_completeness(&pred, &side, &gt, &up[..2]).unwrap();
    // pred → gt: 0.1, 0.3, 4.0; gt → pred: 0.1, 0.3.
    assert!((m.Acc - 4.4 / 3.0).abs() < 1e-12 && (m.Acc_med - 0.3).abs() < 1e-12);
    assert!(
        (m.Comp - 0.2).abs() < 1e-12 && (m.Comp_med - 0.2).abs() < 1e-12,
        "numpy median of two values is their mean"
    );
    assert!(
        m.NC1.abs() < 1e-12 && m.NC2.abs() < 1e-12,
        "perpendicular normals"
    );
}

#[test]
fn preprocessing_steps_by_hand() {
    // Two points in one voxel average; the grid starts half a voxel below the minimum.
    let v = voxel_down_sample(&[[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [1.0, 0.0, 0.0]], 1.0);
    assert_eq!(v, vec![[0.2, 0.0, 0.0], [1.0, 0.0, 0.0]]);
    // A far point is an outlier among a dense line.
    let mut line: Vec<[f64; 3]> = (0..200).map(|i| [f64::from(i) * 0.01, 0.0, 0.0]).collect();
    line.push([50.0, 50.0, 50.0]);
    let kept = remove_statistical_outliers(&line, 10, 1.0).unwrap();
    assert!(!kept.contains(&[50.0, 50.0, 50.0]) && kept.len() > 150);
    // Seeded random subset: deterministic, the right size, distinct points.
    let a = random_down_sample(&line, 50, 42);
    assert_eq!(a, random_down_sample(&line, 50, 42));
    assert_eq!(a.len(), 50);
}
