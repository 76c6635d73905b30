//! The Long3D reconstruction protocol, step by step as the official InfiniteVGGT script
//! (`src/eval/mv_recon_long/launch.py`, Open3D) does it:
//!
//! 1. the predicted cloud is moved into the LiDAR frame by the inverse camera→LiDAR extrinsic;
//! 2. both clouds: voxel downsampling (mean per voxel, grid anchored half a voxel below the
//!    minimum) and statistical outlier removal (100 neighbours including the point itself, keep
//!    mean distance < mean + 1.0·sample std);
//! 3. the larger cloud is randomly downsampled to the smaller's size (seeded);
//! 4. initial similarity: centre both, scale the prediction by 0.75·rms_gt/rms_pred;
//! 5. GT normals from neighbours within 2·voxel (at most 30); point-to-plane ICP (correspondences
//!    within 0.05, at most 200 iterations, stop when fitness and inlier RMSE change < 1e-6); no
//!    correspondences = the initial transform;
//! 6. normals of both re-estimated from 30 nearest neighbours; Accuracy (pred → GT nearest
//!    distance), Completeness (GT → pred), and normal consistency |n·n'| of those pairs; mean and
//!    median of each.
//!
//! Differences to Open3D that cannot matter beyond noise: the random downsampling uses our own
//! seeded generator (Open3D's sequence is not reproducible outside Open3D), voxel output is sorted
//! by voxel index, and the ICP update uses a rotation vector instead of Euler angles.

use std::collections::HashMap;
use std::num::NonZero;

use kiddo::{ImmutableKdTree, SquaredEuclidean};
use nalgebra::{Matrix4, Matrix6, Rotation3, Vector3, Vector6};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};

/// The camera→LiDAR extrinsic of clouds already in the ground truth's frame.
pub const IDENTITY_CAM_TO_LIDAR: [[f64; 4]; 4] = [
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 0.0, 1.0],
];

/// The official camera→LiDAR extrinsic of the Long3D release (digits as published).
#[allow(clippy::unreadable_literal)]
pub const OFFICIAL_CAM_TO_LIDAR: [[f64; 4]; 4] = [
    [-0.012577, -0.999915, -0.003397, -0.03],
    [0.345639, -0.001159, -0.938367, -0.04],
    [0.938283, -0.012976, 0.345625, -0.03],
    [0.0, 0.0, 0.0, 1.0],
];

/// Protocol parameters (defaults = the official script).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Long3dConfig {
    /// Camera→LiDAR extrinsic; the prediction is moved by its inverse.
    pub cam_to_lidar: [[f64; 4]; 4],
    pub voxel: f64,
    pub outlier_neighbours: usize,
    pub outlier_std_ratio: f64,
    /// Factor on rms_gt/rms_pred in the initial scale.
    pub scale_init: f64,
    /// Initialise ICP by centring both clouds and scaling (the official step); off = start from
    /// the clouds as given (when a better alignment is known, e.g. from ground-truth poses).
    pub centre_init: bool,
    pub icp_max_distance: f64,
    pub icp_max_iterations: usize,
    /// GT normals for ICP: neighbours within this many voxels, at most `icp_normal_max_nn`.
    pub icp_normal_radius_voxels: f64,
    pub icp_normal_max_nn: usize,
    /// Normals for the metrics: this many nearest neighbours.
    pub metric_normal_knn: usize,
    pub seed: u64,
}

impl Default for Long3dConfig {
    fn default() -> Self {
        Self {
            cam_to_lidar: OFFICIAL_CAM_TO_LIDAR,
            voxel: 0.015,
            outlier_neighbours: 100,
            outlier_std_ratio: 1.0,
            scale_init: 0.75,
            centre_init: true,
            icp_max_distance: 0.05,
            icp_max_iterations: 200,
            icp_normal_radius_voxels: 2.0,
            icp_normal_max_nn: 30,
            metric_normal_knn: 30,
            seed: 42,
        }
    }
}

