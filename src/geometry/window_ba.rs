//! Windowed bundle adjustment for `flowvo`: the poses of a few recent frames and the points they
//! see, refined together by minimising a robust (Huber) reprojection error, with tiny-solver's
//! Levenberg–Marquardt (sparse Cholesky, derivatives by dual numbers).
//!
//! Each free pose is a 6-vector (ω, τ) that perturbs its starting `cam_from_world` on the left,
//! `x_cam = exp(ω)·(R₀·X + t₀) + τ`, so every variable starts at zero, far from the rotation
//! parameterisation's singularities. The window's oldest frames are held fixed: with two of
//! them fixed the monocular gauge (frame and scale) is fixed too.

use std::collections::HashMap;

use nalgebra::{Point3, Rotation3, Translation3, UnitQuaternion, Vector3};
use tiny_solver::factors::{na, Factor};
use tiny_solver::loss_functions::HuberLoss;
use tiny_solver::optimizer::{Optimizer, OptimizerOptions};
use tiny_solver::{LevenbergMarquardtOptimizer, Problem};

use streamrecon_core::frame::{Intrinsics, Pose};

/// One measurement: point `point` seen at pixel (x, y) in window frame `frame`.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub frame: usize,
    pub point: usize,
    pub x: f64,
    pub y: f64,
}

/// A window to refine, in and out: poses are `cam_from_world`.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub cam_from_world: Vec<Pose>,
    /// Frames whose pose is held (at least the two oldest, for the gauge).
    pub fixed: Vec<bool>,
    /// Weight of each frame's observations (1 = plain; novelty weights when adaptive).
    pub weight: Vec<f64>,
    pub points: Vec<Point3<f64>>,
    pub observations: Vec<Observation>,
}

/// What a refinement did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refined {
    /// Median reprojection error before and after, pixels.
    pub median_px_before: f64,
    pub median_px_after: f64,
}

/// Reprojection of a world point into a camera, residual in pixels (scaled by √weight).
struct Reprojection {
    rotation: [f64; 9],
    translation: [f64; 3],
    /// fx, fy, cx, cy.
    k: [f64; 4],
    pixel: [f64; 2],
    sqrt_weight: f64,
    /// The first parameter block is the pose perturbation (else the pose is fixed).
    free_pose: bool,
}

/// exp(ω)·p by Rodrigues' formula; first order near ω = 0 (exact value and derivative there).
pub(crate) fn rotate<T: na::RealField>(w: &[T; 3], p: &[T; 3]) -> [T; 3] {
    let cross = [
        w[1].clone() * p[2].clone() - w[2].clone() * p[1].clone(),
        w[2].clone() * p[0].clone() - w[0].clone() * p[2].clone(),
        w[0].clone() * p[1].clone() - w[1].clone() * p[0].clone(),
    ];
    let theta2 =
        w[0].clone() * w[0].clone() + w[1].clone() * w[1].clone() + w[2].clone() * w[2].clone();
    if theta2 < T::from_f64(1e-14).expect("f64 constant") {
        return [
            p[0].clone() + cross[0].clone(),
            p[1].clone() + cross[1].clone(),
            p[2].clone() + cross[2].clone(),
        ];
    }
    let theta = theta2.clone().sqrt();
    let (s, c) = (theta.clone().sin(), theta.clone().cos());
    let one = T::one();
    let dot =
        w[0].clone() * p[0].clone() + w[1].clone() * p[1].clone() + w[2].clone() * p[2].clone();
    // k (k·p)(1 − cos θ) with k = ω/θ is ω (ω·p)(1 − cos θ)/θ².
    let along = dot * (one - c.clone()) / theta2;
    let sinc = s / theta;
    std::array::from_fn(|i| {
        p[i].clone() * c.clone() + cross[i].clone() * sinc.clone() + w[i].clone() * along.clone()
    })
}

