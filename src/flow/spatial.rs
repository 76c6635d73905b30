//! Spatial filling: a flow's unreliable pixels taken from the reliable ones in the same image
//! region.
//!
//! Where the two directions of a pair disagree by more than a pixel, DIS's answer is mostly
//! wrong: occlusions, and on real pairs with large displacements whole regions where its coarse
//! levels locked onto the wrong match (on the Middlebury aloe pair, a third of the pixels at
//! ¼ resolution). Their neighbours on the same surface usually have it right. The fill is a
//! normalised edge-aware smoothing: a fast global smoother (Min et al. 2014) guided by the
//! source image smooths the reliable flow times its weight and the weight alone; their ratio at
//! an unreliable pixel is a weighted mean of the reliable flow that does not cross the image's
//! edges. Reliable pixels keep their own flow.
//!
//! It runs on DIS's grid, before any upsampling: at ¼ resolution a sixteenth of the frame's
//! pixels. The smoother is written here, with the semantics of OpenCV's (`ximgproc`'s
//! `fastGlobalSmootherFilter`: weights exp(−|Δgrey| / σ), a horizontal then a vertical pass per
//! iteration, λ quartered after each of three; its results match to 5e-6): OpenCV's took
//! 3.0 ms a call at 160×120 on our 2-core machine, most of it building a 196,608-entry weight
//! table and fresh buffers in every call, where this takes 0.85 ms (both with the system
//! allocator), and the fill runs for every pair.

use opencv::core::Mat;
use opencv::prelude::*;
use serde::{Deserialize, Serialize};

use super::FlowField;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::simd::{vectorized, Kernel};

/// Parameters of the fill.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpatialFill {
    /// Forward–backward disagreement (frame pixels) beyond which a pixel is filled.
    pub max_disagreement: f32,
    /// The smoother's strength (its λ): how far the reliable flow reaches.
    pub lambda: f64,
    /// Grey-level difference across which the smoothing fades (its σ).
    pub sigma_grey: f64,
}

impl Default for SpatialFill {
    /// Chosen on the real pairs of `benches/flow_real.rs` (Middlebury motorcycle and aloe) at
    /// every preset; `flow_dis` checks the synthetic sequences.
    fn default() -> Self {
        Self {
            max_disagreement: 1.0,
            lambda: 30.0,
            sigma_grey: 4.0,
        }
    }
}

/// Pixels whose forward–backward disagreement exceeds `max_disagreement` frame pixels, from the
/// confidence [`super::consistency::fb_check`] gave the unfused `flow` on a grid of `grid` frame
/// pixels a side (and every pixel whose target left the image: confidence 0).
pub fn unreliable(flow: &FlowField, conf: &[f32], grid: usize, max_disagreement: f32) -> Vec<bool> {
    let max = max_disagreement / grid.max(1) as f32;
    let max2 = max * max;
    flow.data
        .chunks_exact(2)
        .zip(conf)
        .map(|(f, &c)| super::consistency::disagreement2(c, f[0], f[1], grid) > max2)
        .collect()
}

