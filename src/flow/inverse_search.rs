//! DIS (dense inverse search, Kroeger et al. 2016) written for the engine's case: 8-pixel
//! patches, one direction per core, and frames that take part in four flows each.
//!
//! It is OpenCV's algorithm step for step (`modules/video/src/dis_flow.cpp`): the same pyramid
//! (area resizes), coarsest level, Sobel gradients, mean-normalised inverse-compositional
//! patch search in two passes over eight stripes with spatial and temporal candidates,
//! densification weighted by photometric error, bilinear level upsampling and OpenCV's own
//! variational refinement. It differs in what it computes once and in how it computes:
//! - a frame's pyramid, gradients, patch structure tensors and padded float images are made once
//!   per frame ([`DisFrame`]), where OpenCV makes them in every call for both images: each frame
//!   is the source of two flows and the target of two;
//! - a patch is evaluated on float images, 8 lanes a row (AVX2 + FMA where the CPU has them, a
//!   portable loop elsewhere), from a copy of the patch's pixels and gradients laid out
//!   contiguously, with the bilinear interpolation split into a horizontal and a vertical step
//!   (each row of the target is interpolated once, not twice); OpenCV converts bytes to floats
//!   4 lanes at a time in every evaluation;
//! - candidates are costed with the descent's sums, so the chosen one's are its first step;
//! - four stripes are searched in lockstep: each patch's descent is a chain of dependent
//!   evaluations, and several chains keep a core busier (at 160×120, two took 7 % less time
//!   than one, four 2–3 % less than two).
//!
//! Results differ from OpenCV's by float rounding only (order of operations), which can tip a
//! candidate choice or an early stop; `tests/flow.rs` compares the two on synthetic sequences
//! (mean difference under 10⁻⁵ px at 330×250).
//! Written by hand because OpenCV's DIS cannot reuse a frame's preparation across calls and is
//! too slow for the engine's time goal at `ultrafast` and `fast` (see `benches/flow_dis.rs`).

use std::ops::Range;
use std::sync::OnceLock;

use opencv::core::{Mat, Ptr, Size};
use opencv::imgproc::{resize, spatial_gradient, INTER_AREA};
use opencv::prelude::*;
use opencv::video::VariationalRefinement;

use super::resize::{resized_flow, upsample_linear};
use super::FlowField;
#[cfg(target_arch = "x86_64")]
use pulp::{f32x8, x86::V3, Simd};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::simd::{small_int, vectorized, Kernel};

/// The only patch size this implementation takes (every OpenCV preset's).
pub const PATCH: usize = 8;
/// Padding of the target images, as OpenCV's (a patch may hang this far off the image).
const BORDER: usize = 16;
/// OpenCV's inverse search runs in this many stripes of patch rows, whatever its thread count,
/// and spatial propagation stays within a stripe; kept, so that results match its own.
const STRIPES: usize = 8;
const EPS: f32 = 0.001;
/// Stripes searched in lockstep (see `Search::run`).
const LOCKSTEP: usize = 4;

/// One pyramid level of a frame as a kernel reads it: as the source of a flow (`i0`,
/// `templates`, `tensor`) or as its target (`ext`); the other role's slices are empty.
struct Level<'a> {
    w: usize,
    h: usize,
    i0: &'a [f32],
    /// `i0` padded by [`BORDER`] replicated pixels on every side, `ew` wide.
    ext: &'a [f32],
    ew: usize,
    /// Per patch (row-major on the patch grid): the inverse structure tensor (h11, h12, h22) and
    /// the sums of the x and y gradients.
    tensor: &'a [[f32; 5]],
    /// Per patch, its pixels, x gradients and y gradients, row by row ([`TEMPLATE`] floats):
    /// what every evaluation of the patch reads, contiguous.
    templates: &'a [f32],
    ws: usize,
    hs: usize,
}

/// One level of a frame's pyramid.
struct PyramidLevel {
    w: usize,
    h: usize,
    /// The level image (DIS's variational refinement takes bytes).
    grey: Mat,
    i0: Vec<f32>,
    /// Sobel gradients, row-major.
    dx: Vec<i16>,
    dy: Vec<i16>,
}

/// What a level needs as the source of a flow.
struct SourceLevel {
    tensor: Vec<[f32; 5]>,
    templates: Vec<f32>,
    ws: usize,
    hs: usize,
}

/// Floats of one patch's template: pixels, x gradients, y gradients.
const TEMPLATE: usize = 3 * PATCH * PATCH;

/// A frame prepared for [`InverseSearch`]: made once, used as the source or the target of any
/// number of flows with the same stride.
///
/// What the frame needs as a source (patch templates and tensors) and as a target (padded
/// images) is made on first use, on the thread that uses it: in the engine each direction's
/// DIS, on its own core, prepares the new frame's part for its role.
pub struct DisFrame {
    levels: Vec<PyramidLevel>,
    stride: usize,
    sources: OnceLock<Vec<SourceLevel>>,
    /// Per level, the padded image ([`Level::ext`]).
    targets: OnceLock<Vec<Vec<f32>>>,
}

