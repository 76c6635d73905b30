//! Trajectory accuracy: Sim(3) Umeyama alignment, ATE RMSE and RPE.

use nalgebra::{Matrix3, Point3, Rotation3, Vector3};
use serde::Serialize;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Pose;

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
    let median = errs[errs.len() / 2];
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
