//! Dense depth by per-pixel midpoint triangulation along a flow chain, and the texture measure
//! new tracks are placed by.

use nalgebra::{Matrix3, Vector3};

use streamrecon_core::frame::{Intrinsics, Pose, RgbImage};
use streamrecon_core::simd::Kernel;

/// What every row of [`FlowVo::dense_depth`] shares: rays are linear maps of the pixel
/// (world_from_cam rotation × K⁻¹, no divisions), the baseline is fixed. Plain arrays: the
/// loop vectorises over them, not over nalgebra's views.
pub(super) struct DepthRow {
    /// Columns of the current frame's pixel-to-ray map.
    cur: [[f64; 3]; 3],
    /// Columns of the keyframe's pixel-to-ray map.
    key: [[f64; 3]; 3],
    /// Current − key camera centre.
    w0: [f64; 3],
    /// The current camera's optical axis in the world.
    axis: [f64; 3],
    pub(super) theta0_sq: f64,
}

impl DepthRow {
    /// For the current frame at `cur` against the keyframe at `key` (both world_from_cam).
    pub(super) fn new(k: &Intrinsics, cur: &Pose, key: &Pose, depth_angle_deg: f64) -> Self {
        let k_inv = Matrix3::new(
            1.0 / k.fx,
            0.0,
            -k.cx / k.fx,
            0.0,
            1.0 / k.fy,
            -k.cy / k.fy,
            0.0,
            0.0,
            1.0,
        );
        let columns = |p: &Pose| {
            let m = p.rotation.to_rotation_matrix().matrix() * k_inv;
            [0, 1, 2].map(|j| [m[(0, j)], m[(1, j)], m[(2, j)]])
        };
        let w0 = cur.translation.vector - key.translation.vector;
        let axis = cur.rotation * Vector3::z();
        let theta0 = depth_angle_deg.to_radians();
        Self {
            cur: columns(cur),
            key: columns(key),
            w0: [w0.x, w0.y, w0.z],
            axis: [axis.x, axis.y, axis.z],
            theta0_sq: theta0 * theta0,
        }
    }
}

/// Row `y` of the dense depth: `chain` is the row of (Δx, Δy, confidence) to the keyframe.
pub(super) struct DepthRowAt<'a> {
    pub(super) row: &'a DepthRow,
    pub(super) y: usize,
    pub(super) chain: &'a [f32],
    pub(super) depth: &'a mut [f32],
    pub(super) conf: &'a mut [f32],
}

impl Kernel for DepthRowAt<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        depth_row(self.row, self.y, self.chain, self.depth, self.conf);
    }
}

/// The midpoint triangulation of `triangulate::midpoint_cos`, specialised per pixel and written
/// without branches (a failed test writes 0), so the compiler vectorises it. A function of its
/// own: as arguments, the slices are known not to overlap; as fields of the kernel they are not,
/// and the loop stayed scalar.
#[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
#[inline(always)]
pub(super) fn depth_row(
    row: &DepthRow,
    y: usize,
    chain: &[f32],
    depth: &mut [f32],
    conf: &mut [f32],
) {
    let DepthRow {
        cur: [d0, d1, d2],
        key: [c0, c1, c2],
        w0,
        axis,
        theta0_sq,
    } = *row;
    let yf = y as f64;
    let dc_row = [0, 1, 2].map(|i| d1[i] * yf + d2[i]);
    let dot = |p: &[f64; 3], q: &[f64; 3]| p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
    // Indexed, not zipped iterators: the compiler vectorises this form.
    let w = depth.len();
    let (chain, conf) = (&chain[..3 * w], &mut conf[..w]);
    for x in 0..w {
        let xf = x as f64;
        let (u, v, c) = (
            f64::from(chain[3 * x]),
            f64::from(chain[3 * x + 1]),
            f64::from(chain[3 * x + 2]),
        );
        let (kx, ky) = (xf + u, yf + v);
        let dc = [
            dc_row[0] + d0[0] * xf,
            dc_row[1] + d0[1] * xf,
            dc_row[2] + d0[2] * xf,
        ];
        let dk = [
            c0[0] * kx + c1[0] * ky + c2[0],
            c0[1] * kx + c1[1] * ky + c2[1],
            c0[2] * kx + c1[2] * ky + c2[2],
        ];
        let (a, b, cc) = (dot(&dc, &dc), dot(&dc, &dk), dot(&dk, &dk));
        let (d, e) = (dot(&dc, &w0), dot(&dk, &w0));
        let denom = a * cc - b * b;
        let inv = 1.0 / denom;
        let (s, t) = ((b * e - cc * d) * inv, (a * e - b * d) * inv);
        // Depth of the midpoint (oc + s·dc + ok + t·dk) / 2 along the optical axis.
        let mid = [0, 1, 2].map(|i| dc[i] * s + dk[i] * t - w0[i]);
        let z = 0.5 * dot(&axis, &mid);
        let cos = (b / (a * cc).sqrt()).clamp(-1.0, 1.0);
        // angle² ≈ 2(1 − cos) for small angles; a rational ramp instead of 1 − exp(−a²/θ0²).
        let a2 = 2.0 * (1.0 - cos);
        // Confident flow, rays not parallel, the point in front of both cameras (`&`, not
        // `&&`: no branch per test).
        #[allow(clippy::needless_bitwise_bool)]
        let ok = (c > 0.05) & (denom.abs() >= 1e-12 * a * cc) & (s > 0.0) & (t > 0.0) & (z > 0.0);
        depth[x] = if ok { z as f32 } else { 0.0 };
        conf[x] = if ok {
            (c * a2 / (a2 + theta0_sq)) as f32
        } else {
            0.0
        };
    }
}

pub(super) fn grey_and_gradient(img: &RgbImage) -> (Vec<f32>, Vec<f32>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let grey: Vec<f32> = img
        .pixels()
        .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
        .collect();
    let mut grad = vec![0.0f32; w * h];
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let gx = 0.5 * (grey[y * w + x + 1] - grey[y * w + x - 1]);
            let gy = 0.5 * (grey[(y + 1) * w + x] - grey[(y - 1) * w + x]);
            grad[y * w + x] = (gx * gx + gy * gy).sqrt();
        }
    }
    (grey, grad)
}