/// OpenCV's coarsest level for `w` × `h` images (`None` where it would be below the finest).
fn coarsest_level(w: usize, h: usize) -> Option<usize> {
    let (w, h) = (w as f64, h as f64);
    let by_motion = ((w.max(h) / (4.0 * PATCH as f64)).log2() + 0.5) as i64;
    let by_size = (w.min(h) / PATCH as f64).log2() as i64;
    usize::try_from(by_motion.min(by_size)).ok()
}

impl DisFrame {
    /// Pyramid of `grey` (an 8-bit image at DIS's finest level) for patches `stride` apart.
    ///
    /// # Errors
    /// The image is too small for DIS's patches, or OpenCV fails.
    pub fn new(grey: Mat, stride: usize) -> Result<Self> {
        if grey.typ() != opencv::core::CV_8UC1 {
            return Err(Error::Flow(format!(
                "DIS takes 8-bit grey images, not OpenCV type {}",
                grey.typ()
            )));
        }
        let (w, h) = (grey.cols() as usize, grey.rows() as usize);
        let coarsest = coarsest_level(w, h)
            .filter(|_| w.min(h) >= PATCH && (1..PATCH).contains(&stride))
            .ok_or_else(|| {
                Error::Flow(format!(
                    "{w}x{h} is too small for DIS's {PATCH}-pixel patches (or stride {stride})"
                ))
            })?;
        let mut levels = Vec::with_capacity(coarsest + 1);
        let mut cur = grey;
        for l in 0..=coarsest {
            let next = (l < coarsest)
                .then(|| {
                    let mut n = Mat::default();
                    let size = Size::new(cur.cols() / 2, cur.rows() / 2);
                    resize(&cur, &mut n, size, 0.0, 0.0, INTER_AREA).map(|()| n)
                })
                .transpose()?;
            levels.push(PyramidLevel::new(cur)?);
            match next {
                Some(n) => cur = n,
                None => break,
            }
        }
        Ok(Self {
            levels,
            stride,
            sources: OnceLock::new(),
            targets: OnceLock::new(),
        })
    }

    /// The finest level's 8-bit grey image (the one the frame was made from).
    pub fn grey(&self) -> &Mat {
        &self.levels[0].grey
    }

    /// Level `l` as the source of a flow.
    fn source(&self, l: usize) -> Level<'_> {
        let sources = self.sources.get_or_init(|| {
            self.levels
                .iter()
                .map(|p| SourceLevel::new(p, self.stride))
                .collect()
        });
        let (p, s) = (&self.levels[l], &sources[l]);
        Level {
            w: p.w,
            h: p.h,
            i0: &p.i0,
            ext: &[],
            ew: p.w + 2 * BORDER,
            tensor: &s.tensor,
            templates: &s.templates,
            ws: s.ws,
            hs: s.hs,
        }
    }

    /// Level `l` as the target of a flow.
    fn target(&self, l: usize) -> Level<'_> {
        let targets = self
            .targets
            .get_or_init(|| self.levels.iter().map(padded).collect());
        let p = &self.levels[l];
        Level {
            w: p.w,
            h: p.h,
            i0: &p.i0,
            ext: &targets[l],
            ew: p.w + 2 * BORDER,
            tensor: &[],
            templates: &[],
            ws: 0,
            hs: 0,
        }
    }

    /// Width and height of the finest level.
    #[must_use]
    pub fn size(&self) -> (usize, usize) {
        (self.levels[0].w, self.levels[0].h)
    }
}

impl PyramidLevel {
    fn new(grey: Mat) -> Result<Self> {
        let (w, h) = (grey.cols() as usize, grey.rows() as usize);
        if w < PATCH || h < PATCH {
            return Err(Error::Flow(format!(
                "a DIS pyramid level of {w}x{h} is below the {PATCH}-pixel patch"
            )));
        }
        let (mut gx, mut gy) = (Mat::default(), Mat::default());
        // OpenCV's DIS: a 3×3 Sobel, reflected borders (the default).
        spatial_gradient(&grey, &mut gx, &mut gy, 3, opencv::core::BORDER_DEFAULT)?;
        let (dx, dy) = (
            gx.data_typed::<i16>()?.to_vec(),
            gy.data_typed::<i16>()?.to_vec(),
        );
        if dx.len() != w * h || dy.len() != w * h {
            return Err(Error::Flow(format!("DIS gradients of a {w}x{h} level")));
        }
        let i0: Vec<f32> = grey.data_bytes()?.iter().map(|&v| f32::from(v)).collect();
        Ok(Self {
            w,
            h,
            grey,
            i0,
            dx,
            dy,
        })
    }
}