/// Replaces `flow` at the pixels marked in `unreliable` by the edge-aware mean of the others,
/// guided by `guide` (the flow's source image on the flow's grid, 8-bit grey). Returns the
/// pixels filled: none when every pixel or none is marked (a pixel no reliable one reaches keeps
/// its own flow).
///
/// # Errors
/// The sizes differ, the guide is not 8-bit grey, or OpenCV fails.
pub fn fill_unreliable(
    flow: &mut FlowField,
    unreliable: &[bool],
    guide: &Mat,
    params: &SpatialFill,
) -> Result<usize> {
    let (w, h) = (flow.width, flow.height);
    let n = w * h;
    if unreliable.len() != n
        || (guide.cols() as usize, guide.rows() as usize) != (w, h)
        || guide.typ() != opencv::core::CV_8UC1
    {
        return Err(Error::Flow(format!(
            "spatial fill: a {w}x{h} flow with {} marks and a {}x{} guide of OpenCV type {}",
            unreliable.len(),
            guide.cols(),
            guide.rows(),
            guide.typ()
        )));
    }
    let marked = unreliable.iter().filter(|&&u| u).count();
    if marked == 0 || marked == n {
        return Ok(0);
    }
    let grey = guide.data_bytes()?;
    let mut planes: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0; n]);
    for (i, (f, &bad)) in flow.data.chunks_exact(2).zip(unreliable).enumerate() {
        if !bad && f[0].is_finite() && f[1].is_finite() {
            (planes[0][i], planes[1][i], planes[2][i]) = (f[0], f[1], 1.0);
        }
    }
    Smoother::new(grey, w, h, params.sigma_grey).smooth(&mut planes, params.lambda as f32);
    let [su, sv, sm] = &planes;
    let mut filled = 0;
    for (i, f) in flow.data.chunks_exact_mut(2).enumerate() {
        // The smoother is linear with positive weights, so the ratio is a weighted mean
        // however small the weight has become far from the reliable pixels (on the aloe pair
        // the fill reaches across regions where it is 1e-30): only an exact zero is no answer.
        if unreliable[i] && sm[i] > 0.0 {
            f[0] = su[i] / sm[i];
            f[1] = sv[i] / sm[i];
            filled += 1;
        }
    }
    Ok(filled)
}

/// Iterations of the smoother, and the factor λ takes after each (OpenCV's defaults).
const ITERATIONS: usize = 3;
const ATTENUATION: f32 = 0.25;

/// Rows the horizontal pass takes at a time, transposed, so that it runs as the vertical one
/// does: a vector operation across them per step (8 lanes of AVX2).
const BAND: usize = 8;

/// The fast global smoother for one guide: each pass solves (I + λ L) x = b along every row
/// (or column), L the 1-D Laplacian weighted by exp(−|Δgrey| / σ) between neighbours.
struct Smoother {
    w: usize,
    h: usize,
    /// Weights between each pixel and its right neighbour (0 past the last column), in bands
    /// of [`BAND`] rows transposed: band b's weight at (x, b · BAND + r) is `right[b · w + x][r]`
    /// (0 for rows past the last).
    right: Vec<[f32; BAND]>,
    /// Weights between each pixel and the one below (0 past the last row), row-major.
    down: Vec<f32>,
}

impl Smoother {
    fn new(grey: &[u8], w: usize, h: usize, sigma: f64) -> Self {
        let lut: Vec<f32> = (0..256)
            .map(|d| (-f64::from(d) / sigma.max(1e-6)).exp() as f32)
            .collect();
        let weight = |a: u8, b: u8| lut[usize::from(a.abs_diff(b))];
        let mut right = vec![[0.0; BAND]; h.div_ceil(BAND) * w];
        let mut down = vec![0.0; w * h];
        for y in 0..h {
            let row = &grey[y * w..][..w];
            let band = &mut right[(y / BAND) * w..][..w];
            for x in 0..w - 1 {
                band[x][y % BAND] = weight(row[x], row[x + 1]);
            }
            if y + 1 < h {
                let below = &grey[(y + 1) * w..][..w];
                for x in 0..w {
                    down[y * w + x] = weight(row[x], below[x]);
                }
            }
        }
        Self { w, h, right, down }
    }

    /// Smooths the planes (`w` × `h`, row-major) in place.
    fn smooth(&self, planes: &mut [Vec<f32>; 3], lambda: f32) {
        let (w, h) = (self.w, self.h);
        // The eliminated super-diagonal, shared by the three planes.
        let mut c = vec![0.0; w * h];
        let mut band = vec![[[0.0; BAND]; 3]; w];
        let mut band_c = vec![[0.0; BAND]; w];
        let mut lambda = lambda;
        for _ in 0..ITERATIONS {
            for y0 in (0..h).step_by(BAND) {
                let rows = (h - y0).min(BAND);
                for (k, p) in planes.iter().enumerate() {
                    for r in 0..rows {
                        for (b, v) in band.iter_mut().zip(&p[(y0 + r) * w..][..w]) {
                            b[k][r] = *v;
                        }
                    }
                }
                vectorized(BandPass {
                    band: &mut band,
                    weight: &self.right[y0 / BAND * w..][..w],
                    lambda,
                    c: &mut band_c,
                });
                for (k, p) in planes.iter_mut().enumerate() {
                    for r in 0..rows {
                        for (b, v) in band.iter().zip(&mut p[(y0 + r) * w..][..w]) {
                            *v = b[k][r];
                        }
                    }
                }
            }
            let [p0, p1, p2] = planes;
            vectorized(ColumnPass {
                planes: [p0, p1, p2],
                weight: &self.down,
                w,
                h,
                lambda,
                c: &mut c,
            });
            lambda *= ATTENUATION;
        }
    }
}

