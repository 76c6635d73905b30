//! Full-resolution refinement of a dense flow by windowed Lucas–Kanade steps.
//!
//! DIS's presets estimate flow at ¼ (ultrafast, fast) or ½ (medium) resolution and upsample it,
//! from patches of 8–12 px. This refines every pixel against the full-resolution images: a step
//! solves, per pixel, brightness constancy linearised and summed over a (2r+1)² window, with a
//! Tikhonov term that keeps weakly textured pixels where they are, and with a brightness offset
//! per window solved for and eliminated: exposure changes between frames otherwise pulled the
//! flow (on camera-like synthetic frames with ±15 % exposure, flowvo's ATE went from 0.99–3.33 %
//! of the path to 0.04–0.08 %; the Middlebury motorcycle pair's EPE fell 2–6 %, while
//! `flow_dis`'s clean synthetic EPE rose 1–4 %). It is inverse compositional:
//! the linearisation uses the source image's gradients, so gradients and the windowed structure
//! tensor belong to the frame ([`FrameTensor`]). They are computed once per frame and shared by
//! the two pairs the frame is in, as the source of one direction and the target of the other.
//!
//! Window sums are running sums (cost independent of the radius), accumulated in f64 so that
//! adding and removing rows leaves no drift.

// Kernels index several slices with one counter: the form the compiler vectorises.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::FlowField;
use streamrecon_core::flow_field::TargetCells;
use streamrecon_core::simd::{vectorized, Kernel};

/// A grey frame with what refinement needs of it: the lightly smoothed image, its gradients and
/// their windowed products (sums over the window, not means). Its buffers are reused when it
/// is recomputed for a later frame.
pub struct FrameTensor {
    width: usize,
    height: usize,
    radius: usize,
    grey: Vec<f32>,
    gx: Vec<f32>,
    gy: Vec<f32>,
    sxx: Vec<f32>,
    sxy: Vec<f32>,
    syy: Vec<f32>,
    /// Window sums of the gradients, and 1 / the window's pixel count (fewer at the borders):
    /// for the brightness offset each window's step allows for.
    sgx: Vec<f32>,
    sgy: Vec<f32>,
    inv_count: Vec<f32>,
    /// Intermediate images (smoothed rows, then the gradient products).
    scratch: [Vec<f32>; 3],
}

impl FrameTensor {
    /// `grey` is row-major `width` × `height`, both ≥ 2; the window is (2 `radius` + 1)².
    /// Rows are processed in parallel.
    ///
    /// # Panics
    /// `grey` has fewer than `width` × `height` values.
    pub fn new(grey: &[u8], width: usize, height: usize, radius: usize) -> Self {
        let mut t = Self {
            width,
            height,
            radius,
            grey: Vec::new(),
            gx: Vec::new(),
            gy: Vec::new(),
            sxx: Vec::new(),
            sxy: Vec::new(),
            syy: Vec::new(),
            sgx: Vec::new(),
            sgy: Vec::new(),
            inv_count: Vec::new(),
            scratch: [Vec::new(), Vec::new(), Vec::new()],
        };
        t.recompute(grey, width, height);
        t
    }

