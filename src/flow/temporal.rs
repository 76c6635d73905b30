//! Temporal filling: a flow's inconsistent pixels taken from a neighbouring pair's flow.
//!
//! Where forward and backward flow disagree (occlusions, and DIS's worst errors), one pair alone
//! has no good answer. The neighbouring pair on the same pixel grid has one: for the forward flow
//! of (t−1 → t), the previous pair's backward flow (t−1 → t−2), negated, is the motion at
//! constant velocity, and those pixels were mostly visible then. The camera's velocity changes
//! between frames (a hand-held camera shakes), so the prediction is first corrected by a
//! quadratic in the pixel coordinates, fitted where the current flow is consistent. Small
//! rotations give exactly such a flow difference.

use nalgebra::{SMatrix, SVector};

use super::FlowField;

/// Stride of the samples the correction is fitted on, on the frame's grid.
const SAMPLE_STRIDE: usize = 4;
/// The same on a grid coarser than the frame's, in its pixels: a few thousand samples pin the
/// six coefficients, and every pixel of a ¼-resolution grid would cost as much as the fill.
const COARSE_SAMPLE_STRIDE: usize = 2;
/// Consistent samples needed for a fit.
const MIN_SAMPLES: usize = 64;
/// A prediction whose corrected form misses the consistent pixels by more than this RMS (frame
/// pixels) is not used: a cut, a jump, or motion the quadratic cannot describe.
const MAX_FIT_RMS: f64 = 1.0;

/// What [`fill_inconsistent`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    /// Pixels replaced.
    pub filled: usize,
    /// RMS of the corrected prediction on the consistent samples, in the flow's pixels.
    pub fit_rms: f64,
}

/// Quadratic basis at a pixel, coordinates scaled to about [−1, 1].
fn basis(x: usize, y: usize, sx: f64, sy: f64) -> SVector<f64, 6> {
    let (xn, yn) = (x as f64 * sx - 1.0, y as f64 * sy - 1.0);
    SVector::from([1.0, xn, yn, xn * xn, xn * yn, yn * yn])
}