/// `p`'s image padded by [`BORDER`] replicated pixels on every side.
fn padded(p: &PyramidLevel) -> Vec<f32> {
    let (w, h) = (p.w, p.h);
    let ew = w + 2 * BORDER;
    let mut ext = Vec::with_capacity(ew * (h + 2 * BORDER));
    for y in 0..h + 2 * BORDER {
        let row = &p.i0[y.saturating_sub(BORDER).min(h - 1) * w..][..w];
        ext.extend(std::iter::repeat_n(row[0], BORDER));
        ext.extend_from_slice(row);
        ext.extend(std::iter::repeat_n(row[w - 1], BORDER));
    }
    ext
}

impl SourceLevel {
    /// Templates and tensors of `p`'s patches, `stride` apart.
    fn new(p: &PyramidLevel, stride: usize) -> Self {
        let (w, h) = (p.w, p.h);
        let (ws, hs) = (1 + (w - PATCH) / stride, 1 + (h - PATCH) / stride);
        let mut templates = Vec::with_capacity(ws * hs * TEMPLATE);
        for is in 0..hs {
            for js in 0..ws {
                let rows = (0..PATCH).map(|r| (is * stride + r) * w + js * stride);
                for k in rows.clone() {
                    templates.extend_from_slice(&p.i0[k..k + PATCH]);
                }
                for plane in [&p.dx, &p.dy] {
                    for k in rows.clone() {
                        templates.extend(plane[k..k + PATCH].iter().map(|&v| f32::from(v)));
                    }
                }
            }
        }
        let tensor = vectorized(StructureTensor {
            templates: &templates,
        });
        Self {
            tensor,
            templates,
            ws,
            hs,
        }
    }
}

/// Per patch: OpenCV's inverse structure tensor and gradient sums, from the templates.
struct StructureTensor<'a> {
    templates: &'a [f32],
}

impl Kernel for StructureTensor<'_> {
    type Output = Vec<[f32; 5]>;

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) -> Vec<[f32; 5]> {
        let area = PATCH * PATCH;
        self.templates
            .chunks_exact(TEMPLATE)
            .map(|t| {
                let (gx, gy) = (&t[area..2 * area], &t[2 * area..]);
                let mut acc = [[0f32; PATCH]; 5];
                for (a, b) in gx.chunks_exact(PATCH).zip(gy.chunks_exact(PATCH)) {
                    for c in 0..PATCH {
                        acc[0][c] += a[c] * a[c];
                        acc[1][c] += b[c] * b[c];
                        acc[2][c] += a[c] * b[c];
                        acc[3][c] += a[c];
                        acc[4][c] += b[c];
                    }
                }
                let [xx, yy, xy, sx, sy] = acc.map(hsum);
                let mut det = xx * yy - xy * xy;
                if det.abs() < EPS {
                    det = EPS;
                }
                [yy / det, -xy / det, xx / det, sx, sy]
            })
            .collect()
    }
}