    /// The tensor of another frame, in this one's buffers.
    ///
    /// # Panics
    /// `grey` has fewer than `width` × `height` values.
    pub fn recompute(&mut self, grey: &[u8], width: usize, height: usize) {
        let n = width * height;
        let grey = &grey[..n];
        (self.width, self.height) = (width, height);
        for b in [
            &mut self.grey,
            &mut self.gx,
            &mut self.gy,
            &mut self.sxx,
            &mut self.sxy,
            &mut self.syy,
            &mut self.sgx,
            &mut self.sgy,
        ]
        .into_iter()
        .chain(self.scratch.iter_mut())
        {
            // Every value is overwritten below.
            b.resize(n, 0.0);
        }
        let [across, pxy, pyy] = &mut self.scratch;
        // [1 2 1]/4 in each direction: image noise and aliasing otherwise bias the gradients.
        across
            .par_chunks_mut(width)
            .zip(grey.par_chunks(width))
            .for_each(|(d, s)| vectorized(SmoothRow { src: s, dst: d }));
        let img = &mut self.grey;
        img.par_chunks_mut(width).enumerate().for_each(|(y, d)| {
            let row = |yy: usize| &across[yy * width..(yy + 1) * width];
            vectorized(Blend3 {
                a: row(y.saturating_sub(1)),
                b: row(y),
                c: row((y + 1).min(height - 1)),
                dst: d,
            });
        });
        // The smoothed rows are spent: their buffer takes gx².
        let pxx = across;
        self.gx
            .par_chunks_mut(width)
            .zip(self.gy.par_chunks_mut(width))
            .zip(pxx.par_chunks_mut(width))
            .zip(pxy.par_chunks_mut(width))
            .zip(pyy.par_chunks_mut(width))
            .enumerate()
            .for_each(|(y, ((((gx, gy), pxx), pxy), pyy))| {
                let row = |yy: usize| &img[yy * width..(yy + 1) * width];
                vectorized(GradientRow {
                    up: row(y.saturating_sub(1)),
                    mid: row(y),
                    down: row((y + 1).min(height - 1)),
                    gx,
                    gy,
                    pxx,
                    pxy,
                    pyy,
                });
            });
        let r = self.radius;
        box_sum(pxx, &mut self.sxx, width, height, r);
        box_sum(pxy, &mut self.sxy, width, height, r);
        box_sum(pyy, &mut self.syy, width, height, r);
        box_sum(&self.gx, &mut self.sgx, width, height, r);
        box_sum(&self.gy, &mut self.sgy, width, height, r);
        if self.inv_count.len() != n {
            // The window's pixel count depends only on the size: made once.
            pxx.fill(1.0);
            self.inv_count.resize(n, 0.0);
            box_sum(pxx, &mut self.inv_count, width, height, r);
            for c in &mut self.inv_count {
                *c = 1.0 / c.max(1.0);
            }
        }
    }
}

/// `dst` = `src` smoothed by [1 2 1]/4 along the row (edges repeated).
struct SmoothRow<'a> {
    src: &'a [u8],
    dst: &'a mut [f32],
}

impl Kernel for SmoothRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let (s, d) = (self.src, self.dst);
        let w = s.len().min(d.len());
        if w < 2 {
            return;
        }
        d[0] = 0.75 * f32::from(s[0]) + 0.25 * f32::from(s[1]);
        d[w - 1] = 0.75 * f32::from(s[w - 1]) + 0.25 * f32::from(s[w - 2]);
        for x in 1..w - 1 {
            d[x] = 0.25 * f32::from(s[x - 1]) + 0.5 * f32::from(s[x]) + 0.25 * f32::from(s[x + 1]);
        }
    }
}

/// `dst` = (`a` + 2 `b` + `c`) / 4.
struct Blend3<'a> {
    a: &'a [f32],
    b: &'a [f32],
    c: &'a [f32],
    dst: &'a mut [f32],
}

impl Kernel for Blend3<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let w = self.dst.len();
        let (a, b, c) = (&self.a[..w], &self.b[..w], &self.c[..w]);
        for x in 0..w {
            self.dst[x] = 0.25 * a[x] + 0.5 * b[x] + 0.25 * c[x];
        }
    }
}

/// Central-difference gradients of the middle row and their products.
struct GradientRow<'a> {
    up: &'a [f32],
    mid: &'a [f32],
    down: &'a [f32],
    gx: &'a mut [f32],
    gy: &'a mut [f32],
    pxx: &'a mut [f32],
    pxy: &'a mut [f32],
    pyy: &'a mut [f32],
}