/// Replaces `flow` at pixels marked in `inconsistent` by −`opposite` (a flow on the same grid
/// in the opposite direction in time) plus a fitted quadratic correction. Fits on pixels not
/// marked, with `conf` ≥ 0.5. Returns `None`, leaving `flow` unchanged, when the fields differ
/// in size, too few pixels are consistent, or the corrected prediction misses them by more
/// than 1 px RMS. The flows may be on a coarser grid than the frames, each of their pixels
/// `grid` frame pixels a side: the samples and the RMS limit stay in frame pixels.
pub fn fill_inconsistent(
    flow: &mut FlowField,
    inconsistent: &[bool],
    conf: &[f32],
    opposite: &FlowField,
    grid: usize,
) -> Option<Fill> {
    let grid = grid.max(1);
    let (w, h) = (flow.width, flow.height);
    let n = w * h;
    if (opposite.width, opposite.height) != (w, h) || inconsistent.len() != n || conf.len() != n {
        return None;
    }
    let (sx, sy) = (2.0 / w.max(2) as f64, 2.0 / h.max(2) as f64);
    let mut normal = SMatrix::<f64, 6, 6>::zeros();
    let mut rhs_u = SVector::<f64, 6>::zeros();
    let mut rhs_v = SVector::<f64, 6>::zeros();
    let mut samples = Vec::new();
    let step = if grid == 1 {
        SAMPLE_STRIDE
    } else {
        COARSE_SAMPLE_STRIDE
    };
    for y in (0..h).step_by(step) {
        for x in (0..w).step_by(step) {
            let i = y * w + x;
            if inconsistent[i] || conf[i] < 0.5 {
                continue;
            }
            // The flow's difference from the prediction.
            let du = f64::from(flow.data[2 * i] + opposite.data[2 * i]);
            let dv = f64::from(flow.data[2 * i + 1] + opposite.data[2 * i + 1]);
            if !(du.is_finite() && dv.is_finite()) {
                continue;
            }
            let phi = basis(x, y, sx, sy);
            normal += phi * phi.transpose();
            rhs_u += phi * du;
            rhs_v += phi * dv;
            samples.push((phi, du, dv));
        }
    }
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    // A tiny ridge keeps the solve defined when samples cluster in a corner.
    let chol = (normal + SMatrix::<f64, 6, 6>::identity() * 1e-6).cholesky()?;
    let (cu, cv) = (chol.solve(&rhs_u), chol.solve(&rhs_v));
    let sq: f64 = samples
        .iter()
        .map(|(phi, du, dv)| (phi.dot(&cu) - du).powi(2) + (phi.dot(&cv) - dv).powi(2))
        .sum();
    let fit_rms = (sq / samples.len() as f64).sqrt();
    // A NaN RMS is refused too.
    if fit_rms.is_nan() || fit_rms > MAX_FIT_RMS / grid as f64 {
        return None;
    }
    let mut filled = 0;
    for (y, (row, marks)) in flow
        .data
        .chunks_exact_mut(2 * w)
        .zip(inconsistent.chunks_exact(w))
        .enumerate()
    {
        // Along the row the quadratic is c0 + c1 xn + c3 xn²: fold y into c0 and c1.
        let yn = y as f64 * sy - 1.0;
        let along =
            |c: &SVector<f64, 6>| (c[0] + c[2] * yn + c[5] * yn * yn, c[1] + c[4] * yn, c[3]);
        let ((u0, u1, u2), (v0, v1, v2)) = (along(&cu), along(&cv));
        let opp = &opposite.data[2 * y * w..2 * (y + 1) * w];
        for (x, (f, o)) in row.chunks_exact_mut(2).zip(opp.chunks_exact(2)).enumerate() {
            if !marks[x] {
                continue;
            }
            let xn = x as f64 * sx - 1.0;
            f[0] = (u0 + xn * (u1 + xn * u2)) as f32 - o[0];
            f[1] = (v0 + xn * (v1 + xn * v2)) as f32 - o[1];
            filled += 1;
        }
    }
    Some(Fill { filled, fit_rms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_from_the_opposite_flow_corrected_by_a_quadratic() {
        // Previous backward flow: a depth-like pattern. This flow: its negation plus a rotation
        // change (a quadratic in x, y). Pixels in a block are marked inconsistent and garbled.
        let (w, h) = (64, 48);
        let mut opposite = FlowField::zeros(w, h);
        let mut flow = FlowField::zeros(w, h);
        let extra = |x: f32, y: f32| (0.3 + 0.01 * x - 0.002 * y * y / 10.0, -0.2 + 0.004 * x);
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32, y as f32);
                let (bu, bv) = (-2.0 - (0.2 * xf).sin(), 1.0 + (0.15 * yf).cos());
                opposite.set(x, y, bu, bv);
                let (eu, ev) = extra(xf, yf);
                flow.set(x, y, -bu + eu, -bv + ev);
            }
        }
        let truth = flow.clone();
        let mut bad = vec![false; w * h];
        for y in 10..20 {
            for x in 30..45 {
                bad[y * w + x] = true;
                flow.set(x, y, 9.0, -9.0);
            }
        }
        let conf = vec![1.0; w * h];
        let fill = fill_inconsistent(&mut flow, &bad, &conf, &opposite, 1).expect("fits");
        assert_eq!(fill.filled, 150);
        assert!(fill.fit_rms < 1e-3, "{fill:?}");
        for (a, b) in flow.data.iter().zip(&truth.data) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        // An unrelated prediction is refused and changes nothing.
        let mut noise = FlowField::zeros(w, h);
        for (i, v) in noise.data.iter_mut().enumerate() {
            *v = ((i * 7919) % 13) as f32 - 6.0;
        }
        let before = flow.clone();
        assert!(fill_inconsistent(&mut flow, &bad, &conf, &noise, 1).is_none());
        assert_eq!(flow, before);
    }
}