/// The official `metrics.txt` keys.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[allow(non_snake_case)]
pub struct Long3dMetrics {
    pub Acc: f64,
    pub Comp: f64,
    pub NC1: f64,
    pub NC2: f64,
    pub Acc_med: f64,
    pub Comp_med: f64,
    pub NC_mean: f64,
    pub NC_med: f64,
}

/// Metrics plus what happened on the way.
#[derive(Debug, Clone, Serialize)]
pub struct Long3dReport {
    pub metrics: Long3dMetrics,
    pub points_pred: usize,
    pub points_gt: usize,
    /// Points with a NaN or infinite coordinate, dropped before anything else.
    pub points_pred_non_finite: usize,
    pub points_gt_non_finite: usize,
    pub points_evaluated: usize,
    pub icp_iterations: usize,
    pub icp_fitness: f64,
    pub icp_inlier_rmse: f64,
    pub icp_converged: bool,
    /// pred → GT similarity after ICP, row-major 4×4 (includes the initial scale).
    pub transform: [[f64; 4]; 4],
}

type P = [f64; 3];

/// A k-d tree over points.
///
/// # Errors
/// kiddo refuses the points.
pub fn tree(points: &[P]) -> Result<ImmutableKdTree<f64, 3>> {
    ImmutableKdTree::<f64, 3>::new_from_slice(points)
        .map_err(|e| Error::Invalid(format!("k-d tree: {e:?}")))
}

fn apply(t: &Matrix4<f64>, p: &P) -> P {
    let v = t * nalgebra::Vector4::new(p[0], p[1], p[2], 1.0);
    [v.x, v.y, v.z]
}

/// Voxel downsampling as Open3D: mean of the points in each voxel of a grid anchored at
/// min_bound − voxel/2; output sorted by voxel index.
pub fn voxel_down_sample(points: &[P], voxel: f64) -> Vec<P> {
    if points.is_empty() || voxel <= 0.0 {
        return points.to_vec();
    }
    let mut min = [f64::INFINITY; 3];
    for p in points {
        for k in 0..3 {
            min[k] = min[k].min(p[k]);
        }
    }
    let origin = [
        min[0] - voxel * 0.5,
        min[1] - voxel * 0.5,
        min[2] - voxel * 0.5,
    ];
    let mut cells: HashMap<[i64; 3], ([f64; 3], u32)> = HashMap::new();
    for p in points {
        let key = [
            ((p[0] - origin[0]) / voxel).floor() as i64,
            ((p[1] - origin[1]) / voxel).floor() as i64,
            ((p[2] - origin[2]) / voxel).floor() as i64,
        ];
        let e = cells.entry(key).or_insert(([0.0; 3], 0));
        for (acc, v) in e.0.iter_mut().zip(p) {
            *acc += v;
        }
        e.1 += 1;
    }
    let mut v: Vec<([i64; 3], P)> = cells
        .into_iter()
        .map(|(k, (s, n))| {
            (
                k,
                [
                    s[0] / f64::from(n),
                    s[1] / f64::from(n),
                    s[2] / f64::from(n),
                ],
            )
        })
        .collect();
    v.sort_unstable_by_key(|(k, _)| *k);
    v.into_iter().map(|(_, p)| p).collect()
}

/// Statistical outlier removal as Open3D: each point's mean distance to its `k` nearest points
/// (itself included); keep 0 < mean < global mean + ratio·sample std.
///
/// # Errors
/// The k-d tree cannot be built.
pub fn remove_statistical_outliers(points: &[P], k: usize, std_ratio: f64) -> Result<Vec<P>> {
    if points.is_empty() || k == 0 {
        return Ok(points.to_vec());
    }
    let t = tree(points)?;
    let kk = NonZero::new(k).expect("k > 0");
    let avg: Vec<f64> = points
        .par_iter()
        .map(|p| {
            let nn = t.query(p).nearest_n::<SquaredEuclidean<f64>>(kk).execute();
            nn.iter().map(|r| r.distance.sqrt()).sum::<f64>() / nn.len() as f64
        })
        .collect();
    let valid: Vec<f64> = avg.iter().copied().filter(|d| *d >= 0.0).collect();
    let n = valid.len() as f64;
    let mean = valid.iter().sum::<f64>() / n;
    let var = valid.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let threshold = mean + std_ratio * var.sqrt();
    Ok(points
        .iter()
        .zip(&avg)
        .filter(|(_, d)| **d > 0.0 && **d < threshold)
        .map(|(p, _)| *p)
        .collect())
}