impl Kernel for GradientRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let GradientRow {
            up,
            mid,
            down,
            gx,
            gy,
            pxx,
            pxy,
            pyy,
        } = self;
        let w = mid.len();
        let (up, down) = (&up[..w], &down[..w]);
        let (gx, gy) = (&mut gx[..w], &mut gy[..w]);
        let (pxx, pxy, pyy) = (&mut pxx[..w], &mut pxy[..w], &mut pyy[..w]);
        gx[0] = mid[1] - mid[0];
        gx[w - 1] = mid[w - 1] - mid[w - 2];
        for x in 1..w - 1 {
            gx[x] = 0.5 * (mid[x + 1] - mid[x - 1]);
        }
        for x in 0..w {
            gy[x] = 0.5 * (down[x] - up[x]);
            pxx[x] = gx[x] * gx[x];
            pxy[x] = gx[x] * gy[x];
            pyy[x] = gy[x] * gy[x];
        }
    }
}

/// `dst` = sum of `src` over the (2r+1)² window around each pixel, clipped at the borders.
fn box_sum(src: &[f32], dst: &mut [f32], w: usize, h: usize, r: usize) {
    // Vertical running sums in f64 (exact enough that adding and dropping rows leaves no drift)
    // over bands of rows, one per worker, each band starting its sums afresh; then each row's
    // horizontal window sums, in f32 from the row itself.
    let band = h.div_ceil(rayon::current_num_threads().max(1)).max(1);
    dst.par_chunks_mut(band * w)
        .enumerate()
        .for_each(|(b, out)| {
            let y0 = b * band;
            let mut acc = vec![0.0f64; w];
            let mut line = WindowScratch::new(w, r);
            let row = |yy: usize| &src[yy * w..(yy + 1) * w];
            for yy in y0.saturating_sub(r)..(y0 + r).min(h) {
                vectorized(AddRow {
                    acc: &mut acc,
                    row: row(yy),
                    sign: 1.0,
                });
            }
            for (k, o) in out.chunks_exact_mut(w).enumerate() {
                let y = y0 + k;
                if y + r < h {
                    vectorized(AddRow {
                        acc: &mut acc,
                        row: row(y + r),
                        sign: 1.0,
                    });
                }
                // The band's first row starts from fresh sums: nothing to drop.
                if k > 0 && y > r {
                    vectorized(AddRow {
                        acc: &mut acc,
                        row: row(y - r - 1),
                        sign: -1.0,
                    });
                }
                vectorized(WindowRow {
                    acc: &acc,
                    s: &mut line,
                    out: o,
                });
            }
        });
}

/// `acc` += `sign` × `row`.
struct AddRow<'a> {
    acc: &'a mut [f64],
    row: &'a [f32],
    sign: f64,
}

impl Kernel for AddRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let w = self.acc.len();
        let row = &self.row[..w];
        for x in 0..w {
            self.acc[x] += self.sign * f64::from(row[x]);
        }
    }
}

/// Buffers for a row's horizontal window sums: sums of power-of-two runs of the row padded
/// with r zeros each side, this length and the next.
struct WindowScratch {
    r: usize,
    doubled: Vec<f32>,
    next: Vec<f32>,
}

impl WindowScratch {
    fn new(w: usize, r: usize) -> Self {
        let n = w + 2 * r;
        Self {
            r,
            doubled: vec![0.0; n],
            next: vec![0.0; n],
        }
    }
}

/// `out[x]` = sum of `acc` over [x − r, x + r] ∩ the row. The window length is split into powers
/// of two, and the sums of 2, 4, 8… neighbours are built by doubling, so a window of 2r + 1
/// takes about 2 log₂(2r + 1) passes over the row, each vectorised.
struct WindowRow<'a> {
    acc: &'a [f64],
    s: &'a mut WindowScratch,
    out: &'a mut [f32],
}

