//! Forward–backward consistency: confidence and occlusion from a pair of opposite flows.

use rayon::prelude::*;

use super::FlowField;
use streamrecon_core::flow_field::TargetCells;
use streamrecon_core::simd::{vectorized, Kernel};

/// Per-pixel confidence and occlusion of `fwd`, checked against `bwd` sampled at the target.
///
/// Occluded where |f + b|² > 0.01 (|f|² + |b|²) + 0.5 (Sundaram et al. 2010), or where the target
/// leaves the image; confidence = 1 / (1 + |f + b|² / (2σ²)) with σ = 0.5 + 0.05 |f| (a Cauchy
/// kernel: as selective as a Gaussian near zero, no `exp` per pixel).
pub fn fb_consistency(fwd: &FlowField, bwd: &FlowField) -> (Vec<f32>, Vec<bool>) {
    let c = fb_check(fwd, bwd, false, 1);
    (c.conf, c.occ)
}

/// One row's working arrays in [`fb_check`], allocated once per worker, not once per row.
struct RowScratch {
    u: Vec<f32>,
    v: Vec<f32>,
    bu: Vec<f32>,
    bv: Vec<f32>,
    /// Each target's cell in `bwd`, weights and inside mask.
    targets: TargetCells,
    /// `bwd` at the cell's four corners, (u, v) each: 00, 10, 01, 11.
    corners: [Vec<f32>; 8],
}

impl RowScratch {
    fn new(w: usize) -> Self {
        Self {
            u: vec![0.0; w],
            v: vec![0.0; w],
            bu: vec![0.0; w],
            bv: vec![0.0; w],
            targets: TargetCells::new(w),
            corners: std::array::from_fn(|_| vec![0.0; w]),
        }
    }
}

/// What [`fb_check`] finds for one direction.
pub struct FbCheck {
    pub conf: Vec<f32>,
    pub occ: Vec<bool>,
    /// `fwd` refined by `bwd`, when asked for.
    pub fused: Option<FlowField>,
}

/// [`fb_consistency`] and, with `fuse`, `fwd` refined by `bwd` in the same pass: where the two
/// flows agree (not occluded), the average of `fwd` and `bwd` negated at the target, else `fwd`
/// unchanged. DIS's errors in the two directions are partly independent, so on visible pixels
/// the average is closer to the true motion than either; occluded pixels keep their own
/// estimate. Confidence and occlusion are judged on the flows as given.
///
/// The flows may be on a coarser grid than the frames, each of their pixels `grid` frame pixels
/// a side (DIS's own resolution): the tolerances stay in frame pixels, so a check there judges
/// as one on the flows upsampled would.
pub fn fb_check(fwd: &FlowField, bwd: &FlowField, fuse: bool, grid: usize) -> FbCheck {
    let (w, h) = (fwd.width, fwd.height);
    let mut conf = vec![0.0f32; w * h];
    let mut occ = vec![true; w * h];
    if w < 2 || h < 2 || (bwd.width, bwd.height) != (w, h) {
        // Degenerate or mismatched fields: nothing can be checked, everything stays occluded.
        return FbCheck {
            conf,
            occ,
            fused: fuse.then(|| fwd.clone()),
        };
    }
    // Every value is overwritten below. A copy, not a zeroed field: jemalloc zeroes a recycled
    // buffer this large (11 MB at 1282×1110) by handing its pages back to the kernel, and each
    // page then faults on its first write (half the engine's page faults at that size).
    let mut fused = fuse.then(|| fwd.clone());
    let grid = grid.max(1) as f32;
    let pair = Pair {
        fwd,
        back: &bwd.data,
        w,
        stride: 2 * w,
        h,
        slack2: SLACK2 / (grid * grid),
        sigma0: SIGMA0 / grid,
    };
    let stride = pair.stride;
    // Rows per parallel job: a small field (DIS's ¼-resolution grid) is one job, run on this
    // thread (called from outside rayon's pool, a parallel loop would hand it to the pool and
    // wait).
    let min_rows = PAR_MIN_PIXELS.div_ceil(w);
    let fused_rows: Vec<&mut [f32]> = match &mut fused {
        Some(f) => f.data.chunks_mut(stride).collect(),
        None => Vec::new(),
    };
    if fuse {
        conf.par_chunks_mut(w)
            .zip(occ.par_chunks_mut(w))
            .zip(fused_rows.into_par_iter())
            .with_min_len(min_rows)
            .enumerate()
            .for_each_init(
                || RowScratch::new(w),
                |s, (y, ((cr, or), fr))| {
                    vectorized(CheckRow {
                        pair: &pair,
                        scratch: s,
                        y,
                        cr,
                        or,
                        fr: Some(fr),
                    });
                },
            );
    } else {
        conf.par_chunks_mut(w)
            .zip(occ.par_chunks_mut(w))
            .with_min_len(min_rows)
            .enumerate()
            .for_each_init(
                || RowScratch::new(w),
                |s, (y, (cr, or))| {
                    vectorized(CheckRow {
                        pair: &pair,
                        scratch: s,
                        y,
                        cr,
                        or,
                        fr: None,
                    });
                },
            );
    }
    FbCheck { conf, occ, fused }
}