/// [`ColumnPass`] along a band of [`BAND`] rows, transposed: `band[x][plane][r]` is row r's
/// pixel x, and `weight[x][r]` links it to pixel x + 1. Arrays of the band's width, so each
/// step is one vector operation (a slice that short ran in the scalar tail of a vector loop).
struct BandPass<'a> {
    band: &'a mut [[[f32; BAND]; 3]],
    weight: &'a [[f32; BAND]],
    lambda: f32,
    c: &'a mut [[f32; BAND]],
}

impl Kernel for BandPass<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let BandPass {
            band,
            weight,
            lambda,
            c,
        } = self;
        let n = band.len().min(weight.len()).min(c.len());
        if n == 0 {
            return;
        }
        // Column 0 has no link to the left.
        for r in 0..BAND {
            let ac = lambda * weight[0][r];
            let d = 1.0 / (1.0 + ac);
            c[0][r] = -ac * d;
            for plane in &mut band[0] {
                plane[r] *= d;
            }
        }
        for x in 1..n {
            let (done, rest) = band.split_at_mut(x);
            let (prev, b) = (&done[x - 1], &mut rest[0]);
            let (c_done, c_rest) = c.split_at_mut(x);
            let (c_prev, cx) = (&c_done[x - 1], &mut c_rest[0]);
            let (wp, wx) = (&weight[x - 1], &weight[x]);
            let mut d = [0.0; BAND];
            let mut ap = [0.0; BAND];
            for r in 0..BAND {
                ap[r] = lambda * wp[r];
                let ac = lambda * wx[r];
                d[r] = 1.0 / (1.0 + ap[r] + ac + ap[r] * c_prev[r]);
                cx[r] = -ac * d[r];
            }
            for k in 0..3 {
                for r in 0..BAND {
                    b[k][r] = (b[k][r] + ap[r] * prev[k][r]) * d[r];
                }
            }
        }
        for x in (0..n - 1).rev() {
            let (head, tail) = band.split_at_mut(x + 1);
            let (b, next, cx) = (&mut head[x], &tail[0], &c[x]);
            for k in 0..3 {
                for r in 0..BAND {
                    b[k][r] -= cx[r] * next[k][r];
                }
            }
        }
    }
}

/// Solves (I + λ L) x = b down every column of three `w` × `h` planes at once (the Thomas
/// algorithm, each step a row of vector operations), `weight[y · w + x]` linking rows y and
/// y + 1 of column x; `c` holds the eliminated super-diagonal.
struct ColumnPass<'a> {
    planes: [&'a mut [f32]; 3],
    weight: &'a [f32],
    w: usize,
    h: usize,
    lambda: f32,
    c: &'a mut [f32],
}