impl Kernel for WindowRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let WindowRow { acc, s, out } = self;
        let w = out.len();
        let r = s.r;
        let n = w + 2 * r;
        let acc = &acc[..w];
        // doubled[x] = sum of the padded row over [x, x + block); valid for x + block ≤ n.
        let padded = &mut s.doubled[..n];
        padded[..r].fill(0.0);
        padded[r + w..].fill(0.0);
        for x in 0..w {
            padded[r + x] = acc[x] as f32;
        }
        let len = 2 * r + 1;
        let (mut block, mut done) = (1usize, 0usize);
        while block <= len {
            if len & block != 0 {
                let d = &s.doubled[done..done + w];
                if done == 0 {
                    out.copy_from_slice(d);
                } else {
                    for x in 0..w {
                        out[x] += d[x];
                    }
                }
                done += block;
            }
            if 2 * block > len {
                break;
            }
            let m = n - 2 * block + 1;
            let (d, next) = (&s.doubled[..n], &mut s.next[..m]);
            for x in 0..m {
                next[x] = d[x] + d[x + block];
            }
            std::mem::swap(&mut s.doubled, &mut s.next);
            block *= 2;
        }
    }
}

/// Windowed Lucas–Kanade refinement with its working images, kept between calls.
pub struct Refiner {
    iterations: u32,
    lambda: f32,
    /// gx·e and gy·e, then their window sums.
    ex: Vec<f32>,
    ey: Vec<f32>,
    sx: Vec<f32>,
    sy: Vec<f32>,
    /// e, then its window sums.
    e: Vec<f32>,
    se: Vec<f32>,
}

impl Refiner {
    /// `iterations` steps; `lambda`, per window pixel in grey levels² per pixel², damps the
    /// step where the window has little texture.
    pub fn new(iterations: u32, lambda: f32) -> Self {
        Self {
            iterations,
            lambda,
            ex: Vec::new(),
            ey: Vec::new(),
            sx: Vec::new(),
            sy: Vec::new(),
            e: Vec::new(),
            se: Vec::new(),
        }
    }

    /// Refines `flow` (from `src`'s pixels to `dst`) in place. Steps are clamped to a pixel per
    /// axis, the linearisation's reach. Non-finite flow values stay non-finite; frames of
    /// another size than the flow leave it as is.
    pub fn refine(&mut self, src: &FrameTensor, dst: &FrameTensor, flow: &mut FlowField) {
        let (w, h) = (src.width, src.height);
        if (flow.width, flow.height) != (w, h)
            || (dst.width, dst.height) != (w, h)
            || w < 2
            || h < 2
        {
            return;
        }
        let n = w * h;
        for b in [
            &mut self.ex,
            &mut self.ey,
            &mut self.sx,
            &mut self.sy,
            &mut self.e,
            &mut self.se,
        ] {
            // Every value is overwritten before it is read.
            b.resize(n, 0.0);
        }
        let side = (2 * src.radius + 1) as f32;
        let reg = self.lambda * side * side;
        for _ in 0..self.iterations {
            vectorized(Residual {
                src,
                dst,
                flow: &flow.data,
                ex: &mut self.ex,
                ey: &mut self.ey,
                e: &mut self.e,
            });
            box_sum(&self.ex, &mut self.sx, w, h, src.radius);
            box_sum(&self.ey, &mut self.sy, w, h, src.radius);
            box_sum(&self.e, &mut self.se, w, h, src.radius);
            vectorized(Step {
                src,
                sx: &self.sx,
                sy: &self.sy,
                se: &self.se,
                reg,
                flow: &mut flow.data,
            });
        }
    }
}

/// Per pixel e = dst(x + flow) − src(x), gx·e and gy·e; 0 where the target leaves the image.
struct Residual<'a> {
    src: &'a FrameTensor,
    dst: &'a FrameTensor,
    flow: &'a [f32],
    ex: &'a mut [f32],
    ey: &'a mut [f32],
    e: &'a mut [f32],
}