/// The forward–backward disagreement |f + b|² (in the flow's pixels) behind the confidence
/// `conf` that [`fb_check`] gave the flow (`u`, `v`) on a grid of `grid` frame pixels a side:
/// its kernel inverted. Infinite where the target left the image (confidence 0).
pub fn disagreement2(conf: f32, u: f32, v: f32, grid: usize) -> f32 {
    if conf <= 0.0 {
        return f32::INFINITY;
    }
    let sigma = SIGMA0 / grid.max(1) as f32 + 0.05 * (u * u + v * v).sqrt();
    2.0 * sigma * sigma * (1.0 / conf - 1.0)
}

/// Pixels of a parallel job, at least.
const PAR_MIN_PIXELS: usize = 32 * 1024;

/// The occlusion test's absolute slack, frame pixels².
const SLACK2: f32 = 0.5;
/// The confidence kernel's width at zero flow, frame pixels.
const SIGMA0: f32 = 0.5;

/// What every row of one [`fb_check`] call reads.
struct Pair<'a> {
    fwd: &'a FlowField,
    back: &'a [f32],
    w: usize,
    stride: usize,
    h: usize,
    /// [`SLACK2`] and [`SIGMA0`] in the flows' pixels.
    slack2: f32,
    sigma0: f32,
}

/// One row of [`fb_check`]: confidence, occlusion and optionally fused flow of row `y`.
struct CheckRow<'a, 'b> {
    pair: &'a Pair<'b>,
    scratch: &'a mut RowScratch,
    y: usize,
    cr: &'a mut [f32],
    or: &'a mut [bool],
    fr: Option<&'a mut [f32]>,
}

impl Kernel for CheckRow<'_, '_> {
    type Output = ();

    /// Two passes: the bilinear gathers of `bwd` (float column counter, i32 casts, as usize ↔
    /// float conversions are instruction sequences on baseline x86-64), then the arithmetic
    /// (its square root and division dominated when they sat between gathers).
    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let CheckRow {
            pair,
            scratch,
            y,
            cr,
            or,
            fr,
        } = self;
        check_row(pair, scratch, y, cr, or, fr);
    }
}