#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
fn hsum(a: [f32; PATCH]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// Where a patch at (`i`, `j`) of the source, displaced by (`u`, `v`), lies in the padded
/// target: the offset of its top-left sample and the fractional parts (OpenCV's clamping).
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
fn place(l: &Level, i: usize, j: usize, u: f32, v: f32) -> (usize, f32, f32) {
    let b = BORDER as f32;
    let lo = (BORDER + 1 - PATCH) as f32;
    let y = (i as f32 + v + b).clamp(lo, (BORDER + l.h - 1) as f32);
    let x = (j as f32 + u + b).clamp(lo, (BORDER + l.w - 1) as f32);
    let (fy, fx) = (y.floor(), x.floor());
    // Both are clamped to [BORDER + 1 − PATCH, BORDER + size − 1], positive.
    let at = small_int(fy) as usize * l.ew + small_int(fx) as usize;
    (at, y - fy, x - fx)
}

/// One row of the target, interpolated horizontally at fraction `ax`.
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
fn row_at(ext: &[f32], k: usize, ax: f32) -> [f32; PATCH] {
    let a = &ext[k..][..=PATCH];
    let mut out = [0f32; PATCH];
    for c in 0..PATCH {
        out[c] = a[c] + ax * (a[c + 1] - a[c]);
    }
    out
}

/// Mean-normalised SSD between the source patch at (`i`, `j`) and the target displaced by
/// (`u`, `v`); with `grad`, also the gradient-weighted sums of the descent step (normalised by
/// the patch's gradient sums `gsum`).
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn patch_cost_scalar<const GRAD: bool>(
    s: &Level,
    t: &Level,
    idx: usize,
    (i, j): (usize, usize),
    (u, v): (f32, f32),
    gsum: (f32, f32),
) -> (f32, f32, f32) {
    let (base, ay, ax) = place(t, i, j, u, v);
    let tpl = &s.templates[idx * TEMPLATE..][..TEMPLATE];
    let area = PATCH * PATCH;
    let (mut sd, mut sq, mut sx, mut sy) =
        ([0f32; PATCH], [0f32; PATCH], [0f32; PATCH], [0f32; PATCH]);
    let mut top = row_at(t.ext, base, ax);
    for r in 0..PATCH {
        let bottom = row_at(t.ext, base + (r + 1) * t.ew, ax);
        let i0 = &tpl[r * PATCH..][..PATCH];
        let (gx, gy) = (
            &tpl[area + r * PATCH..][..PATCH],
            &tpl[2 * area + r * PATCH..][..PATCH],
        );
        for c in 0..PATCH {
            let d = top[c] + ay * (bottom[c] - top[c]) - i0[c];
            sd[c] += d;
            sq[c] += d * d;
            if GRAD {
                sx[c] += d * gx[c];
                sy[c] += d * gy[c];
            }
        }
        top = bottom;
    }
    let n = area as f32;
    let sd = hsum(sd);
    let ssd = hsum(sq) - sd * sd / n;
    if GRAD {
        (ssd, hsum(sx) - sd * gsum.0 / n, hsum(sy) - sd * gsum.1 / n)
    } else {
        (ssd, 0.0, 0.0)
    }
}

/// [`patch_cost_scalar`] on 8 lanes (AVX2 + FMA): the same sums, rounded differently.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn patch_cost_v3<const GRAD: bool>(
    simd: V3,
    s: &Level,
    t: &Level,
    idx: usize,
    (i, j): (usize, usize),
    (u, v): (f32, f32),
    gsum: (f32, f32),
) -> (f32, f32, f32) {
    let (base, ay, ax) = place(t, i, j, u, v);
    let tpl: &[f32; TEMPLATE] = match s.templates[idx * TEMPLATE..].first_chunk() {
        Some(a) => a,
        None => return (f32::INFINITY, 0.0, 0.0),
    };
    let (ax, ay) = (simd.splat_f32s(ax), simd.splat_f32s(ay));
    let zero = simd.splat_f32s(0.0);
    let (mut sd, mut sq, mut sx, mut sy) = (zero, zero, zero, zero);
    // The target's rows, one bounds check each (`place` keeps the window inside `ext`).
    let mut rows = t.ext[base..].chunks(t.ew);
    let mut next_row = || rows.next().and_then(<[f32]>::first_chunk::<{ PATCH + 1 }>);
    let Some(first) = next_row() else {
        return (f32::INFINITY, 0.0, 0.0);
    };
    let mut top = row_v3(simd, first, ax);
    for r in 0..PATCH {
        let Some(next) = next_row() else {
            return (f32::INFINITY, 0.0, 0.0);
        };
        let bottom = row_v3(simd, next, ax);
        let lerp = simd.mul_add_f32s(ay, simd.sub_f32s(bottom, top), top);
        let d = simd.sub_f32s(lerp, load8(&tpl[r * PATCH..]));
        sd = simd.add_f32s(sd, d);
        sq = simd.mul_add_f32s(d, d, sq);
        if GRAD {
            let g = PATCH * PATCH + r * PATCH;
            sx = simd.mul_add_f32s(d, load8(&tpl[g..]), sx);
            sy = simd.mul_add_f32s(d, load8(&tpl[g + PATCH * PATCH..]), sy);
        }
        top = bottom;
    }
    let n = (PATCH * PATCH) as f32;
    let sd = simd.reduce_sum_f32s(sd);
    let ssd = simd.reduce_sum_f32s(sq) - sd * sd / n;
    if GRAD {
        (
            ssd,
            simd.reduce_sum_f32s(sx) - sd * gsum.0 / n,
            simd.reduce_sum_f32s(sy) - sd * gsum.1 / n,
        )
    } else {
        (ssd, 0.0, 0.0)
    }
}

/// 8 floats from the start of `s`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
fn load8(s: &[f32]) -> f32x8 {
    // One unaligned vector load (building the vector from 8 scalars may not become one).
    bytemuck::pod_read_unaligned(bytemuck::cast_slice(&s[..PATCH]))
}

/// [`row_at`] on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
fn row_v3(simd: V3, row: &[f32; PATCH + 1], ax: f32x8) -> f32x8 {
    let (a, b) = (load8(&row[..]), load8(&row[1..]));
    simd.mul_add_f32s(ax, simd.sub_f32s(b, a), a)
}

/// The patch cost on the best instruction set this CPU has.
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn patch_cost<const GRAD: bool>(
    simd: Lanes,
    s: &Level,
    t: &Level,
    idx: usize,
    at: (usize, usize),
    flow: (f32, f32),
    gsum: (f32, f32),
) -> (f32, f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = simd {
        return patch_cost_v3::<GRAD>(simd, s, t, idx, at, flow, gsum);
    }
    let _ = simd;
    patch_cost_scalar::<GRAD>(s, t, idx, at, flow, gsum)
}