/// Seeded random subset of `count` points (order of the shuffle kept, as Open3D does).
pub fn random_down_sample(points: &[P], count: usize, seed: u64) -> Vec<P> {
    let mut idx: Vec<usize> = (0..points.len()).collect();
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    idx.truncate(count.min(points.len()));
    idx.into_iter().map(|i| points[i]).collect()
}

/// Normals from the `k` nearest neighbours (itself included), optionally only within `radius`.
pub fn estimate_normals(
    points: &[P],
    t: &ImmutableKdTree<f64, 3>,
    k: usize,
    radius: Option<f64>,
) -> Vec<P> {
    let kk = NonZero::new(k.max(1)).expect("k > 0");
    points
        .par_iter()
        .map(|p| {
            let nn = match radius {
                Some(r) => t
                    .query(p)
                    .nearest_n::<SquaredEuclidean<f64>>(kk)
                    .within(r * r)
                    .execute(),
                None => t.query(p).nearest_n::<SquaredEuclidean<f64>>(kk).execute(),
            };
            streamrecon_core::cloud::pca_normal(nn.iter().map(|r| points[r.item as usize]))
        })
        .collect()
}

fn rms_about_centre(points: &[P]) -> (Vector3<f64>, f64) {
    let n = points.len() as f64;
    let c = points
        .iter()
        .fold(Vector3::zeros(), |a, p| a + Vector3::new(p[0], p[1], p[2]))
        / n;
    let ms = points
        .iter()
        .map(|p| (Vector3::new(p[0], p[1], p[2]) - c).norm_squared())
        .sum::<f64>()
        / n;
    (c, ms.sqrt())
}

/// Initial similarity: centre both clouds, scale the source by `factor`·rms_target/rms_source.
pub fn scale_and_init_transform(source: &[P], target: &[P], factor: f64) -> Matrix4<f64> {
    let (cs, rs) = rms_about_centre(source);
    let (ct, rt) = rms_about_centre(target);
    let s = if rs > 0.0 { factor * rt / rs } else { 1.0 };
    let mut pre = Matrix4::identity();
    pre.fixed_view_mut::<3, 1>(0, 3).copy_from(&(-cs));
    let mut post = Matrix4::identity();
    post.fixed_view_mut::<3, 1>(0, 3).copy_from(&ct);
    let mut scale = Matrix4::identity();
    for k in 0..3 {
        scale[(k, k)] = s;
    }
    post * scale * pre
}

/// The outcome of [`icp_point_to_plane`].
pub struct IcpResult {
    pub transform: Matrix4<f64>,
    pub iterations: usize,
    pub fitness: f64,
    pub rmse: f64,
    pub converged: bool,
}

/// Correspondences within `max_dist`: (source index, target index), fitness and inlier RMSE.
fn correspondences(
    src: &[P],
    t: &ImmutableKdTree<f64, 3>,
    max_dist: f64,
) -> (Vec<(usize, usize)>, f64, f64) {
    let found: Vec<Option<(usize, usize, f64)>> = src
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let nn = t.query(p).nearest_one::<SquaredEuclidean<f64>>().execute();
            (nn.distance <= max_dist * max_dist).then_some((i, nn.item as usize, nn.distance))
        })
        .collect();
    let pairs: Vec<(usize, usize, f64)> = found.into_iter().flatten().collect();
    if pairs.is_empty() {
        return (Vec::new(), 0.0, 0.0);
    }
    let err2: f64 = pairs.iter().map(|x| x.2).sum();
    let rmse = (err2 / pairs.len() as f64).sqrt();
    let fitness = pairs.len() as f64 / src.len() as f64;
    (
        pairs.into_iter().map(|(a, b, _)| (a, b)).collect(),
        fitness,
        rmse,
    )
}

