//! Trajectory accuracy: Sim(3) Umeyama alignment, ATE RMSE and RPE.

use nalgebra::{Matrix3, Point3, Rotation3, Vector3};
use serde::Serialize;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Pose;
use streamrecon_datasets::formats::tum::StampedPose;

/// How far apart in time an estimated and a ground-truth pose may be and still be matched, in
/// seconds (evo's default `--t_max_diff`).
pub const MAX_TIME_DIFF: f64 = 0.01;

/// The median of sorted values, as numpy's: the mean of the two middle values of an even count.
fn median_of_sorted(v: &[f64]) -> f64 {
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Pairs of (ground truth, estimate) poses matched by timestamp as evo does: each pose of the
/// shorter trajectory (the estimate when both are as long) takes the other's nearest pose in time
/// (the first of equally near ones) if it is at most `max_diff` seconds away.
///
/// # Errors
/// Fewer than 3 pairs, with the two trajectories' time spans in the message.
pub fn associate(
    gt: &[StampedPose],
    est: &[StampedPose],
    max_diff: f64,
) -> Result<(Vec<Pose>, Vec<Pose>)> {
    let nearest = |stamps: &[StampedPose], t: f64| -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, s) in stamps.iter().enumerate() {
            let d = (s.timestamp - t).abs();
            if best.is_none_or(|(_, b)| d < b) {
                best = Some((i, d));
            }
        }
        best.filter(|&(_, d)| d <= max_diff).map(|(i, _)| i)
    };
    let (mut gts, mut ests) = (Vec::new(), Vec::new());
    if gt.len() > est.len() {
        for e in est {
            if let Some(i) = nearest(gt, e.timestamp) {
                gts.push(gt[i].world_from_cam);
                ests.push(e.world_from_cam);
            }
        }
    } else {
        for g in gt {
            if let Some(i) = nearest(est, g.timestamp) {
                gts.push(g.world_from_cam);
                ests.push(est[i].world_from_cam);
            }
        }
    }
    if gts.len() < 3 {
        let span = |s: &[StampedPose]| match (s.first(), s.last()) {
            (Some(a), Some(b)) => {
                format!("{} poses, {:.6}–{:.6} s", s.len(), a.timestamp, b.timestamp)
            }
            _ => "no poses".to_string(),
        };
        return Err(Error::Invalid(format!(
            "{} pose(s) matched within {max_diff} s, alignment needs ≥ 3 (ground truth: {}; estimate: {}); a clock offset larger than the tolerance matches nothing",
            gts.len(),
            span(gt),
            span(est)
        )));
    }
    Ok((gts, ests))
}

/// A similarity transform `y = s·R·x + t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sim3 {
    pub scale: f64,
    pub rotation: Rotation3<f64>,
    pub translation: Vector3<f64>,
}

impl Sim3 {
    pub fn apply(&self, p: &Point3<f64>) -> Point3<f64> {
        Point3::from(self.rotation * p.coords * self.scale + self.translation)
    }
}

/// Least-squares similarity (Umeyama 1991) mapping `src` onto `dst`; `with_scale = false` gives SE(3).
///
/// # Errors
/// Fewer than 3 points, different lengths, or a degenerate (collinear / zero-spread) source.
pub fn umeyama(src: &[Point3<f64>], dst: &[Point3<f64>], with_scale: bool) -> Result<Sim3> {
    if src.len() != dst.len() || src.len() < 3 {
        return Err(Error::Invalid(format!(
            "alignment needs ≥ 3 matched points, got {} and {}",
            src.len(),
            dst.len()
        )));
    }
    let n = src.len() as f64;
    let mu_s = src.iter().map(|p| p.coords).sum::<Vector3<f64>>() / n;
    let mu_d = dst.iter().map(|p| p.coords).sum::<Vector3<f64>>() / n;
    let mut cov = Matrix3::zeros();
    let mut var_s = 0.0;
    for (s, d) in src.iter().zip(dst) {
        let a = s.coords - mu_s;
        let b = d.coords - mu_d;
        cov += b * a.transpose();
        var_s += a.norm_squared();
    }
    cov /= n;
    var_s /= n;
    if var_s < 1e-18 {
        return Err(Error::Invalid(
            "alignment source points have no spread".into(),
        ));
    }
    let svd = cov.svd(true, true);
    let (Some(u), Some(vt)) = (svd.u, svd.v_t) else {
        return Err(Error::Invalid("SVD failed in alignment".into()));
    };
    let mut sgn = Matrix3::identity();
    if (u.determinant() * vt.determinant()) < 0.0 {
        sgn[(2, 2)] = -1.0;
    }
    let r = u * sgn * vt;
    let d = svd.singular_values;
    let trace = d[0] * sgn[(0, 0)] + d[1] * sgn[(1, 1)] + d[2] * sgn[(2, 2)];
    let scale = if with_scale { trace / var_s } else { 1.0 };
    let rotation = Rotation3::from_matrix(&r);
    let translation = mu_d - rotation * mu_s * scale;
    Ok(Sim3 {
        scale,
        rotation,
        translation,
    })
}

