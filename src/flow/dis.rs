//! Engine `dis`: OpenCV's DIS optical flow made multi-frame.
//!
//! DIS is ours by default (`inverse_search.rs`: OpenCV's algorithm, each frame's pyramid,
//! gradients, patch templates and tensors made once for the four flows it is in) or OpenCV's
//! own (`DisBackend::Opencv`, and for patch sizes other than 8).
//!
//! Each frame's grey image is made once and brought to DIS's finest level (¼ resolution for
//! every preset but `medium`) by the same area resize OpenCV's pyramid starts with; DIS is then
//! run on those small images with its finest scale set to 0, which gives exactly its own flow
//! before its last step, the upsampling. (Given full images, OpenCV's `calc` would resize both:
//! four resizes of each frame. The coarser levels are built from the small images, where they
//! cost little.)
//!
//! For each new frame t, forward flow (t−1 → t) and backward flow (t → t−1) are computed by DIS,
//! concurrently (one core each; OpenCV's own thread pool is switched off because it spins against
//! rayon), and each direction then goes through steps 2 and 3 below and its upsampling on its own
//! core. With the temporal prior on (the default), both start from a constant-velocity
//! prediction: the previous pair's flows at the same pixel, negated (OpenCV tries it as a
//! candidate for every patch, at every level). Then, by default:
//! 1. each direction is upsampled and refined at full resolution by a windowed Lucas–Kanade step
//!    (`refine.rs`), from gradients and structure tensors made once per frame and used by both
//!    pairs the frame is in (every preset keeps its own finest level: `medium` stopped at ¼
//!    once, which held on synthetic frames and failed on real ones, see [`finest_scale`]);
//! 2. confidence and occlusion come from forward–backward consistency, and each direction is
//!    refined by the other where they agree (symmetric fusion); pixels where the two disagree
//!    by more than a pixel are filled from the reliable ones in the same image region, by an
//!    edge-aware smoothing on DIS's grid (`spatial.rs`; when refining, before step 1's
//!    upsampling);
//! 3. the forward flow's inconsistent pixels are filled from the previous pair's backward flow,
//!    corrected for the change of camera motion (`temporal.rs`). With the one-frame look-ahead,
//!    the backward flow's are filled likewise from the next pair's forward flow, and each pair
//!    is returned one frame later.
//!
//! Without the refinement, steps 2 and 3 work on DIS's own grid, with their tolerances in frame
//! pixels, and only the results (flows, confidence, occlusion) are upsampled: a sixteenth of the
//! pixels at ¼ resolution.

use opencv::core::{Mat, Vec2f};
use opencv::prelude::*;
use opencv::video::DISOpticalFlow;
use serde::{Deserialize, Serialize};

use super::consistency::fb_check;
use super::inverse_search::{DisFrame, InverseSearch, InverseSearchParams, PATCH};
pub use super::level::grey_mat;
use super::level::{level_grey, level_grey_from_rgb};
use super::refine::{FrameTensor, Refiner};
use super::resize::{resized_flow, upsample_linear};
use super::spatial::{fill_unreliable, unreliable, SpatialFill};
use super::temporal::fill_inconsistent;
use super::{FlowEngine, FlowField, PairFlow};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Frame;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DisPreset {
    Ultrafast,
    Fast,
    Medium,
}

impl DisPreset {
    fn opencv(self) -> i32 {
        match self {
            Self::Ultrafast => opencv::video::DISOpticalFlow_PRESET_ULTRAFAST,
            Self::Fast => opencv::video::DISOpticalFlow_PRESET_FAST,
            Self::Medium => opencv::video::DISOpticalFlow_PRESET_MEDIUM,
        }
    }
}

/// Which implementation of DIS computes each flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DisBackend {
    /// OpenCV's algorithm with each frame's pyramid, gradients and patch tensors made once
    /// (`inverse_search.rs`); 8-pixel patches only (every preset's; other sizes run on OpenCV).
    #[default]
    Native,
    /// OpenCV's `DISOpticalFlow` itself.
    Opencv,
}