/// AVX2 + FMA where the CPU has them.
#[cfg(target_arch = "x86_64")]
type Lanes = Option<V3>;
#[cfg(not(target_arch = "x86_64"))]
type Lanes = Option<()>;

fn lanes() -> Lanes {
    #[cfg(target_arch = "x86_64")]
    return V3::try_new();
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// The patch search at one level: sparse flows (`sx`, `sy`) on the patch grid from the dense
/// flow (`u`, `v`) of the coarser level and the optional initial flow `init` (interleaved).
struct Search<'a> {
    s: &'a Level<'a>,
    t: &'a Level<'a>,
    stride: usize,
    u: &'a [f32],
    v: &'a [f32],
    init: Option<&'a [f32]>,
    inner: usize,
    sx: &'a mut Vec<f32>,
    sy: &'a mut Vec<f32>,
    simd: Lanes,
}

impl Kernel for Search<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let Self {
            s,
            t,
            stride,
            u,
            v,
            init,
            inner,
            sx,
            sy,
            simd,
        } = self;
        let (ws, hs, w) = (s.ws, s.hs, s.w);
        let half = PATCH / 2;
        debug_assert!(ws > 0);
        sx.clear();
        sy.clear();
        for is in 0..hs {
            for js in 0..ws {
                sx.push(u[(is * stride + half) * w + js * stride + half]);
                sy.push(v[(is * stride + half) * w + js * stride + half]);
            }
        }
        let stripe = hs.div_ceil(STRIPES).max(1);
        let stripes: Vec<Range<usize>> = (0..hs)
            .step_by(stripe)
            .map(|first| first..(first + stripe).min(hs))
            .collect();
        let ctx = SearchCtx {
            s,
            t,
            simd,
            init,
            stride,
        };
        // Stripes are independent (propagation stays within one), so four are searched in
        // lockstep: each patch's descent is a chain of dependent evaluations, and several chains
        // keep the core busier than one.
        let groups = stripes.len().div_ceil(LOCKSTEP);
        for k in 0..groups {
            let lanes: [Option<&Range<usize>>; LOCKSTEP] =
                std::array::from_fn(|m| stripes.get(k + m * groups));
            for forward in [true, false] {
                let len = |r: Option<&Range<usize>>| r.map_or(0, |r| r.len() * ws);
                let most = lanes.iter().map(|r| len(*r)).max().unwrap_or(0);
                for n in 0..most {
                    let mut live: [Option<PatchSearch>; LOCKSTEP] = std::array::from_fn(|_| None);
                    for (slot, rows) in live.iter_mut().zip(lanes) {
                        if let Some(rows) = rows.filter(|r| n < r.len() * ws) {
                            *slot = Some(ctx.start(rows, n, forward, sx, sy));
                        }
                    }
                    for _ in 0..inner {
                        let mut any = false;
                        for p in live.iter_mut().flatten().filter(|p| p.live) {
                            ctx.descend(p);
                            any = true;
                        }
                        if !any {
                            break;
                        }
                    }
                    for p in live.iter().flatten() {
                        // A descent that wandered more than a patch away is not trusted.
                        let (du, dv) = (p.cur.0 - p.best.0, p.cur.1 - p.best.1);
                        let best = if (du * du + dv * dv).sqrt() <= PATCH as f32 {
                            p.cur
                        } else {
                            p.best
                        };
                        (sx[p.idx], sy[p.idx]) = best;
                    }
                }
            }
        }
    }
}

/// What every patch of one level's search reads.
struct SearchCtx<'a> {
    s: &'a Level<'a>,
    t: &'a Level<'a>,
    simd: Lanes,
    init: Option<&'a [f32]>,
    stride: usize,
}

/// One patch's search under way.
struct PatchSearch {
    idx: usize,
    i: usize,
    j: usize,
    /// The best candidate, where the descent starts.
    best: (f32, f32),
    /// The descent's current flow and cost.
    cur: (f32, f32),
    prev: f32,
    /// Cost and descent sums at `best`, computed while choosing it: the first step's.
    first: Option<(f32, f32, f32)>,
    /// Whether the descent goes on.
    live: bool,
}