impl Kernel for ColumnPass<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let ColumnPass {
            planes: [p0, p1, p2],
            weight,
            w,
            h,
            lambda,
            c,
        } = self;
        // Row 0 has no link above.
        for (x, (wx, cx)) in weight[..w].iter().zip(&mut c[..w]).enumerate() {
            let ac = lambda * wx;
            let d = 1.0 / (1.0 + ac);
            *cx = -ac * d;
            p0[x] *= d;
            p1[x] *= d;
            p2[x] *= d;
        }
        for y in 1..h {
            let rows = (y - 1) * w..(y + 1) * w;
            let (ca, cy) = c[rows.clone()].split_at_mut(w);
            let (ua, uy) = p0[rows.clone()].split_at_mut(w);
            let (va, vy) = p1[rows.clone()].split_at_mut(w);
            let (ma, my) = p2[rows.clone()].split_at_mut(w);
            let (wa, wy) = weight[rows].split_at(w);
            for x in 0..w {
                let (ap, ac) = (lambda * wa[x], lambda * wy[x]);
                let d = 1.0 / (1.0 + ap + ac + ap * ca[x]);
                cy[x] = -ac * d;
                uy[x] = (uy[x] + ap * ua[x]) * d;
                vy[x] = (vy[x] + ap * va[x]) * d;
                my[x] = (my[x] + ap * ma[x]) * d;
            }
        }
        // Back substitution.
        for y in (0..h - 1).rev() {
            let cy = &c[y * w..][..w];
            let rows = y * w..(y + 2) * w;
            let (uy, ub) = p0[rows.clone()].split_at_mut(w);
            let (vy, vb) = p1[rows.clone()].split_at_mut(w);
            let (my, mb) = p2[rows].split_at_mut(w);
            for (((c, (u, ub)), (v, vb)), (m, mb)) in cy
                .iter()
                .zip(uy.iter_mut().zip(ub.iter()))
                .zip(vy.iter_mut().zip(vb.iter()))
                .zip(my.iter_mut().zip(mb.iter()))
            {
                *u -= c * ub;
                *v -= c * vb;
                *m -= c * mb;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grey guide of two regions split at column `edge`.
    fn two_regions(w: usize, h: usize, edge: usize) -> Mat {
        let px: Vec<u8> = (0..w * h)
            .map(|i| if i % w < edge { 40 } else { 200 })
            .collect();
        Mat::new_rows_cols_with_data(h as i32, w as i32, &px)
            .expect("guide")
            .try_clone()
            .expect("owned")
    }

    #[test]
    fn unreliable_pixels_take_their_own_region_s_flow() {
        // Left region moves (3, 0), right (−2, 1); a block inside each, and a band along the
        // edge, is wrong and marked.
        let (w, h, edge) = (48, 32, 20);
        let truth = |x: usize| if x < edge { (3.0, 0.0) } else { (-2.0, 1.0) };
        let mut flow = FlowField::zeros(w, h);
        let mut bad = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let marked = (8..14).contains(&y)
                    && ((4..10).contains(&x) || (30..40).contains(&x) || (17..23).contains(&x));
                let (u, v) = if marked { (25.0, -9.0) } else { truth(x) };
                flow.data[2 * i] = u;
                flow.data[2 * i + 1] = v;
                bad[i] = marked;
            }
        }
        let filled = fill_unreliable(
            &mut flow,
            &bad,
            &two_regions(w, h, edge),
            &SpatialFill::default(),
        )
        .expect("fill");
        assert_eq!(filled, bad.iter().filter(|&&b| b).count());
        for y in 0..h {
            for x in 0..w {
                let (u, v) = flow.get(x, y);
                let (tu, tv) = truth(x);
                assert!(
                    (u - tu).abs() < 0.05 && (v - tv).abs() < 0.05,
                    "({x},{y}): {u},{v} vs {tu},{tv}"
                );
            }
        }
    }

    /// (I + λ L) x along one line, `link[i]` joining values i and i + 1.
    fn apply(x: &[f32], link: &[f32], lambda: f32) -> Vec<f32> {
        let n = x.len();
        (0..n)
            .map(|i| {
                let mut v = x[i];
                if i > 0 {
                    v += lambda * link[i - 1] * (x[i] - x[i - 1]);
                }
                if i + 1 < n {
                    v += lambda * link[i] * (x[i] - x[i + 1]);
                }
                v
            })
            .collect()
    }

    fn wavy(n: usize, k: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * (k + 3) * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn each_pass_solves_its_tridiagonal_systems() {
        // Columns: every column of the solved planes, put back through (I + λ L), gives the
        // planes it started from. Rows likewise, through the band kernel (a partial band).
        let (w, h, lambda) = (13, 11, 30.0);
        let weight: Vec<f32> = (0..w * h)
            .map(|i| {
                if i / w + 1 == h {
                    0.0
                } else {
                    ((i * 37) % 10) as f32 / 10.0
                }
            })
            .collect();
        let b: [Vec<f32>; 3] = std::array::from_fn(|k| wavy(w * h, k));
        let mut x = b.clone();
        let mut c = vec![0.0; w * h];
        let [p0, p1, p2] = &mut x;
        vectorized(ColumnPass {
            planes: [p0, p1, p2],
            weight: &weight,
            w,
            h,
            lambda,
            c: &mut c,
        });
        for k in 0..3 {
            for col in 0..w {
                let line: Vec<f32> = (0..h).map(|y| x[k][y * w + col]).collect();
                let link: Vec<f32> = (0..h).map(|y| weight[y * w + col]).collect();
                for (y, v) in apply(&line, &link, lambda).iter().enumerate() {
                    let want = b[k][y * w + col];
                    assert!((v - want).abs() < 1e-3, "plane {k} column {col} row {y}");
                }
            }
        }
        let n = 17;
        let rows = 5;
        let link: Vec<[f32; BAND]> = (0..n)
            .map(|i| {
                std::array::from_fn(|r| {
                    if i + 1 == n {
                        0.0
                    } else {
                        ((i * 13 + r * 7) % 10) as f32 / 10.0
                    }
                })
            })
            .collect();
        let start: Vec<[[f32; BAND]; 3]> = (0..n)
            .map(|i| {
                std::array::from_fn(|k| {
                    std::array::from_fn(|r| {
                        if r < rows {
                            wavy(n * BAND, k)[i * BAND + r]
                        } else {
                            0.0
                        }
                    })
                })
            })
            .collect();
        let mut band = start.clone();
        let mut c = vec![[0.0; BAND]; n];
        vectorized(BandPass {
            band: &mut band,
            weight: &link,
            lambda,
            c: &mut c,
        });
        for k in 0..3 {
            for r in 0..BAND {
                let line: Vec<f32> = band.iter().map(|v| v[k][r]).collect();
                let l: Vec<f32> = link.iter().map(|v| v[r]).collect();
                for (i, v) in apply(&line, &l, lambda).iter().enumerate() {
                    assert!(
                        (v - start[i][k][r]).abs() < 1e-3,
                        "plane {k} row {r} column {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_constant_stays_constant_and_edges_hold() {
        // The Laplacian's rows sum to zero; across a strong grey edge the weight is ~0, so a
        // step in the planes that follows it survives the smoothing.
        let (w, h) = (40, 24);
        let grey: Vec<u8> = (0..w * h)
            .map(|i| if i % w < 17 { 30 } else { 220 })
            .collect();
        let mut planes: [Vec<f32>; 3] = [
            vec![2.5; w * h],
            (0..w * h)
                .map(|i| if i % w < 17 { -1.0 } else { 4.0 })
                .collect(),
            vec![0.0; w * h],
        ];
        Smoother::new(&grey, w, h, 4.0).smooth(&mut planes, 30.0);
        for (i, (a, b)) in planes[0].iter().zip(&planes[1]).enumerate() {
            assert!((a - 2.5).abs() < 1e-4, "{i}");
            let want = if i % w < 17 { -1.0 } else { 4.0 };
            assert!((b - want).abs() < 1e-3, "{i}: {b}");
        }
    }

    #[test]
    fn nothing_or_everything_marked_leaves_the_flow_alone_and_bad_sizes_are_refused() {
        let mut flow = FlowField::zeros(16, 12);
        flow.data[0] = 7.0;
        let guide = two_regions(16, 12, 8);
        let p = SpatialFill::default();
        for all in [false, true] {
            let got = fill_unreliable(&mut flow, &[all; 16 * 12], &guide, &p).expect("fill");
            assert_eq!(got, 0);
            assert_eq!(flow.data[0].to_bits(), 7.0f32.to_bits());
        }
        let small = two_regions(8, 12, 4);
        let err = fill_unreliable(&mut flow, &[false; 16 * 12], &small, &p).expect_err("size");
        assert!(err.to_string().contains("8x12 guide"), "{err}");
    }
}