impl<T: na::RealField> Factor<T> for Reprojection {
    fn residual_func(&self, params: &[na::DVector<T>]) -> na::DVector<T> {
        let f = |v: f64| T::from_f64(v).expect("f64 constant");
        let point = if self.free_pose {
            &params[1]
        } else {
            &params[0]
        };
        let r = &self.rotation;
        let mut p: [T; 3] = std::array::from_fn(|i| {
            f(r[3 * i]) * point[0].clone()
                + f(r[3 * i + 1]) * point[1].clone()
                + f(r[3 * i + 2]) * point[2].clone()
                + f(self.translation[i])
        });
        if self.free_pose {
            let d = &params[0];
            let rotated = rotate(&[d[0].clone(), d[1].clone(), d[2].clone()], &p);
            p = [
                rotated[0].clone() + d[3].clone(),
                rotated[1].clone() + d[4].clone(),
                rotated[2].clone() + d[5].clone(),
            ];
        }
        // A point that drifted behind the camera keeps a finite (large) residual.
        let z = if p[2] > f(1e-6) {
            p[2].clone()
        } else {
            f(1e-6)
        };
        let [fx, fy, cx, cy] = self.k;
        let u = f(fx) * p[0].clone() / z.clone() + f(cx);
        let v = f(fy) * p[1].clone() / z + f(cy);
        let s = f(self.sqrt_weight);
        na::DVector::from_vec(vec![
            (u - f(self.pixel[0])) * s.clone(),
            (v - f(self.pixel[1])) * s,
        ])
    }
}

fn reprojection_px(k: &Intrinsics, cam_from_world: &Pose, p: &Point3<f64>, o: &Observation) -> f64 {
    let pc = cam_from_world * p;
    k.project(&pc)
        .map_or(f64::INFINITY, |(u, v)| (u - o.x).hypot(v - o.y))
}

fn median_px(k: &Intrinsics, w: &Window) -> f64 {
    let mut e: Vec<f64> = w
        .observations
        .iter()
        .map(|o| reprojection_px(k, &w.cam_from_world[o.frame], &w.points[o.point], o))
        .collect();
    if e.is_empty() {
        return 0.0;
    }
    let mid = e.len() / 2;
    *e.select_nth_unstable_by(mid, f64::total_cmp).1
}