impl SearchCtx<'_> {
    /// Patch `n` of `rows` in this pass's order, started from its best candidate: its current
    /// flow, the initial flow's, and its two neighbours' already searched in this pass (OpenCV's
    /// order: each compared with the best so far).
    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn start(
        &self,
        rows: &Range<usize>,
        n: usize,
        forward: bool,
        sx: &[f32],
        sy: &[f32],
    ) -> PatchSearch {
        let Self {
            s,
            t,
            simd,
            init,
            stride,
        } = *self;
        let ws = s.ws;
        let (is, js) = if forward {
            (rows.start + n / ws, n % ws)
        } else {
            (rows.end - 1 - n / ws, ws - 1 - n % ws)
        };
        let idx = is * ws + js;
        let (i, j) = (is * stride, js * stride);
        let [.., gsx, gsy] = s.tensor[idx];
        let gsum = (gsx, gsy);
        // Candidates are costed with the descent's sums too: the best one's are its first step.
        let mut best = (sx[idx], sy[idx]);
        let mut first = patch_cost::<true>(simd, s, t, idx, (i, j), best, gsum);
        let mut candidates = [(0f32, 0f32); 3];
        let mut nc = 0;
        if let Some(f) = init {
            let half = PATCH / 2;
            let k = 2 * ((i + half) * s.w + j + half);
            candidates[nc] = (f[k], f[k + 1]);
            nc += 1;
        }
        let (side, above) = if forward {
            (js > 0, is > rows.start)
        } else {
            (js + 1 < ws, is + 1 < rows.end)
        };
        if side {
            let k = if forward { idx - 1 } else { idx + 1 };
            candidates[nc] = (sx[k], sy[k]);
            nc += 1;
        }
        if above {
            let k = if forward { idx - ws } else { idx + ws };
            candidates[nc] = (sx[k], sy[k]);
            nc += 1;
        }
        for &(cu, cv) in &candidates[..nc] {
            if (cu, cv) == best {
                // Its cost is the best's: it cannot win (skipped, not evaluated).
                continue;
            }
            let c = patch_cost::<true>(simd, s, t, idx, (i, j), (cu, cv), gsum);
            if c.0 < first.0 {
                first = c;
                best = (cu, cv);
            }
        }
        PatchSearch {
            idx,
            i,
            j,
            best,
            cur: best,
            prev: f32::INFINITY,
            first: Some(first),
            live: true,
        }
    }

    /// One inverse-compositional step; the descent stops once the cost stops falling (after
    /// taking that step, as OpenCV's).
    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn descend(&self, p: &mut PatchSearch) {
        let [h11, h12, h22, gsx, gsy] = self.s.tensor[p.idx];
        let (cu, cv) = p.cur;
        let (e, dx, dy) = match p.first.take() {
            Some(sums) => sums,
            None => patch_cost::<true>(
                self.simd,
                self.s,
                self.t,
                p.idx,
                (p.i, p.j),
                (cu, cv),
                (gsx, gsy),
            ),
        };
        p.cur = (cu - (h11 * dx + h12 * dy), cv - (h12 * dx + h22 * dy));
        if e >= p.prev {
            p.live = false;
        }
        p.prev = e;
    }
}

/// Dense flow (`u`, `v`) of a level from its sparse patch flows: each pixel averages the flows
/// of the patches over it, weighted by 1 / max(1, |photometric error|) (OpenCV's).
struct Densify<'a> {
    s: &'a Level<'a>,
    t: &'a Level<'a>,
    stride: usize,
    sx: &'a [f32],
    sy: &'a [f32],
    acc: &'a mut Vec<f32>,
    u: &'a mut Vec<f32>,
    v: &'a mut Vec<f32>,
}

impl Kernel for Densify<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let Self {
            s,
            t,
            stride,
            sx,
            sy,
            acc,
            u,
            v,
        } = self;
        let (w, h) = (s.w, s.h);
        for a in [&mut *acc, &mut *u, &mut *v] {
            a.clear();
            a.resize(w * h, 0.0);
        }
        for is in 0..s.hs {
            // The last patch row and column also cover what lies past them (as OpenCV's).
            let rows = if is + 1 == s.hs {
                h - is * stride
            } else {
                PATCH
            };
            for js in 0..s.ws {
                let cols = if js + 1 == s.ws {
                    w - js * stride
                } else {
                    PATCH
                };
                let idx = is * s.ws + js;
                let (fu, fv) = (sx[idx], sy[idx]);
                let (i, j) = (is * stride, js * stride);
                if cols == PATCH {
                    densify_patch::<PATCH>(s, t, i, j, rows, (fu, fv), acc, u, v);
                } else {
                    for c in 0..cols {
                        densify_patch::<1>(s, t, i, j + c, rows, (fu, fv), acc, u, v);
                    }
                }
            }
        }
        for ((c, u), v) in acc.iter().zip(u.iter_mut()).zip(v.iter_mut()) {
            *u /= c;
            *v /= c;
        }
    }
}