/// Point-to-plane ICP of `source` onto `target` (Open3D's loop and convergence test), from
/// `init`; `None` when no correspondence exists.
pub fn icp_point_to_plane(
    source: &[P],
    target: &[P],
    target_normals: &[P],
    t: &ImmutableKdTree<f64, 3>,
    init: &Matrix4<f64>,
    max_dist: f64,
    max_iter: usize,
) -> Option<IcpResult> {
    let mut transform = *init;
    let mut pcd: Vec<P> = source.iter().map(|p| apply(init, p)).collect();
    let (mut corr, mut fitness, mut rmse) = correspondences(&pcd, t, max_dist);
    if corr.is_empty() {
        return None;
    }
    let mut iterations = 0;
    let mut converged = false;
    for _ in 0..max_iter {
        iterations += 1;
        let (jtj, jtr) = corr
            .par_iter()
            .map(|&(i, j)| {
                let p = Vector3::from(pcd[i]);
                let q = Vector3::from(target[j]);
                let n = Vector3::from(target_normals[j]);
                let r = (p - q).dot(&n);
                let c = p.cross(&n);
                let jrow = Vector6::new(c.x, c.y, c.z, n.x, n.y, n.z);
                (jrow * jrow.transpose(), jrow * r)
            })
            .reduce(
                || (Matrix6::zeros(), Vector6::zeros()),
                |a, b| (a.0 + b.0, a.1 + b.1),
            );
        let Some(x) = jtj.cholesky().map(|c| c.solve(&(-jtr))) else {
            break;
        };
        let rot = Rotation3::from_scaled_axis(Vector3::new(x[0], x[1], x[2]));
        let mut update = Matrix4::identity();
        update.fixed_view_mut::<3, 3>(0, 0).copy_from(rot.matrix());
        update
            .fixed_view_mut::<3, 1>(0, 3)
            .copy_from(&Vector3::new(x[3], x[4], x[5]));
        transform = update * transform;
        pcd.par_iter_mut().for_each(|p| *p = apply(&update, p));
        let (c2, f2, r2) = correspondences(&pcd, t, max_dist);
        let done = (fitness - f2).abs() < 1e-6 && (rmse - r2).abs() < 1e-6;
        corr = c2;
        fitness = f2;
        rmse = r2;
        if done || corr.is_empty() {
            converged = done;
            break;
        }
    }
    Some(IcpResult {
        transform,
        iterations,
        fitness,
        rmse,
        converged,
    })
}

fn mean_median(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    // numpy's median: mean of the two middle values for even counts.
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    };
    (mean, med)
}

/// Interleaves the low 21 bits of three integers (Morton / Z-order code).
fn morton(x: u64, y: u64, z: u64) -> u64 {
    fn spread(mut v: u64) -> u64 {
        v &= 0x1f_ffff;
        v = (v | (v << 32)) & 0x1f_0000_0000_ffff;
        v = (v | (v << 16)) & 0x1f_0000_ff00_00ff;
        v = (v | (v << 8)) & 0x100f_00f0_0f00_f00f;
        v = (v | (v << 4)) & 0x10c3_0c30_c30c_30c3;
        v = (v | (v << 2)) & 0x1249_2492_4924_9249;
        v
    }
    spread(x) | (spread(y) << 1) | (spread(z) << 2)
}