/// Parameters of the `dis` engine (OpenCV's, plus the temporal prior switch).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisConfig {
    pub preset: DisPreset,
    /// Which implementation of DIS runs.
    #[serde(default)]
    pub backend: DisBackend,
    /// Start each estimate from the constant-velocity prediction of the previous pair.
    pub temporal_prior: bool,
    /// Refine each direction by the other where they agree (see `consistency::fb_check`).
    #[serde(default = "default_true")]
    pub symmetric_fusion: bool,
    /// Full-resolution windowed Lucas–Kanade steps after DIS (0 = off). DIS's presets stop at
    /// ¼ (ultrafast, fast) or ½ (medium) resolution and upsample; this refines every pixel.
    /// One step is best: a second one fits image noise (see `benches/flow_dis.rs`).
    #[serde(default = "default_refine_iterations")]
    pub refine_iterations: u32,
    /// Half-size of the refinement's window (pixels).
    #[serde(default = "default_refine_radius")]
    pub refine_radius: usize,
    /// Damping of the refinement where texture is weak (grey levels² per window pixel).
    #[serde(default = "default_refine_lambda")]
    pub refine_lambda: f32,
    /// Fill each direction's unreliable pixels from the reliable ones in the same image region
    /// (see `spatial.rs`); `None` = off.
    #[serde(default = "default_spatial_fill")]
    pub spatial_fill: Option<SpatialFill>,
    /// Fill the forward flow's inconsistent pixels from the previous pair (see `temporal.rs`).
    #[serde(default = "default_true")]
    pub temporal_fill: bool,
    /// Hold each pair until the next frame and fill its backward flow's inconsistent pixels from
    /// the next pair's forward flow: one frame of latency.
    #[serde(default)]
    pub look_ahead: bool,
    /// Overrides of OpenCV's preset values (None = the preset's).
    pub finest_scale: Option<i32>,
    pub patch_size: Option<i32>,
    pub patch_stride: Option<i32>,
    pub gradient_descent_iterations: Option<i32>,
    pub variational_refinement_iterations: Option<i32>,
}