/// Adds one patch's flow to the `rows` × `N` pixels from (`i`, `j`).
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn densify_patch<const N: usize>(
    s: &Level,
    t: &Level,
    i: usize,
    j: usize,
    rows: usize,
    (fu, fv): (f32, f32),
    acc: &mut [f32],
    u: &mut [f32],
    v: &mut [f32],
) {
    // Sampling the padded target equals OpenCV's clamping of each position to the image.
    let b = BORDER as f32;
    let y = (i as f32 + fv + b).clamp(0.0, (t.h + 2 * BORDER - rows - 1) as f32);
    let x = (j as f32 + fu + b).clamp(0.0, (t.ew - N - 1) as f32);
    let (fy, fx) = (y.floor(), x.floor());
    let (ay, ax) = (y - fy, x - fx);
    let base = fy as usize * t.ew + fx as usize;
    for r in 0..rows {
        let (a, bot) = (
            &t.ext[base + r * t.ew..][..=N],
            &t.ext[base + (r + 1) * t.ew..][..=N],
        );
        let k = (i + r) * s.w + j;
        let i0 = &s.i0[k..][..N];
        let (ca, ua, va) = (&mut acc[k..][..N], &mut u[k..][..N], &mut v[k..][..N]);
        for c in 0..N {
            let top = a[c] + ax * (a[c + 1] - a[c]);
            let low = bot[c] + ax * (bot[c + 1] - bot[c]);
            let d = (top + ay * (low - top) - i0[c]).abs();
            let coef = 1.0 / d.max(1.0);
            ca[c] += coef;
            ua[c] += coef * fu;
            va[c] += coef * fv;
        }
    }
}

/// DIS's parameters for [`InverseSearch`] (OpenCV's names).
#[derive(Debug, Clone, Copy)]
pub struct InverseSearchParams {
    pub patch_stride: usize,
    pub gradient_descent_iterations: usize,
    pub variational_refinement_iterations: i32,
}

/// One direction's DIS: scratch buffers and a variational refinement per level, reused.
pub struct InverseSearch {
    params: InverseSearchParams,
    /// The instruction set the patch costs run on.
    lanes: Lanes,
    refiners: Vec<Ptr<VariationalRefinement>>,
    sx: Vec<f32>,
    sy: Vec<f32>,
    acc: Vec<f32>,
}

/// A float plane as a matrix over its buffer.
fn plane_mat(p: &mut [f32], w: usize, h: usize) -> Result<opencv::boxed_ref::BoxedRefMut<'_, Mat>> {
    Ok(Mat::new_rows_cols_with_data_mut::<f32>(
        h as i32, w as i32, p,
    )?)
}

impl InverseSearch {
    #[must_use]
    pub fn new(params: InverseSearchParams) -> Self {
        Self {
            params,
            lanes: lanes(),
            refiners: Vec::new(),
            sx: Vec::new(),
            sy: Vec::new(),
            acc: Vec::new(),
        }
    }

    fn refiner(&mut self, level: usize) -> Result<&mut Ptr<VariationalRefinement>> {
        while self.refiners.len() <= level {
            // DIS's settings for its refinement.
            let mut r = VariationalRefinement::create()?;
            r.set_alpha(20.0)?;
            r.set_delta(5.0)?;
            r.set_gamma(10.0)?;
            r.set_sor_iterations(5)?;
            r.set_fixed_point_iterations(self.params.variational_refinement_iterations)?;
            self.refiners.push(r);
        }
        Ok(&mut self.refiners[level])
    }