/// Pose errors of an estimated trajectory against ground truth.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PoseMetrics {
    pub frames: usize,
    /// Absolute trajectory error (RMSE of camera centres after Sim(3) alignment), GT units.
    pub ate_rmse: f64,
    pub ate_mean: f64,
    pub ate_median: f64,
    /// ATE RMSE as a fraction of the GT trajectory length.
    pub ate_rmse_over_length: f64,
    /// RPE over `delta` frames: RMSE of relative translation error (GT units, after scale) and mean rotation error (degrees).
    pub rpe_trans_rmse: f64,
    pub rpe_rot_deg: f64,
    pub delta: usize,
    pub scale: f64,
    pub gt_length: f64,
}

/// ATE / RPE of `est` against `gt` (matched by position in the slices).
///
/// # Errors
/// Fewer than 3 poses, mismatched lengths, or a degenerate trajectory.
pub fn pose_metrics(gt: &[Pose], est: &[Pose], delta: usize) -> Result<PoseMetrics> {
    if gt.len() != est.len() {
        return Err(Error::Invalid(format!(
            "{} ground-truth poses but {} estimated",
            gt.len(),
            est.len()
        )));
    }
    let cg: Vec<Point3<f64>> = gt
        .iter()
        .map(|p| Point3::from(p.translation.vector))
        .collect();
    let ce: Vec<Point3<f64>> = est
        .iter()
        .map(|p| Point3::from(p.translation.vector))
        .collect();
    let sim = umeyama(&ce, &cg, true)?;
    let mut errs: Vec<f64> = ce
        .iter()
        .zip(&cg)
        .map(|(e, g)| (sim.apply(e) - g).norm())
        .collect();
    let n = errs.len() as f64;
    let rmse = (errs.iter().map(|e| e * e).sum::<f64>() / n).sqrt();
    let mean = errs.iter().sum::<f64>() / n;
    errs.sort_by(f64::total_cmp);
    let median = median_of_sorted(&errs);
    let length: f64 = cg.windows(2).map(|w| (w[1] - w[0]).norm()).sum();
    let delta = delta.max(1);
    let (mut t2, mut rsum, mut m) = (0.0, 0.0, 0usize);
    for i in 0..gt.len().saturating_sub(delta) {
        let rel_gt = gt[i].inverse() * gt[i + delta];
        let rel_est = est[i].inverse() * est[i + delta];
        let rel_est_t = rel_est.translation.vector * sim.scale;
        t2 += (rel_est_t - rel_gt.translation.vector).norm_squared();
        rsum += (rel_gt.rotation.inverse() * rel_est.rotation)
            .angle()
            .to_degrees();
        m += 1;
    }
    Ok(PoseMetrics {
        frames: gt.len(),
        ate_rmse: rmse,
        ate_mean: mean,
        ate_median: median,
        ate_rmse_over_length: if length > 0.0 {
            rmse / length
        } else {
            f64::NAN
        },
        rpe_trans_rmse: if m > 0 {
            (t2 / m as f64).sqrt()
        } else {
            f64::NAN
        },
        rpe_rot_deg: if m > 0 { rsum / m as f64 } else { f64::NAN },
        delta,
        scale: sim.scale,
        gt_length: length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert!((median_of_sorted(&[1.0, 2.0, 4.0, 10.0]) - 3.0).abs() < 1e-12);
        assert!((median_of_sorted(&[1.0, 2.0, 4.0]) - 2.0).abs() < 1e-12);
    }

    fn stamped(t: &[f64]) -> Vec<StampedPose> {
        t.iter()
            .map(|&timestamp| StampedPose {
                timestamp,
                world_from_cam: Pose::translation(timestamp, 0.0, 0.0),
            })
            .collect()
    }

    #[test]
    fn poses_match_within_evos_tolerance() {
        let gt = stamped(&[0.0, 0.1, 0.2, 0.3, 0.4]);
        // A 5 ms clock offset: within evo's 10 ms.
        let est = stamped(&[0.005, 0.105, 0.205, 0.305]);
        let (g, e) = associate(&gt, &est, MAX_TIME_DIFF).unwrap();
        assert_eq!((g.len(), e.len()), (4, 4));
        assert!((g[3].translation.x - 0.3).abs() < 1e-12);
        assert!((e[3].translation.x - 0.305).abs() < 1e-12);
        // With 1 ms nothing matches, and the error says what was compared.
        let err = associate(&gt, &est, 0.001).unwrap_err().to_string();
        assert!(err.contains("0 pose(s) matched within 0.001 s"), "{err}");
        assert!(
            err.contains("0.000000–0.400000 s") && err.contains("0.005000–0.305000 s"),
            "{err}"
        );
    }
}