impl Kernel for Residual<'_> {
    type Output = ();

    /// Three passes per row: target cells and weights (branch-free, vectorised, float → int
    /// conversions included), the texel reads (a pixel at a time), then the interpolation
    /// and products (vectorised).
    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let Residual {
            src,
            dst,
            flow,
            ex,
            ey,
            e: res,
        } = self;
        let (w, h) = (src.width, src.height);
        let img = &dst.grey;
        let mut targets = TargetCells::new(w);
        // The four texels of each pixel's cell, one array per corner (vectorised reads below).
        let mut texels = [
            vec![0.0f32; w],
            vec![0.0f32; w],
            vec![0.0f32; w],
            vec![0.0f32; w],
        ];
        for y in 0..h {
            targets.fill(&flow[2 * y * w..2 * (y + 1) * w], y, (w, h), 1);
            let TargetCells {
                cell,
                fx,
                fy,
                inside,
            } = &targets;
            let (cell, fx, fy, inside) = (&cell[..w], &fx[..w], &fy[..w], &inside[..w]);
            let [t00, t10, t01, t11] = &mut texels;
            let (t00, t10, t01, t11) = (&mut t00[..w], &mut t10[..w], &mut t01[..w], &mut t11[..w]);
            for x in 0..w {
                // One bounds check for the four texels.
                let j = cell[x] as usize;
                let c = &img[j..j + w + 2];
                (t00[x], t10[x], t01[x], t11[x]) = (c[0], c[1], c[w], c[w + 1]);
            }
            let row = y * w..(y + 1) * w;
            let (g, gx, gy) = (
                &src.grey[row.clone()],
                &src.gx[row.clone()],
                &src.gy[row.clone()],
            );
            let (ex, ey, res) = (&mut ex[row.clone()], &mut ey[row.clone()], &mut res[row]);
            for x in 0..w {
                let top = t00[x] + fx[x] * (t10[x] - t00[x]);
                let bottom = t01[x] + fx[x] * (t11[x] - t01[x]);
                // Outside, the cell read was a stand-in: weight it out.
                let keep = if inside[x] != 0 { 1.0 } else { 0.0 };
                let e = keep * (top + fy[x] * (bottom - top) - g[x]);
                res[x] = e;
                ex[x] = gx[x] * e;
                ey[x] = gy[x] * e;
            }
        }
    }
}

/// flow −= (S + reg·I)⁻¹ r, each component clamped to ±1 px. The window may also change in
/// brightness by an offset (exposure, gain): solved for with the flow and eliminated, which
/// centres the structure tensor and the residual's products on the window's means (S − ḡḡᵀN,
/// r = Σ g·e − ḡ Σe).
struct Step<'a> {
    src: &'a FrameTensor,
    sx: &'a [f32],
    sy: &'a [f32],
    se: &'a [f32],
    reg: f32,
    flow: &'a mut [f32],
}