    /// Flow from `a` to `b` on their finest level, starting from `init` (interleaved, on the
    /// finest level's grid) where given: OpenCV's DIS with finest scale 0.
    ///
    /// # Errors
    /// The frames differ in size or stride, or OpenCV's refinement fails.
    pub fn calc(
        &mut self,
        a: &DisFrame,
        b: &DisFrame,
        init: Option<&FlowField>,
    ) -> Result<FlowField> {
        let stride = self.params.patch_stride;
        if a.size() != b.size() || a.stride != stride || b.stride != stride {
            return Err(Error::Flow(format!(
                "DIS frames of {:?} and {:?} (stride {}, {}) for a search of stride {stride}",
                a.size(),
                b.size(),
                a.stride,
                b.stride
            )));
        }
        let (w0, h0) = a.size();
        if let Some(f) = init.filter(|f| (f.width, f.height) != (w0, h0)) {
            return Err(Error::Flow(format!(
                "an initial flow of {}x{} for {w0}x{h0} frames",
                f.width, f.height
            )));
        }
        let inner = self.params.gradient_descent_iterations / 2;
        let n = a.levels.len();
        let coarsest = &a.levels[n - 1];
        debug_assert_eq!(n, b.levels.len());
        let (mut u, mut v) = (
            vec![0f32; coarsest.w * coarsest.h],
            vec![0f32; coarsest.w * coarsest.h],
        );
        for l in (0..n).rev() {
            let (s, t) = (&a.source(l), &b.target(l));
            let init_l = match init {
                Some(f) if l > 0 => Some(resized_flow(f, (s.w, s.h), 1.0 / (1u32 << l) as f32)?),
                _ => None,
            };
            let init_data = init_l.as_ref().or(init).map(|f| &f.data[..]);
            vectorized(Search {
                s,
                t,
                stride,
                u: &u,
                v: &v,
                init: init_data,
                inner,
                sx: &mut self.sx,
                sy: &mut self.sy,
                simd: self.lanes,
            });
            let (sx, sy) = (std::mem::take(&mut self.sx), std::mem::take(&mut self.sy));
            vectorized(Densify {
                s,
                t,
                stride,
                sx: &sx,
                sy: &sy,
                acc: &mut self.acc,
                u: &mut u,
                v: &mut v,
            });
            (self.sx, self.sy) = (sx, sy);

            if self.params.variational_refinement_iterations > 0 {
                let (sg, tg) = (&a.levels[l].grey, &b.levels[l].grey);
                let (w, h) = (s.w, s.h);
                let refiner = self.refiner(l)?;
                let (mut mu, mut mv) = (plane_mat(&mut u, w, h)?, plane_mat(&mut v, w, h)?);
                refiner.calc_uv(sg, tg, &mut mu, &mut mv)?;
            }
            if l > 0 {
                let finer = (a.levels[l - 1].w, a.levels[l - 1].h);
                // OpenCV's resize, then doubled in place (its order).
                let up = |p: &[f32]| {
                    let mut out = upsample_linear(p, (s.w, s.h), 1, finer);
                    for x in &mut out {
                        *x *= 2.0;
                    }
                    out
                };
                (u, v) = (up(&u), up(&v));
            }
        }
        let data = u.iter().zip(&v).flat_map(|(&x, &y)| [x, y]).collect();
        Ok(FlowField {
            width: w0,
            height: h0,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use opencv::core::Mat;
    use opencv::prelude::*;

    use super::{DisFrame, InverseSearch, InverseSearchParams};

    /// A smooth textured `w` × `h` image, shifted by (`dx`, `dy`).
    fn image(w: usize, h: usize, (dx, dy): (f32, f32)) -> Mat {
        let bytes: Vec<u8> = (0..w * h)
            .map(|k| {
                let (x, y) = ((k % w) as f32 - dx, (k / w) as f32 - dy);
                let v = 128.0
                    + 50.0 * (x * 0.31).sin() * (y * 0.23).cos()
                    + 30.0 * ((x + y) * 0.11).sin();
                v.round().clamp(0.0, 255.0) as u8
            })
            .collect();
        Mat::new_rows_cols_with_data::<u8>(h as i32, w as i32, &bytes)
            .and_then(|m| m.try_clone())
            .expect("image")
    }

    fn params(variational: i32) -> InverseSearchParams {
        InverseSearchParams {
            patch_stride: 4,
            gradient_descent_iterations: 12,
            variational_refinement_iterations: variational,
        }
    }

    #[test]
    fn it_finds_a_uniform_shift_on_every_instruction_set() {
        // 101 × 77: not a multiple of the stride, three pyramid levels.
        let shift = (1.6, -0.7);
        let a = DisFrame::new(image(101, 77, (0.0, 0.0)), 4).expect("frame");
        let b = DisFrame::new(image(101, 77, shift), 4).expect("frame");
        for variational in [0, 5] {
            let mut vector = InverseSearch::new(params(variational));
            let mut portable = InverseSearch::new(params(variational));
            portable.lanes = None;
            let f = vector.calc(&a, &b, None).expect("flow");
            let g = portable.calc(&a, &b, None).expect("flow");
            assert_eq!((f.width, f.height, f.data.len()), (101, 77, 101 * 77 * 2));
            // Away from the borders (where the shifted image has no match), the shift.
            let mut err = 0.0f64;
            let mut n = 0;
            for y in 10..67 {
                for x in 10..91 {
                    let k = 2 * (y * 101 + x);
                    err += f64::from((f.data[k] - shift.0).hypot(f.data[k + 1] - shift.1));
                    n += 1;
                }
            }
            let epe = err / f64::from(n);
            assert!(epe < 0.1, "variational {variational}: EPE {epe}");
            // The two instruction sets round differently (FMA), nothing more.
            let diff = f
                .data
                .iter()
                .zip(&g.data)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 0.05,
                "variational {variational}: paths differ by {diff}"
            );
        }
    }

    #[test]
    fn frames_too_small_or_mismatched_are_refused_by_size() {
        let Err(e) = DisFrame::new(image(7, 30, (0.0, 0.0)), 4) else {
            panic!("a 7-pixel-wide frame was accepted");
        };
        assert!(e.to_string().contains("7x30"), "{e}");
        let a = DisFrame::new(image(64, 48, (0.0, 0.0)), 4).expect("frame");
        let b = DisFrame::new(image(48, 64, (0.0, 0.0)), 4).expect("frame");
        let e = InverseSearch::new(params(0))
            .calc(&a, &b, None)
            .expect_err("sizes differ");
        assert!(e.to_string().contains("(64, 48)"), "{e}");
        let prior = super::FlowField::zeros(10, 10);
        let e = InverseSearch::new(params(0))
            .calc(&a, &a, Some(&prior))
            .expect_err("prior size");
        assert!(e.to_string().contains("10x10"), "{e}");
    }
}
