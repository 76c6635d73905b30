//! flowvo's unit tests.

use super::*;
use crate::triangulate::midpoint_cos;
use nalgebra::{Translation3, UnitQuaternion};
use streamrecon_flow::FlowField;

#[test]
fn dense_depth_row_matches_the_midpoint_triangulation() {
    // Two cameras a baseline apart and slightly turned; a chain whose offsets put some pixels
    // behind a camera, some with parallel rays and some with low confidence.
    let k = Intrinsics::from_hfov(64, 8, 60.0);
    let cur = Pose::from_parts(
        Translation3::new(0.3, -0.1, 0.05),
        UnitQuaternion::from_euler_angles(0.02, -0.05, 0.01),
    );
    let key = Pose::identity();
    let row = DepthRow::new(&k, &cur, &key, 2.0);
    let k_inv = k.matrix().try_inverse().expect("invertible");
    let ray = |p: &Pose| p.rotation.to_rotation_matrix().into_inner() * k_inv;
    let axis = cur.rotation * Vector3::z();
    let w = k.width as usize;
    let y = 5;
    let chain: Vec<f32> = (0..w)
        .flat_map(|x| {
            let t = x as f32;
            [
                8.0 * (0.3 * t).sin() - 3.0,
                0.5 * (0.2 * t).cos(),
                (t * 0.037) % 1.0,
            ]
        })
        .collect();
    let (mut depth, mut conf) = (vec![f32::NAN; w], vec![f32::NAN; w]);
    vectorized(DepthRowAt {
        row: &row,
        y,
        chain: &chain,
        depth: &mut depth,
        conf: &mut conf,
    });
    let (mut found, mut rejected) = (0, 0);
    for x in 0..w {
        let (u, v, c) = (chain[3 * x], chain[3 * x + 1], chain[3 * x + 2]);
        let d1 = ray(&cur) * Vector3::new(x as f64, y as f64, 1.0);
        let d2 = ray(&key) * Vector3::new(x as f64 + f64::from(u), y as f64 + f64::from(v), 1.0);
        let (o1, o2) = (
            Point3::from(cur.translation.vector),
            Point3::from(key.translation.vector),
        );
        let expected = midpoint_cos(&o1, &d1, &o2, &d2)
            .map(|(p, cos)| (axis.dot(&(p - o1)), cos))
            .filter(|&(z, _)| c > 0.05 && z > 0.0);
        if let Some((z, cos)) = expected {
            found += 1;
            assert!(
                (f64::from(depth[x]) - z).abs() <= 1e-5 * z,
                "depth at {x}: {} vs {z}",
                depth[x]
            );
            let a2 = 2.0 * (1.0 - cos);
            let want = f64::from(c) * a2 / (a2 + row.theta0_sq);
            assert!(
                (f64::from(conf[x]) - want).abs() <= 1e-6,
                "confidence at {x}"
            );
        } else {
            rejected += 1;
            assert_eq!((depth[x], conf[x]), (0.0, 0.0), "rejected pixel {x}");
        }
    }
    assert!(
        found > 10 && rejected > 5,
        "{found} found, {rejected} rejected"
    );
}

#[test]
fn chains_advance_by_bilinear_composition_and_zero_outside() {
    // 23 × 17: rows of several vector blocks and a remainder; targets leave the image on
    // every side, and one flow value is NaN.
    let (w, h) = (23usize, 17usize);
    let mut bwd = FlowField::zeros(w, h);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            bwd.set(
                x,
                y,
                3.0 * (0.4 * xf + 0.2 * yf).sin(),
                2.5 * (0.3 * xf - 0.5 * yf).cos(),
            );
        }
    }
    bwd.set(7, 4, f32::NAN, 0.0);
    let conf: Vec<f32> = (0..w * h).map(|i| (i % 11) as f32 / 10.0).collect();
    let mut chains = [Chain::new(3, w, h), Chain::new(5, w, h)];
    for (k, c) in chains.iter_mut().enumerate() {
        for (i, v) in c.data.iter_mut().enumerate() {
            *v = ((i * (7 + k)) % 13) as f32 * 0.37 - 2.0;
        }
    }
    let olds: Vec<Vec<f32>> = chains.iter().map(|c| c.data.clone()).collect();
    let [a, b] = &mut chains;
    Chain::advance_all(&mut [a, b], &bwd, &conf);
    for (c, old) in chains.iter().zip(&olds) {
        for y in 0..h {
            for x in 0..w {
                let (bu, bv) = bwd.get(x, y);
                let (tx, ty) = (x as f32 + bu, y as f32 + bv);
                let inside = tx >= 0.0 && ty >= 0.0 && tx <= (w - 1) as f32 && ty <= (h - 1) as f32;
                let want = if inside {
                    let (x0, y0) = (
                        tx.floor().min((w - 2) as f32),
                        ty.floor().min((h - 2) as f32),
                    );
                    let (fx, fy) = (tx - x0, ty - y0);
                    let at =
                        |xx: f32, yy: f32, k: usize| old[3 * (yy as usize * w + xx as usize) + k];
                    let s: Vec<f32> = (0..3)
                        .map(|k| {
                            let t = at(x0, y0, k) + (at(x0 + 1.0, y0, k) - at(x0, y0, k)) * fx;
                            let b = at(x0, y0 + 1.0, k)
                                + (at(x0 + 1.0, y0 + 1.0, k) - at(x0, y0 + 1.0, k)) * fx;
                            t + (b - t) * fy
                        })
                        .collect();
                    [bu + s[0], bv + s[1], conf[y * w + x] * s[2]]
                } else {
                    [0.0; 3]
                };
                let i = 3 * (y * w + x);
                let got = [c.data[i], c.data[i + 1], c.data[i + 2]];
                assert_eq!(
                    got.map(f32::to_bits),
                    want.map(f32::to_bits),
                    "at {x},{y}: {got:?} vs {want:?}"
                );
            }
        }
    }
    // A frame one pixel wide has no cell to sample: everything is outside.
    let mut thin = Chain::new(0, 1, 4);
    for _ in 0..2 {
        Chain::advance_all(&mut [&mut thin], &FlowField::zeros(1, 4), &[1.0; 4]);
        assert!(thin.data.iter().all(|v| *v == 0.0), "{:?}", thin.data);
    }
}