/// Indices of `points` in Z-order, so consecutive queries touch nearby tree nodes.
fn z_order(points: &[P]) -> Vec<usize> {
    let mut min = [f64::INFINITY; 3];
    let mut max = [f64::NEG_INFINITY; 3];
    for p in points {
        for k in 0..3 {
            min[k] = min[k].min(p[k]);
            max[k] = max[k].max(p[k]);
        }
    }
    let span = (0..3)
        .map(|k| max[k] - min[k])
        .fold(0.0, f64::max)
        .max(1e-12);
    let q = |v: f64, k: usize| (((v - min[k]) / span) * 2_097_151.0) as u64;
    let mut keyed: Vec<(u64, usize)> = points
        .par_iter()
        .enumerate()
        .map(|(i, p)| (morton(q(p[0], 0), q(p[1], 1), q(p[2], 2)), i))
        .collect();
    keyed.par_sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// Nearest-neighbour distances from `from` into `to` (with `to`'s tree), and |n·n'| of the pairs,
/// in an unspecified order (the statistics do not depend on it).
fn nn_distances_and_normal_consistency(
    from: &[P],
    from_n: &[P],
    to_tree: &ImmutableKdTree<f64, 3>,
    to_n: &[P],
) -> (Vec<f64>, Vec<f64>) {
    let order = z_order(from);
    let queries: Vec<P> = order.iter().map(|&i| from[i]).collect();
    let found = to_tree
        .query_batch(&queries)
        .nearest_one::<SquaredEuclidean<f64>>()
        .execute();
    order
        .par_iter()
        .zip(found.par_iter())
        .map(|(&i, nn)| {
            let (n, m) = (from_n[i], to_n[nn.item as usize]);
            (
                nn.distance.sqrt(),
                (n[0] * m[0] + n[1] * m[1] + n[2] * m[2]).abs(),
            )
        })
        .unzip()
}

/// Accuracy and completeness (mean, median) with normal consistency, on already-aligned clouds.
///
/// # Errors
/// An empty cloud or a failed k-d tree.
pub fn accuracy_completeness(
    pred: &[P],
    pred_n: &[P],
    gt: &[P],
    gt_n: &[P],
) -> Result<Long3dMetrics> {
    if pred.is_empty() || gt.is_empty() {
        return Err(Error::Invalid(
            "accuracy/completeness need two non-empty clouds".into(),
        ));
    }
    let (tg, tp) = rayon::join(|| tree(gt), || tree(pred));
    let (tg, tp) = (tg?, tp?);
    let (mut acc, mut nc1) = nn_distances_and_normal_consistency(pred, pred_n, &tg, gt_n);
    let (mut comp, mut nc2) = nn_distances_and_normal_consistency(gt, gt_n, &tp, pred_n);
    let (acc_m, acc_med) = mean_median(&mut acc);
    let (comp_m, comp_med) = mean_median(&mut comp);
    let (nc1_m, nc1_med) = mean_median(&mut nc1);
    let (nc2_m, nc2_med) = mean_median(&mut nc2);
    Ok(Long3dMetrics {
        Acc: acc_m,
        Comp: comp_m,
        NC1: nc1_m,
        NC2: nc2_m,
        Acc_med: acc_med,
        Comp_med: comp_med,
        NC_mean: 0.5 * (nc1_m + nc2_m),
        NC_med: 0.5 * (nc1_med + nc2_med),
    })
}

/// A cloud's finite points, and how many it had with a NaN or infinite coordinate.
fn finite_points_of(c: &PointCloud) -> (Vec<P>, usize) {
    let points: Vec<P> = c
        .points
        .iter()
        .filter(|p| p.iter().all(|v| v.is_finite()))
        .map(|p| [f64::from(p[0]), f64::from(p[1]), f64::from(p[2])])
        .collect();
    let dropped = c.points.len() - points.len();
    (points, dropped)
}

/// Runs the whole protocol on a predicted cloud (camera/world frame of the run) and the GT map.
///
/// Points with a NaN or infinite coordinate are dropped first, counted in the report.
///
/// # Errors
/// An empty cloud (before or after preprocessing; no finite point) or a singular extrinsic.
pub fn evaluate(pred: &PointCloud, gt: &PointCloud, cfg: &Long3dConfig) -> Result<Long3dReport> {
    let (pred_points, pred_non_finite) = finite_points_of(pred);
    let (gt_points, gt_non_finite) = finite_points_of(gt);
    for (what, n, all) in [
        ("predicted", pred_non_finite, pred.len()),
        ("ground-truth", gt_non_finite, gt.len()),
    ] {
        if n > 0 {
            log::warn!("{n} of the {all} {what} points have NaN or infinite coordinates: dropped");
        }
    }
    if pred_points.is_empty() {
        return Err(Error::Invalid(format!(
            "the predicted cloud has no finite point ({} points, {pred_non_finite} not finite)",
            pred.len()
        )));
    }
    if gt_points.is_empty() {
        return Err(Error::Invalid(format!(
            "the ground-truth cloud has no finite point ({} points, {gt_non_finite} not finite)",
            gt.len()
        )));
    }
    let ext = Matrix4::from_fn(|r, c| cfg.cam_to_lidar[r][c]);
    let inv = ext
        .try_inverse()
        .ok_or_else(|| Error::Invalid("the camera→LiDAR extrinsic is singular".into()))?;
    let pred_l: Vec<P> = pred_points.iter().map(|p| apply(&inv, p)).collect();
    let prep = |pts: &[P]| -> Result<Vec<P>> {
        remove_statistical_outliers(
            &voxel_down_sample(pts, cfg.voxel),
            cfg.outlier_neighbours,
            cfg.outlier_std_ratio,
        )
    };
    let (pc, gc) = rayon::join(|| prep(&pred_l), || prep(&gt_points));
    let (pred_clean, gt_clean) = (pc?, gc?);
    if pred_clean.is_empty() || gt_clean.is_empty() {
        return Err(Error::Invalid(
            "a cloud is empty after voxel downsampling and outlier removal".into(),
        ));
    }
    let (np, ng) = (pred_clean.len(), gt_clean.len());
    // Open3D keeps int(ratio · n) points.
    let (pred_eval, gt_eval) = if np > ng {
        let count = ((ng as f64 / np as f64) * np as f64) as usize;
        (random_down_sample(&pred_clean, count, cfg.seed), gt_clean)
    } else {
        let count = ((np as f64 / ng as f64) * ng as f64) as usize;
        (pred_clean, random_down_sample(&gt_clean, count, cfg.seed))
    };
    let init = if cfg.centre_init {
        scale_and_init_transform(&pred_eval, &gt_eval, cfg.scale_init)
    } else {
        Matrix4::identity()
    };
    let gt_tree = tree(&gt_eval)?;
    let gt_icp_normals = estimate_normals(
        &gt_eval,
        &gt_tree,
        cfg.icp_normal_max_nn,
        Some(cfg.icp_normal_radius_voxels * cfg.voxel),
    );
    let icp = icp_point_to_plane(
        &pred_eval,
        &gt_eval,
        &gt_icp_normals,
        &gt_tree,
        &init,
        cfg.icp_max_distance,
        cfg.icp_max_iterations,
    );
    if icp.is_none() {
        log::warn!(
            "ICP found no correspondences within {} m: using the initial transform",
            cfg.icp_max_distance
        );
    }
    let transform = icp.as_ref().map_or(init, |r| r.transform);
    let pred_aligned: Vec<P> = pred_eval.iter().map(|p| apply(&transform, p)).collect();
    let pred_tree = tree(&pred_aligned)?;
    let (gn, pn) = rayon::join(
        || estimate_normals(&gt_eval, &gt_tree, cfg.metric_normal_knn, None),
        || estimate_normals(&pred_aligned, &pred_tree, cfg.metric_normal_knn, None),
    );
    let metrics = accuracy_completeness(&pred_aligned, &pn, &gt_eval, &gn)?;
    Ok(Long3dReport {
        metrics,
        points_pred: pred.len(),
        points_gt: gt.len(),
        points_pred_non_finite: pred_non_finite,
        points_gt_non_finite: gt_non_finite,
        points_evaluated: pred_aligned.len(),
        icp_iterations: icp.as_ref().map_or(0, |r| r.iterations),
        icp_fitness: icp.as_ref().map_or(0.0, |r| r.fitness),
        icp_inlier_rmse: icp.as_ref().map_or(0.0, |r| r.rmse),
        icp_converged: icp.as_ref().is_some_and(|r| r.converged),
        transform: std::array::from_fn(|r| std::array::from_fn(|c| transform[(r, c)])),
    })
}