impl Default for DisConfig {
    /// `ultrafast`: in the whole pipeline it gave flowvo a lower ATE (0.18–0.44 % of the path vs
    /// 0.24–0.94 % with `fast`) and depth AbsRel (0.007–0.017 vs 0.009–0.028) on four 300-frame
    /// synthetic sequences, at a third of DIS's time; `medium` has the lowest flow EPE alone (see
    /// `benches/flow_dis.rs`), so `streamrecon flow` uses it.
    fn default() -> Self {
        Self {
            preset: DisPreset::Ultrafast,
            backend: DisBackend::default(),
            temporal_prior: true,
            symmetric_fusion: true,
            refine_iterations: default_refine_iterations(),
            refine_radius: default_refine_radius(),
            refine_lambda: default_refine_lambda(),
            spatial_fill: default_spatial_fill(),
            temporal_fill: true,
            look_ahead: false,
            finest_scale: None,
            patch_size: None,
            patch_stride: None,
            gradient_descent_iterations: None,
            variational_refinement_iterations: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[allow(clippy::unnecessary_wraps)] // serde's default of an `Option` field
fn default_spatial_fill() -> Option<SpatialFill> {
    Some(SpatialFill::default())
}

fn default_refine_iterations() -> u32 {
    1
}

fn default_refine_radius() -> usize {
    6
}

fn default_refine_lambda() -> f32 {
    0.3
}

struct Prev {
    index: u64,
    /// The grey image at DIS's finest level, as DIS takes it.
    dis_grey: LevelImage,
    /// Gradients and structure tensor, when refining.
    tensor: Option<FrameTensor>,
    /// Constant-velocity initial flows for the next pair (forward, backward), on DIS's grid: the
    /// pair that ended at this frame, negated (only with the temporal prior on).
    priors: Option<(FlowField, FlowField)>,
    /// The backward flow of the pair that ended at this frame, on the working grid (causal
    /// temporal fill).
    bwd: Option<FlowField>,
}

/// The `dis` engine.
pub struct DisEngine {
    config: DisConfig,
    fwd: Dis,
    bwd: Dis,
    /// DIS's patch size and stride.
    patch: i32,
    stride: i32,
    /// DIS's finest level as the preset (or an override) sets it.
    preset_shift: u32,
    /// DIS's finest level for this stream (each of its flow pixels is 2^shift frame pixels a
    /// side): the preset's, or finer for frames so small that it would have no pyramid there.
    shift: u32,
    /// Full-resolution refinement of each direction (forward, backward).
    refiners: (Refiner, Refiner),
    /// A spent frame tensor whose buffers the next frame reuses.
    spare: Option<FrameTensor>,
    prev: Option<Prev>,
    /// With the look-ahead: the last pair (on the working grid), waiting for the next one.
    pending: Option<PairFlow>,
    size: Option<(u32, u32)>,
}

/// DIS's finest pyramid level: the preset's unless overridden. `medium` used to stop at ¼
/// resolution when refining (half its time on synthetic frames at the same EPE), but on real
/// pairs with large displacements that made it worse than plain DIS: on the Middlebury
/// motorcycle pair EPE 3.13 against 2.62, on aloe 28.2 against 18.5 (`benches/flow_real.rs`).
fn finest_scale(c: &DisConfig) -> Option<i32> {
    c.finest_scale
}

/// The coarsest finest level DIS may be given (the CLI's limit too).
const MAX_SHIFT: u32 = 8;

/// A DIS instance and its finest level. The engine hands DIS grey images already at that level
/// (made once per frame, where DIS would make them in every call, for both its images) and sets
/// DIS's own finest scale to 0: OpenCV's pyramid starts with an area resize of the full image
/// to that level, so the flow is exactly DIS's own before its last step, the upsampling, which
/// the engine does where it needs it.
fn make_dis(c: &DisConfig) -> Result<(opencv::core::Ptr<DISOpticalFlow>, u32)> {
    let mut d = DISOpticalFlow::create(c.preset.opencv())?;
    if let Some(v) = finest_scale(c) {
        d.set_finest_scale(v)?;
    }
    if let Some(v) = c.patch_size {
        d.set_patch_size(v)?;
    }
    if let Some(v) = c.patch_stride {
        d.set_patch_stride(v)?;
    }
    if let Some(v) = c.gradient_descent_iterations {
        d.set_gradient_descent_iterations(v)?;
    }
    if let Some(v) = c.variational_refinement_iterations {
        d.set_variational_refinement_iterations(v)?;
    }
    let (size, stride) = (d.get_patch_size()?, d.get_patch_stride()?);
    if stride < 1 || stride >= size {
        return Err(Error::Flow(format!(
            "DIS patch stride {stride} must be at least 1 and below the patch size {size}"
        )));
    }
    let finest = d.get_finest_scale()?;
    let shift = u32::try_from(finest)
        .ok()
        .filter(|s| *s <= MAX_SHIFT)
        .ok_or_else(|| {
            Error::Flow(format!(
                "DIS finest scale {finest} must be between 0 and {MAX_SHIFT}"
            ))
        })?;
    d.set_finest_scale(0)?;
    Ok((d, shift))
}

/// One direction's DIS.
enum Dis {
    Opencv(opencv::core::Ptr<DISOpticalFlow>),
    Native(InverseSearch),
}

/// A frame at DIS's finest level, as its DIS takes it.
enum LevelImage {
    Opencv(Mat),
    Native(DisFrame),
}

impl LevelImage {
    fn size(&self) -> (usize, usize) {
        match self {
            Self::Opencv(m) => (m.cols() as usize, m.rows() as usize),
            Self::Native(f) => f.size(),
        }
    }

    /// The 8-bit grey image at DIS's finest level.
    fn grey(&self) -> &Mat {
        match self {
            Self::Opencv(m) => m,
            Self::Native(f) => f.grey(),
        }
    }
}

/// The two directions' DIS for `c`, its finest level, patch size and stride.
fn make_pair(c: &DisConfig) -> Result<((Dis, Dis), u32, i32, i32)> {
    let (fwd, shift) = make_dis(c)?;
    let (bwd, _) = make_dis(c)?;
    let (patch, stride) = (fwd.get_patch_size()?, fwd.get_patch_stride()?);
    let native = c.backend == DisBackend::Native && usize::try_from(patch) == Ok(PATCH);
    let pair = if native {
        let params = InverseSearchParams {
            patch_stride: usize::try_from(stride).unwrap_or(1),
            gradient_descent_iterations: usize::try_from(fwd.get_gradient_descent_iterations()?)
                .unwrap_or(0),
            variational_refinement_iterations: fwd.get_variational_refinement_iterations()?,
        };
        (
            Dis::Native(InverseSearch::new(params)),
            Dis::Native(InverseSearch::new(params)),
        )
    } else {
        (Dis::Opencv(fwd), Dis::Opencv(bwd))
    };
    Ok((pair, shift, patch, stride))
}

/// Whether DIS has a pyramid for `w` × `h` images and `patch`-pixel patches: OpenCV's coarsest
/// level must not be below its finest (else it indexes past its own pyramid), which takes a
/// patch on the short side and more than √2 patches on the long one.
fn dis_fits(w: i32, h: i32, patch: i32) -> bool {
    w.min(h) >= patch && f64::from(w.max(h)) > f64::from(patch) * std::f64::consts::SQRT_2
}

/// The finest level, at most `shift`, at which DIS fits `w` × `h` frames (see [`dis_fits`]);
/// `shift` itself where none does (DIS is then refused by name, see `DisEngine::calc`).
fn fitting_shift((w, h): (u32, u32), shift: u32, patch: i32) -> u32 {
    let side = |v: u32, s: u32| i32::try_from(v >> s).unwrap_or(i32::MAX);
    (0..=shift)
        .rev()
        .find(|&s| dis_fits(side(w, s), side(h, s), patch))
        .unwrap_or(shift)
}

/// `a` and `b` on two cores. With `caller_keeps_one`, from a thread outside rayon's pool, `a`
/// runs on this thread and only `b` goes to the pool: `rayon::join` from outside the pool hands
/// both to a worker and blocks this thread, and after a pause between frames (a caller's own
/// work) the pool's second worker then started too late to take `b` (measured at 640×480: both
/// DIS calls ran one after the other on one worker, 1.6–1.7 ms instead of 0.9–1.0).
pub(crate) fn both<RA: Send, RB: Send>(
    caller_keeps_one: bool,
    a: impl FnOnce() -> RA + Send,
    b: impl FnOnce() -> RB + Send,
) -> (RA, RB) {
    if !caller_keeps_one || rayon::current_thread_index().is_some() {
        return rayon::join(a, b);
    }
    let mut rb = None;
    let ra = rayon::in_place_scope(|s| {
        s.spawn(|_| rb = Some(b()));
        a()
    });
    // The scope returns once its spawned job has run (or re-raises the job's panic).
    (
        ra,
        rb.expect("a scope's spawned job has run when the scope returns"),
    )
}

/// How long a rayon worker stays awake after a frame, waiting for the next one's work.
const LINGER: std::time::Duration = std::time::Duration::from_millis(3);

/// Keeps one rayon worker awake for [`LINGER`], running whatever the pool is given meanwhile
/// (the next frame's forward direction, see [`both`]) and otherwise yielding its core. A worker
/// that had gone to sleep during the caller's own work between frames often started the next
/// frame's job only once the caller had finished its direction, so the two ran one after the
/// other (measured at 640×480 with 2 ms between frames: the helper's direction started 0.06 ms
/// to 0.9 ms after the caller's; awake, 0.001–0.002 ms after).
fn keep_a_worker_awake() {
    let until = std::time::Instant::now() + LINGER;
    rayon::spawn(move || {
        while std::time::Instant::now() < until {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                std::thread::yield_now();
            }
        }
    });
}

/// The next pair's initial flow from this pair's flow in the opposite direction, on a grid
/// `down` levels finer than DIS's: negated, on DIS's grid of `dis_size`.
fn prior_from(f: &FlowField, down: u32, dis_size: (usize, usize)) -> Result<FlowField> {
    if down == 0 {
        Ok(negated(f))
    } else {
        resized_flow(f, dis_size, -1.0 / (1u32 << down) as f32)
    }
}

/// Confidence on a coarser `sw` × `sh` grid, bilinearly on `w` × `h`.
fn upsampled_conf(c: &[f32], small: (usize, usize), full: (usize, usize)) -> Vec<f32> {
    upsample_linear(c, small, 1, full)
}

/// Values (occlusion, confidence caps) on a `2^shift` times coarser `sw` × `sh` grid, nearest
/// cell, on `w` × `h`.
fn upsampled_nearest<T: Copy>(
    o: &[T],
    coarse: (usize, usize),
    (w, h): (usize, usize),
    shift: u32,
) -> Vec<T> {
    let mut out = Vec::with_capacity(w * h);
    for_nearest_rows(o, coarse, (w, h), shift, |_, row| {
        out.extend_from_slice(row);
    });
    out
}

/// Calls `f(y, row)` with each row `y` of `o` upsampled to `w` × `h` as [`upsampled_nearest`]
/// does, without making the whole image.
fn for_nearest_rows<T: Copy>(
    o: &[T],
    (sw, sh): (usize, usize),
    (w, h): (usize, usize),
    shift: u32,
    mut f: impl FnMut(usize, &[T]),
) {
    let k = 1usize << shift;
    let mut row = Vec::with_capacity(w.max(sw * k));
    for y in 0..h {
        if y % k == 0 && (y >> shift) < sh {
            // A new coarse row; past the last one, the last is repeated.
            let coarse = &o[(y >> shift) * sw..][..sw];
            row.clear();
            for &v in coarse {
                row.extend(std::iter::repeat_n(v, k));
            }
            row.resize(w, coarse[sw - 1]);
        }
        f(y, &row[..w]);
    }
}

/// A flow field negated (the next pair's initial flow in the opposite direction).
fn negated(f: &FlowField) -> FlowField {
    FlowField {
        width: f.width,
        height: f.height,
        data: f.data.iter().map(|v| -v).collect(),
    }
}

/// Copies a CV_32FC2 matrix into a flow field.
///
/// # Errors
/// The matrix is not CV_32FC2.
pub fn flow_from_mat(m: &Mat) -> Result<FlowField> {
    let (w, h) = (m.cols() as usize, m.rows() as usize);
    // Collected, not zero-filled and then overwritten.
    let pairs: Vec<[f32; 2]> = m.data_typed::<Vec2f>()?.iter().map(|v| v.0).collect();
    let data = pairs.into_flattened();
    Ok(FlowField {
        width: w,
        height: h,
        data,
    })
}

impl DisEngine {
    /// # Errors
    /// OpenCV cannot create the DIS instances, or a parameter is out of range.
    pub fn new(config: DisConfig) -> Result<Self> {
        // OpenCV's own pool (TBB) spins against rayon on small machines; we parallelise ourselves.
        opencv::core::set_num_threads(1)?;
        let ((fwd, bwd), shift, patch, stride) = make_pair(&config)?;
        Ok(Self {
            fwd,
            bwd,
            patch,
            stride,
            preset_shift: shift,
            shift,
            refiners: (
                Refiner::new(config.refine_iterations, config.refine_lambda),
                Refiner::new(config.refine_iterations, config.refine_lambda),
            ),
            spare: None,
            config,
            prev: None,
            pending: None,
            size: None,
        })
    }

    /// The grid the engine checks, fuses and fills on, as a shift from the frame's: the frame's
    /// own when refining (the refinement works there), else DIS's, upsampling only the results.
    fn work_shift(&self) -> u32 {
        if self.config.refine_iterations > 0 {
            0
        } else {
            self.shift
        }
    }

    fn calc(
        dis: &mut Dis,
        a: &LevelImage,
        b: &LevelImage,
        init: Option<FlowField>,
    ) -> Result<FlowField> {
        let (dis, a, b) = match (dis, a, b) {
            (Dis::Native(d), LevelImage::Native(a), LevelImage::Native(b)) => {
                return d.calc(a, b, init.as_ref());
            }
            (Dis::Opencv(d), LevelImage::Opencv(a), LevelImage::Opencv(b)) => (d, a, b),
            _ => {
                return Err(Error::Flow(
                    "DIS was given frames prepared for the other backend".into(),
                ))
            }
        };
        let (w, h) = (a.cols(), a.rows());
        if !dis_fits(w, h, dis.get_patch_size()?) {
            // OpenCV's pyramid would have no level (it may not say so, or crash).
            return Err(Error::Flow(format!(
                "at DIS's finest scale the frames are {w}x{h}, too small for its patches"
            )));
        }
        match init {
            // DIS starts from the input flow when it has the image's size and type (OpenCV ≥ 4.0),
            // and writes its estimate over it: the prior's buffer becomes the flow, uncopied.
            Some(mut flow) if (flow.width, flow.height) == (w as usize, h as usize) => {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut flow.data);
                let mut m = Mat::new_rows_cols_with_bytes_mut::<Vec2f>(h, w, bytes)?;
                let before = m.data();
                dis.calc(a, b, &mut m)?;
                if m.data() != before {
                    // OpenCV reallocated instead (not expected): take its result.
                    return flow_from_mat(&m.try_clone()?);
                }
                drop(m);
                Ok(flow)
            }
            _ => {
                let mut flow = Mat::default();
                dis.calc(a, b, &mut flow)?;
                flow_from_mat(&flow)
            }
        }
    }

    /// Flow between two frames, both directions at once (one core each), with optional priors on
    /// DIS's grid, on the working grid: each direction upsampled and refined when both frames
    /// have tensors.
    fn pair(
        &mut self,
        a: (&LevelImage, Option<&FrameTensor>),
        b: (&LevelImage, Option<&FrameTensor>),
        priors: Option<(FlowField, FlowField)>,
    ) -> Result<(Directions, Option<Caps>)> {
        let keep_one = self.caller_keeps_one();
        let (size, shift) = (self.size.unwrap_or_default(), self.shift);
        let (fwd_dis, bwd_dis) = (&mut self.fwd, &mut self.bwd);
        let (fwd_ref, bwd_ref) = (&mut self.refiners.0, &mut self.refiners.1);
        let (fwd_init, bwd_init) = match priors {
            Some((f, b)) => (Some(f), Some(b)),
            None => (None, None),
        };
        // The caller takes the backward direction: with the native DIS it also prepares the new
        // frame as a source (patch templates and tensors), the heavier of its two parts, so the
        // helper finishes first and the caller does not wait for it.
        let (bwd, fwd) = both(
            keep_one,
            || Self::calc(bwd_dis, b.0, a.0, bwd_init),
            || Self::calc(fwd_dis, a.0, b.0, fwd_init),
        );
        let (fwd, bwd) = (fwd?, bwd?);
        let (Some(at), Some(bt)) = (a.1, b.1) else {
            return Ok(((fwd, bwd), None));
        };
        // Refining: each direction's unreliable pixels are filled on DIS's grid, where it costs
        // a sixteenth, before the upsampling; then the refinement at the frame's.
        let fill = self.config.spatial_fill;
        let one = |flow: &FlowField,
                   other: &FlowField,
                   source: &LevelImage,
                   refiner: &mut Refiner,
                   from: &FrameTensor,
                   to: &FrameTensor|
         -> Result<(FlowField, Vec<f32>)> {
            let grid = 1usize << shift;
            let mut filled = std::borrow::Cow::Borrowed(flow);
            let mut cap = Vec::new();
            if let Some(f) = &fill {
                let c = fb_check(flow, other, false, grid);
                let bad = unreliable(flow, &c.conf, grid, f.max_disagreement);
                fill_unreliable(filled.to_mut(), &bad, source.grey(), f)?;
                // A filled pixel's confidence is never more than DIS's own flow there had: the
                // refinement can make an interpolated flow consistent, not measured.
                cap = c
                    .conf
                    .iter()
                    .zip(&bad)
                    .map(|(&c, &b)| if b { c } else { 1.0 })
                    .collect();
            }
            let full = (size.0 as usize, size.1 as usize);
            let mut flow = if shift == 0 {
                filled.into_owned()
            } else {
                resized_flow(&filled, full, (1u32 << shift) as f32)?
            };
            refiner.refine(from, to, &mut flow);
            Ok((flow, cap))
        };
        let (bwd, fwd) = both(
            keep_one,
            || one(&bwd, &fwd, b.0, bwd_ref, bt, at),
            || one(&fwd, &bwd, a.0, fwd_ref, at, bt),
        );
        let ((fwd, fwd_cap), (bwd, bwd_cap)) = (fwd?, bwd?);
        let caps = (!fwd_cap.is_empty()).then_some((fwd_cap, bwd_cap));
        Ok(((fwd, bwd), caps))
    }

    /// Whether the calling thread computes one direction itself (see [`both`]): where the work
    /// is on DIS's grid, whose steps are too small for rayon's parallel loops. With the
    /// full-resolution refinement, whose loops are parallel, both directions go to the pool.
    fn caller_keeps_one(&self) -> bool {
        self.work_shift() > 0
    }

    /// Where results go from the working grid: the frame's size and the working grid's shift,
    /// or `None` when they are on the frame's grid already.
    fn frame_grid(&self) -> Option<((usize, usize), u32)> {
        let shift = self.work_shift();
        self.size
            .filter(|_| shift > 0)
            .map(|(w, h)| ((w as usize, h as usize), shift))
    }

    /// A pair on the working grid, on the frame's.
    fn on_frame_grid(&self, mut p: PairFlow) -> Result<PairFlow> {
        let to_frame = self.frame_grid();
        let (f, b) = both(
            self.caller_keeps_one(),
            || Direction::new(p.fwd, p.fwd_conf, p.fwd_occ, None, None).on_grid(to_frame),
            || Direction::new(p.bwd, p.bwd_conf, p.bwd_occ, None, None).on_grid(to_frame),
        );
        let (f, b) = (f?, b?);
        (p.fwd, p.fwd_conf, p.fwd_occ) = (f.flow, f.conf, f.occ);
        (p.bwd, p.bwd_conf, p.bwd_occ) = (b.flow, b.conf, b.occ);
        Ok(p)
    }
}

/// A pair's two flows (forward, backward).
type Directions = (FlowField, FlowField);

/// Confidence caps on DIS's grid, forward and backward (see [`cap_confidence`]).
type Caps = (Vec<f32>, Vec<f32>);

/// `conf` on the frame's grid bounded by `cap`, each pixel by its cell's on DIS's `dis_size`
/// grid, `shift` levels coarser: the confidence caps of the pixels the spatial fill replaced
/// before the refinement (1 elsewhere).
fn cap_confidence(
    conf: &mut [f32],
    cap: &[f32],
    dis_size: (usize, usize),
    full: (usize, usize),
    shift: u32,
) {
    if cap.len() != dis_size.0 * dis_size.1 || conf.len() != full.0 * full.1 || cap.is_empty() {
        return;
    }
    // Row by row: a full-resolution copy of the caps cost as much again in page faults.
    for_nearest_rows(cap, dis_size, full, shift, |y, caps| {
        for (c, &m) in conf[y * full.0..(y + 1) * full.0].iter_mut().zip(caps) {
            *c = c.min(m);
        }
    });
}

/// One direction of a pair as its chain in `push` leaves it.
struct Direction {
    flow: FlowField,
    conf: Vec<f32>,
    occ: Vec<bool>,
    /// The next pair's initial flow in the opposite direction.
    prior: Option<FlowField>,
    /// The flow kept for the next pair's temporal fill (backward only).
    kept: Option<FlowField>,
}

impl Direction {
    fn new(
        flow: FlowField,
        conf: Vec<f32>,
        occ: Vec<bool>,
        prior: Option<FlowField>,
        kept: Option<FlowField>,
    ) -> Self {
        Self {
            flow,
            conf,
            occ,
            prior,
            kept,
        }
    }