#[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
#[inline(always)]
fn check_row(
    pair: &Pair<'_>,
    scratch: &mut RowScratch,
    y: usize,
    cr: &mut [f32],
    or: &mut [bool],
    fr: Option<&mut [f32]>,
) {
    let Pair {
        fwd,
        back,
        w,
        stride,
        h,
        slack2,
        sigma0,
    } = *pair;
    let row = &fwd.data[y * stride..(y + 1) * stride];
    // Structure of arrays: this row's flow, its targets' cells and weights, bwd at the cells'
    // corners, then bwd at the targets.
    let RowScratch {
        u,
        v,
        bu,
        bv,
        targets,
        corners,
    } = scratch;
    let (u, v) = (&mut u[..w], &mut v[..w]);
    let (bu, bv) = (&mut bu[..w], &mut bv[..w]);
    // Split out in a loop of its own: interleaved loads mixed into the arithmetic below kept
    // it scalar.
    for ((u, v), f) in u.iter_mut().zip(v.iter_mut()).zip(row.chunks_exact(2)) {
        (*u, *v) = (f[0], f[1]);
    }
    targets.fill(row, y, (w, h), 2);
    let TargetCells {
        cell,
        fx,
        fy,
        inside,
    } = targets;
    let (cell, fx, fy, inside) = (&cell[..w], &fx[..w], &fy[..w], &inside[..w]);
    // The reads, a pixel at a time.
    let [u00, v00, u10, v10, u01, v01, u11, v11] = corners;
    let (u00, v00, u10, v10) = (&mut u00[..w], &mut v00[..w], &mut u10[..w], &mut v10[..w]);
    let (u01, v01, u11, v11) = (&mut u01[..w], &mut v01[..w], &mut u11[..w], &mut v11[..w]);
    for x in 0..w {
        // One bounds check for the eight values.
        let i = cell[x] as usize;
        let c = &back[i..i + stride + 4];
        (u00[x], v00[x], u10[x], v10[x]) = (c[0], c[1], c[2], c[3]);
        (u01[x], v01[x], u11[x], v11[x]) = (c[stride], c[stride + 1], c[stride + 2], c[stride + 3]);
    }
    for x in 0..w {
        let (gx, gy) = (fx[x], fy[x]);
        let (w00, w10) = ((1.0 - gx) * (1.0 - gy), gx * (1.0 - gy));
        let (w01, w11) = ((1.0 - gx) * gy, gx * gy);
        let keep = inside[x] != 0;
        let su = u00[x] * w00 + u10[x] * w10 + u01[x] * w01 + u11[x] * w11;
        let sv = v00[x] * w00 + v10[x] * w10 + v01[x] * w01 + v11[x] * w11;
        // Pixels whose target leaves the image get 0 (as before the reads).
        bu[x] = if keep { su } else { 0.0 };
        bv[x] = if keep { sv } else { 0.0 };
    }
    // Branch-free over the row, so the compiler vectorises it (square root and division
    // included); the fused flow overwrites `bu`, `bv`.
    let (cr, or) = (&mut cr[..w], &mut or[..w]);
    for x in 0..w {
        let (eu, ev) = (u[x] + bu[x], v[x] + bv[x]);
        let e2 = eu * eu + ev * ev;
        let f2 = u[x] * u[x] + v[x] * v[x];
        let disagree = e2 > 0.01 * (f2 + bu[x] * bu[x] + bv[x] * bv[x]) + slack2;
        let occluded = inside[x] == 0 || disagree;
        let sigma = sigma0 + 0.05 * f2.sqrt();
        let two_s2 = 2.0 * sigma * sigma;
        cr[x] = f32::from_bits((two_s2 / (two_s2 + e2)).to_bits() & inside[x]);
        or[x] = occluded;
        // Fused: the average of both where they agree, else this direction's own.
        let keep = if occluded { 0.0 } else { 0.5 };
        bu[x] = u[x] - keep * eu;
        bv[x] = v[x] - keep * ev;
    }
    if let Some(fr) = fr {
        for ((out, fu), fv) in fr.chunks_exact_mut(2).zip(bu.iter()).zip(bv.iter()) {
            out[0] = *fu;
            out[1] = *fv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(w: usize, h: usize, u: f32, v: f32) -> FlowField {
        let mut f = FlowField::zeros(w, h);
        for p in f.data.chunks_exact_mut(2) {
            p[0] = u;
            p[1] = v;
        }
        f
    }

    #[test]
    fn fusion_averages_agreeing_flows_and_keeps_disagreeing_ones() {
        // True motion (2, 1); the forward estimate is 0.2 px off in u, the backward one 0.1 px
        // off in v: the fused forward flow is the average, (2.1, 1.05) → error halved in u.
        let fwd = uniform(32, 24, 2.2, 1.0);
        let bwd = uniform(32, 24, -2.0, -1.1);
        let fuse = |f, b| fb_check(f, b, true, 1).fused.expect("asked for");
        let fused = fuse(&fwd, &bwd);
        let (u, v) = fused.get(5, 5);
        assert!((u - 2.1).abs() < 1e-5 && (v - 1.05).abs() < 1e-5, "{u} {v}");
        // A target leaving the image keeps its own estimate.
        assert_eq!(fused.get(31, 5), (2.2, 1.0));
        // Flows that disagree by more than the occlusion test allows are left alone.
        let far = uniform(32, 24, -5.0, 3.0);
        assert_eq!(fuse(&fwd, &far).get(5, 5), (2.2, 1.0));
    }

    #[test]
    fn matches_the_per_pixel_definition_exactly() {
        for grid in [1, 4] {
            matches_the_definition_on(grid);
        }
    }

    /// Flows on a grid of `grid` frame pixels a side: tolerances in frame pixels.
    fn matches_the_definition_on(grid: usize) {
        let g = grid as f32;
        // A wavy flow whose targets leave the image on all sides, and a backward flow that
        // agrees in some places and not in others.
        let (w, h) = (37, 23);
        let mut fwd = FlowField::zeros(w, h);
        let mut bwd = FlowField::zeros(w, h);
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32, y as f32);
                let i = 2 * (y * w + x);
                fwd.data[i] = 3.0 * (0.05 * xf + 0.03 * yf).sin();
                fwd.data[i + 1] = 2.5 * (0.04 * xf - 0.05 * yf).cos();
                bwd.data[i] = -3.0 * (0.05 * xf + 0.03 * yf).sin() + 2.0 * (xf * 0.3).sin();
                bwd.data[i + 1] = -2.5 * (0.04 * xf - 0.05 * yf).cos();
            }
        }
        fwd.data[2 * (5 * w + 7)] = f32::NAN;
        let got = fb_check(&fwd, &bwd, true, grid);
        let fused = got.fused.expect("asked for");
        let (mut inside, mut agree) = (0, 0);
        for y in 0..h {
            for x in 0..w {
                let (u, v) = fwd.get(x, y);
                let i = y * w + x;
                let (c, o, fu, fv) = match bwd.sample(x as f32 + u, y as f32 + v) {
                    None => (0.0, true, u, v),
                    Some((bu, bv)) => {
                        inside += 1;
                        let (eu, ev) = (u + bu, v + bv);
                        let e2 = eu * eu + ev * ev;
                        let f2 = u * u + v * v;
                        let occluded = e2 > 0.01 * (f2 + bu * bu + bv * bv) + 0.5 / (g * g);
                        let sigma = 0.5 / g + 0.05 * f2.sqrt();
                        let two_s2 = 2.0 * sigma * sigma;
                        let (fu, fv) = if occluded {
                            (u, v)
                        } else {
                            agree += 1;
                            (u - 0.5 * eu, v - 0.5 * ev)
                        };
                        (two_s2 / (two_s2 + e2), occluded, fu, fv)
                    }
                };
                assert_eq!(got.conf[i].to_bits(), c.to_bits(), "conf at {x},{y}");
                if let Some((bu, bv)) = bwd.sample(x as f32 + u, y as f32 + v) {
                    let e2 = (u + bu).powi(2) + (v + bv).powi(2);
                    let back = disagreement2(c, u, v, grid);
                    assert!(
                        (back - e2).abs() <= 1e-3 * (1.0 + e2) || (e2.is_nan() && back.is_nan()),
                        "disagreement at {x},{y}: {back} vs {e2}"
                    );
                } else {
                    assert!(disagreement2(c, u, v, grid).is_infinite());
                }
                assert_eq!(got.occ[i], o, "occlusion at {x},{y}");
                let (gu, gv) = fused.get(x, y);
                assert!(
                    (gu.to_bits(), gv.to_bits()) == (fu.to_bits(), fv.to_bits())
                        || (gu.is_nan() && fu.is_nan()),
                    "fused at {x},{y}: {gu},{gv} vs {fu},{fv}"
                );
            }
        }
        // The case mix the test is meant to cover.
        assert!(inside > 200 && inside < w * h - 50, "{inside}");
        assert!(agree > 50 && agree < inside - 50, "{agree} of {inside}");
    }
}