/// Refines the window's free poses and its points in place; `None` (window unchanged) when the
/// solver fails or does not lower the median reprojection error.
pub fn refine(
    k: &Intrinsics,
    window: &mut Window,
    huber_px: f64,
    iterations: usize,
) -> Option<Refined> {
    let n_frames = window.cam_from_world.len();
    if window.observations.is_empty() || window.fixed.iter().all(|&f| f) {
        return None;
    }
    let before = median_px(k, window);
    let mut problem = Problem::new();
    let pose_name = |i: usize| format!("pose{i}");
    let point_name = |j: usize| format!("point{j}");
    for o in &window.observations {
        let pose = &window.cam_from_world[o.frame];
        let r = pose.rotation.to_rotation_matrix();
        let m = r.matrix();
        let t = pose.translation.vector;
        let factor = Reprojection {
            rotation: std::array::from_fn(|i| m[(i / 3, i % 3)]),
            translation: [t.x, t.y, t.z],
            k: [k.fx, k.fy, k.cx, k.cy],
            pixel: [o.x, o.y],
            sqrt_weight: window
                .weight
                .get(o.frame)
                .copied()
                .unwrap_or(1.0)
                .max(0.0)
                .sqrt(),
            free_pose: !window.fixed[o.frame],
        };
        let (pn, xn) = (pose_name(o.frame), point_name(o.point));
        let vars: Vec<&str> = if factor.free_pose {
            vec![pn.as_str(), xn.as_str()]
        } else {
            vec![xn.as_str()]
        };
        problem.add_residual_block(
            2,
            &vars,
            Box::new(factor),
            Some(Box::new(HuberLoss::new(huber_px))),
        );
    }
    let mut initial: HashMap<String, na::DVector<f64>> = HashMap::new();
    for i in (0..n_frames).filter(|&i| !window.fixed[i]) {
        initial.insert(pose_name(i), na::DVector::zeros(6));
    }
    for (j, p) in window.points.iter().enumerate() {
        initial.insert(point_name(j), na::DVector::from_vec(vec![p.x, p.y, p.z]));
    }
    let options = OptimizerOptions {
        max_iteration: iterations,
        ..OptimizerOptions::default()
    };
    let solved =
        LevenbergMarquardtOptimizer::default().optimize(&problem, &initial, Some(options))?;
    let mut refined = window.clone();
    for i in (0..n_frames).filter(|&i| !window.fixed[i]) {
        let Some(d) = solved.get(&pose_name(i)) else {
            continue;
        };
        if d.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let rot =
            UnitQuaternion::from_rotation_matrix(&Rotation3::new(Vector3::new(d[0], d[1], d[2])));
        let delta = Pose::from_parts(Translation3::new(d[3], d[4], d[5]), rot);
        refined.cam_from_world[i] = delta * window.cam_from_world[i];
    }
    for (j, p) in refined.points.iter_mut().enumerate() {
        if let Some(x) = solved.get(&point_name(j)) {
            if x.iter().all(|v| v.is_finite()) {
                *p = Point3::new(x[0], x[1], x[2]);
            }
        }
    }
    let after = median_px(k, &refined);
    if after.is_nan() || after > before {
        return None;
    }
    *window = refined;
    Some(Refined {
        median_px_before: before,
        median_px_after: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn k() -> Intrinsics {
        Intrinsics {
            fx: 300.0,
            fy: 300.0,
            cx: 160.0,
            cy: 120.0,
            width: 320,
            height: 240,
        }
    }

    #[test]
    fn perturbed_poses_and_points_return_to_the_truth() {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(3);
        // Five cameras sliding along x, looking down +z at points 3–6 m away.
        let truth: Vec<Pose> = (0..5)
            .map(|i| {
                Pose::from_parts(
                    Translation3::new(-0.1 * f64::from(i), 0.0, 0.0),
                    UnitQuaternion::from_euler_angles(0.0, 0.01 * f64::from(i), 0.0),
                )
            })
            .collect();
        let points: Vec<Point3<f64>> = (0..80)
            .map(|_| {
                Point3::new(
                    rng.random_range(-2.0..2.0),
                    rng.random_range(-1.5..1.5),
                    rng.random_range(3.0..6.0),
                )
            })
            .collect();
        let mut observations = Vec::new();
        for (f, pose) in truth.iter().enumerate() {
            for (j, p) in points.iter().enumerate() {
                if let Some((x, y)) = k().project(&(pose * p)) {
                    observations.push(Observation {
                        frame: f,
                        point: j,
                        x,
                        y,
                    });
                }
            }
        }
        let mut w = Window {
            cam_from_world: truth.clone(),
            fixed: vec![true, true, false, false, false],
            weight: vec![1.0; 5],
            points: points
                .iter()
                .map(|p| {
                    p + Vector3::new(
                        rng.random_range(-0.05..0.05),
                        rng.random_range(-0.05..0.05),
                        rng.random_range(-0.05..0.05),
                    )
                })
                .collect(),
            observations,
        };
        for (pose, t) in w.cam_from_world.iter_mut().zip(&truth).skip(2) {
            *pose = Pose::from_parts(
                Translation3::new(0.02, -0.01, 0.03),
                UnitQuaternion::from_euler_angles(0.005, -0.004, 0.003),
            ) * t;
        }
        let r = refine(&k(), &mut w, 2.0, 30).expect("refined");
        assert!(r.median_px_before > 1.0, "{r:?}");
        assert!(r.median_px_after < 1e-3, "{r:?}");
        for (i, (pose, t)) in w.cam_from_world.iter().zip(&truth).enumerate() {
            let d = (pose.translation.vector - t.translation.vector).norm();
            assert!(d < 1e-4, "frame {i}: {d}");
        }
    }
}