    /// Flow, confidence and occlusion upsampled to `full` from a grid `shift` levels coarser
    /// (unchanged for `None`): the flow as DIS's last step does, confidence bilinearly,
    /// occlusion from the nearest cell.
    fn on_grid(mut self, to: Option<((usize, usize), u32)>) -> Result<Self> {
        let Some((full, shift)) = to else {
            return Ok(self);
        };
        let small = (self.flow.width, self.flow.height);
        self.flow = resized_flow(&self.flow, full, (1u32 << shift) as f32)?;
        self.conf = upsampled_conf(&self.conf, small, full);
        self.occ = upsampled_nearest(&self.occ, small, full, shift);
        Ok(self)
    }
}

impl FlowEngine for DisEngine {
    fn name(&self) -> &'static str {
        "dis"
    }

    fn push(&mut self, frame: &Frame) -> Result<Vec<PairFlow>> {
        let size = (frame.width(), frame.height());
        if let Some(s) = self.size {
            if s != size {
                return Err(Error::Flow(format!(
                    "frame {} is {}x{}, the stream started at {}x{}",
                    frame.index, size.0, size.1, s.0, s.1
                )));
            }
        } else {
            if size.0 < 16 || size.1 < 16 {
                return Err(Error::Flow(format!(
                    "frames of {}x{} are too small for DIS (16x16 at least)",
                    size.0, size.1
                )));
            }
            self.shift = fitting_shift(size, self.preset_shift, self.patch);
            self.size = Some(size);
        }
        let refining = self.config.refine_iterations > 0;
        // Without the refinement, the native DIS needs only DIS's level of the frame.
        let fused = match self.fwd {
            Dis::Native(_) if !refining => {
                level_grey_from_rgb(&frame.image, self.shift, self.caller_keeps_one())?
            }
            _ => None,
        };
        let (level, tensor) = if let Some(level) = fused {
            (level, None)
        } else {
            let grey = grey_mat(&frame.image)?;
            let (w, h) = (size.0 as usize, size.1 as usize);
            let tensor = if refining {
                Some(match self.spare.take() {
                    Some(mut t) => {
                        t.recompute(grey.data_bytes()?, w, h);
                        t
                    }
                    None => FrameTensor::new(grey.data_bytes()?, w, h, self.config.refine_radius),
                })
            } else {
                None
            };
            (level_grey(grey, self.shift)?, tensor)
        };
        let dis_grey = match self.fwd {
            Dis::Native(_) => {
                let stride = usize::try_from(self.stride).unwrap_or(1);
                LevelImage::Native(DisFrame::new(level, stride).map_err(|e| {
                    Error::Flow(format!(
                        "frame {} ({}x{}): {e}",
                        frame.index, size.0, size.1
                    ))
                })?)
            }
            Dis::Opencv(_) => LevelImage::Opencv(level),
        };
        let Some(prev) = self.prev.take() else {
            self.prev = Some(Prev {
                index: frame.index,
                dis_grey,
                tensor,
                priors: None,
                bwd: None,
            });
            return Ok(Vec::new());
        };
        let ((fwd, bwd), caps) = self
            .pair(
                (&prev.dis_grey, prev.tensor.as_ref()),
                (&dis_grey, tensor.as_ref()),
                prev.priors,
            )
            .map_err(|e| {
                // OpenCV's message does not say which frames, or which parameter, it means.
                let patch = self.patch;
                Error::Flow(format!(
                    "DIS between frames {} and {} ({}x{}, patch size {patch}): {e}",
                    prev.index, frame.index, size.0, size.1
                ))
            })?;
        // Each direction's chain runs on its own core: confidence and occlusion (judged before
        // the two directions refine each other, so each side reads both unfused flows), fusion,
        // the temporal fill, the next pair's prior and, without the look-ahead, the upsampling
        // to the frame's grid.
        let fuse = self.config.symmetric_fusion;
        let grid = 1usize << self.work_shift();
        let (temporal_fill, temporal_prior) =
            (self.config.temporal_fill, self.config.temporal_prior);
        let look_ahead = self.config.look_ahead;
        let keep_bwd = temporal_fill && !look_ahead;
        let mut pending = self.pending.take();
        // The previous pair's backward flow, on this pair's source grid.
        let before = pending.as_ref().map(|p| &p.bwd).or(prev.bwd.as_ref());
        // Constant velocity: this pair's backward flow, negated, predicts the next forward flow,
        // and its forward flow, negated, the next backward flow (both at the same pixel).
        let dis_size = dis_grey.size();
        let down = self.shift - self.work_shift();
        let to_frame = if look_ahead { None } else { self.frame_grid() };
        // Without the refinement the checks run on DIS's grid, and so does the spatial fill
        // (with it, the fill ran in `pair`, before the upsampling).
        let coarse_fill = self.config.spatial_fill.as_ref().filter(|_| !refining);
        let dis_shift = self.shift;
        // A direction's check: its flow (fused, and filled here without the refinement),
        // confidence (capped where the fill ran before the refinement) and occlusion.
        let checked = |own: &FlowField,
                       other: &FlowField,
                       cap: Option<&Vec<f32>>,
                       source: &LevelImage|
         -> Result<(FlowField, Vec<f32>, Vec<bool>)> {
            let mut c = fb_check(own, other, fuse, grid);
            if let Some(cap) = cap {
                let full = (own.width, own.height);
                cap_confidence(&mut c.conf, cap, dis_size, full, dis_shift);
            }
            let mut flow = c.fused.unwrap_or_else(|| own.clone());
            if let Some(f) = coarse_fill {
                let bad = unreliable(own, &c.conf, grid, f.max_disagreement);
                fill_unreliable(&mut flow, &bad, source.grey(), f)?;
            }
            Ok((flow, c.conf, c.occ))
        };
        let (f, b) = both(
            self.caller_keeps_one(),
            || -> Result<Direction> {
                let (mut flow, conf, occ) =
                    checked(&fwd, &bwd, caps.as_ref().map(|c| &c.0), &prev.dis_grey)?;
                if let (true, Some(before)) = (temporal_fill, before) {
                    fill_inconsistent(&mut flow, &occ, &conf, before, grid);
                }
                let prior = temporal_prior
                    .then(|| prior_from(&flow, down, dis_size))
                    .transpose()?;
                Direction::new(flow, conf, occ, prior, None).on_grid(to_frame)
            },
            || -> Result<Direction> {
                let (flow, conf, occ) =
                    checked(&bwd, &fwd, caps.as_ref().map(|c| &c.1), &dis_grey)?;
                let prior = temporal_prior
                    .then(|| prior_from(&flow, down, dis_size))
                    .transpose()?;
                let kept = keep_bwd.then(|| flow.clone());
                Direction::new(flow, conf, occ, prior, kept).on_grid(to_frame)
            },
        );
        let (f, b) = (f?, b?);
        let priors = b.prior.zip(f.prior);
        let mut out = Vec::new();
        if let Some(mut pending) = pending.take() {
            // Its backward flow is on this pair's source grid too.
            fill_inconsistent(
                &mut pending.bwd,
                &pending.bwd_occ,
                &pending.bwd_conf,
                &f.flow,
                grid,
            );
            out.push(self.on_frame_grid(pending)?);
        }
        let pair = PairFlow {
            from: prev.index,
            to: frame.index,
            fwd: f.flow,
            bwd: b.flow,
            fwd_conf: f.conf,
            bwd_conf: b.conf,
            fwd_occ: f.occ,
            bwd_occ: b.occ,
        };
        let kept_bwd = b.kept;
        if look_ahead {
            self.pending = Some(pair);
        } else {
            out.push(pair);
        }
        if self.caller_keeps_one() {
            keep_a_worker_awake();
        }
        self.spare = prev.tensor;
        self.prev = Some(Prev {
            index: frame.index,
            dis_grey,
            tensor,
            priors,
            bwd: kept_bwd,
        });
        Ok(out)
    }