impl Kernel for Step<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let Step {
            src,
            sx,
            sy,
            se,
            reg,
            flow,
        } = self;
        let n = sx.len();
        let (sxx, sxy, syy) = (&src.sxx[..n], &src.sxy[..n], &src.syy[..n]);
        let (sgx, sgy, inv_n) = (&src.sgx[..n], &src.sgy[..n], &src.inv_count[..n]);
        let (sy, se, flow) = (&sy[..n], &se[..n], &mut flow[..2 * n]);
        for i in 0..n {
            let (mx, my) = (sgx[i] * inv_n[i], sgy[i] * inv_n[i]);
            // The centred tensor is a covariance (positive semi-definite): with reg on the
            // diagonal, ac − b² ≥ reg² > 0, never singular.
            let a = (sxx[i] - mx * sgx[i]).max(0.0) + reg;
            let b = sxy[i] - mx * sgy[i];
            let c = (syy[i] - my * sgy[i]).max(0.0) + reg;
            let (rx, ry) = (sx[i] - mx * se[i], sy[i] - my * se[i]);
            let inv_det = 1.0 / (a * c - b * b).max(reg * reg);
            let dx = ((c * rx - b * ry) * inv_det).clamp(-1.0, 1.0);
            let dy = ((a * ry - b * rx) * inv_det).clamp(-1.0, 1.0);
            flow[2 * i] -= dx;
            flow[2 * i + 1] -= dy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth random-looking texture.
    fn texture(w: usize, h: usize, dx: f32, dy: f32) -> Vec<u8> {
        let mut out = Vec::with_capacity(w * h);
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32 - dx, y as f32 - dy);
                let v = 128.0
                    + 50.0 * (0.31 * xf + 0.17 * yf).sin()
                    + 40.0 * (0.23 * yf - 0.11 * xf).cos()
                    + 20.0 * (0.05 * xf * yf.sin()).sin();
                out.push(v.clamp(0.0, 255.0) as u8);
            }
        }
        out
    }

    #[test]
    fn box_sum_matches_the_direct_sum() {
        let (w, h, r) = (23, 17, 3);
        let src: Vec<f32> = (0..w * h)
            .map(|i| ((i * 7919) % 101) as f32 - 50.0)
            .collect();
        let mut got = vec![0.0; w * h];
        box_sum(&src, &mut got, w, h, r);
        for y in 0..h {
            for x in 0..w {
                let mut s = 0.0f64;
                for yy in y.saturating_sub(r)..=(y + r).min(h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(w - 1) {
                        s += f64::from(src[yy * w + xx]);
                    }
                }
                assert!((f64::from(got[y * w + x]) - s).abs() < 1e-3, "{x},{y}");
            }
        }
    }

    #[test]
    fn a_step_moves_a_rough_flow_towards_a_known_shift() {
        // dst is src shifted by (1.3, −0.6): the true flow is that shift everywhere.
        let (w, h) = (96, 80);
        let a = FrameTensor::new(&texture(w, h, 0.0, 0.0), w, h, 4);
        let b = FrameTensor::new(&texture(w, h, 1.3, -0.6), w, h, 4);
        let mut flow = FlowField::zeros(w, h);
        for p in flow.data.chunks_exact_mut(2) {
            p[0] = 1.0;
            p[1] = -0.3;
        }
        let err = |f: &FlowField| {
            let mut s = 0.0;
            let mut k = 0;
            for y in 10..h - 10 {
                for x in 10..w - 10 {
                    let (u, v) = f.get(x, y);
                    s += ((u - 1.3).powi(2) + (v + 0.6).powi(2)).sqrt();
                    k += 1;
                }
            }
            s / k as f32
        };
        let before = err(&flow);
        Refiner::new(2, 0.1).refine(&a, &b, &mut flow);
        let after = err(&flow);
        assert!(after < 0.35 * before, "{before} -> {after}");
        // A change of brightness (all of dst 12 grey levels brighter) does not pull the flow
        // away: the step allows for each window's brightness offset.
        let brighter: Vec<u8> = texture(w, h, 1.3, -0.6)
            .iter()
            .map(|&v| v.saturating_add(12))
            .collect();
        let b2 = FrameTensor::new(&brighter, w, h, 4);
        let mut flow2 = FlowField::zeros(w, h);
        for p in flow2.data.chunks_exact_mut(2) {
            p[0] = 1.0;
            p[1] = -0.3;
        }
        Refiner::new(2, 0.1).refine(&a, &b2, &mut flow2);
        let after2 = err(&flow2);
        assert!(after2 < 0.35 * before, "brighter: {before} -> {after2}");
        // A mismatched size is refused quietly: the flow stays as given.
        let mut small = FlowField::zeros(8, 8);
        Refiner::new(1, 0.1).refine(&a, &b, &mut small);
        assert!(small.data.iter().all(|v| *v == 0.0));
    }
}