    fn flush(&mut self) -> Result<Vec<PairFlow>> {
        self.pending
            .take()
            .map(|p| self.on_frame_grid(p))
            .into_iter()
            .collect()
    }

    fn reset(&mut self) {
        self.prev = None;
        self.pending = None;
        self.size = None;
        self.shift = self.preset_shift;
        // OpenCV's DIS keeps something of an initial flow it was given: after one, its next
        // estimate without one differs from a fresh instance's. A new stream gets new ones
        // (if that fails, the old ones still give flows).
        if let Ok(((f, b), ..)) = make_pair(&self.config) {
            (self.fwd, self.bwd) = (f, b);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn occlusion_is_upsampled_from_the_nearest_coarse_pixel() {
        // 3 × 2 coarse pixels at ¼ resolution onto 13 × 9: the frame's last column and row lie
        // past the coarse grid's (⌊13 / 4⌋ = 3) and repeat its last.
        let coarse = [true, false, true, false, false, true];
        let got = super::upsampled_nearest(&coarse, (3, 2), (13, 9), 2);
        assert_eq!(got.len(), 13 * 9);
        for y in 0..9 {
            for x in 0..13 {
                let want = coarse[(y / 4).min(1) * 3 + (x / 4).min(2)];
                assert_eq!(got[y * 13 + x], want, "{x},{y}");
            }
        }
    }

    #[test]
    fn the_level_image_made_in_one_pass_is_opencvs() {
        use opencv::prelude::*;
        // Every block sum's rounding (ties included) against OpenCV's area resize of the full
        // grey image, at ¼ and ½ resolution, including frames whose sides do not divide (left
        // to OpenCV).
        for (w, h) in [(64, 48), (40, 24), (66, 48)] {
            let img = streamrecon_core::frame::RgbImage::from_fn(w, h, |x, y| {
                let v = |k: u32| ((x * 37 + y * 101 + k * 53 + x * y) % 256) as u8;
                image::Rgb([v(0), v(1), v(2)])
            });
            for shift in [1, 2, 3] {
                for parallel in [false, true] {
                    let got = super::level_grey_from_rgb(&img, shift, parallel).expect("level");
                    let Some(got) = got else {
                        assert!(w % (1 << shift) != 0, "{w}x{h} at {shift}");
                        continue;
                    };
                    let grey = super::grey_mat(&img).expect("grey");
                    let want = super::level_grey(grey, shift).expect("area");
                    assert_eq!(
                        got.data_bytes().expect("bytes"),
                        want.data_bytes().expect("bytes"),
                        "{w}x{h} at level {shift}"
                    );
                }
            }
        }
    }

    #[test]
    fn grey_is_the_rounded_luma_of_every_pixel() {
        use opencv::prelude::*;
        // 37 × 5: whole vector blocks and a remainder; every channel's extremes.
        let img = streamrecon_core::frame::RgbImage::from_fn(37, 5, |x, y| {
            let v = |k: u32| ((x * 53 + y * 97 + k * 31) % 256) as u8;
            match (x + y) % 4 {
                0 => image::Rgb([255, 255, 255]),
                1 => image::Rgb([0, 0, 0]),
                _ => image::Rgb([v(0), v(1), v(2)]),
            }
        });
        let m = super::grey_mat(&img).expect("grey");
        let got = m.data_bytes().expect("bytes");
        for (g, p) in got.iter().zip(img.pixels()) {
            let [r, gr, b] = p.0.map(u32::from);
            assert_eq!(
                u32::from(*g),
                (77 * r + 150 * gr + 29 * b + 128) >> 8,
                "{p:?}"
            );
        }
        assert_eq!(got.len(), 37 * 5);
    }
}
