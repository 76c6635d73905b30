//! Engine `dis`: OpenCV's DIS optical flow made multi-frame.
//!
//! For each new frame t, forward flow (t−1 → t) and backward flow (t → t−1) are computed by DIS,
//! concurrently (one core each; OpenCV's own thread pool is switched off because it spins against
//! rayon). With the temporal prior on (the default), both start from a constant-velocity
//! prediction: the previous pair's flows at the same pixel, negated. (OpenCV uses an initial flow
//! only at its coarsest scale, so the prior matters for large motions.) Confidence and occlusion
//! come from forward–backward consistency of the raw estimates; then each direction is refined by
//! the other where they agree (symmetric fusion, on by default) and, optionally, by a
//! full-resolution variational refinement. Grey images are made once per frame and kept.
//! (OpenCV's DIS API builds its pyramids inside `calc`, so they cannot be shared between pairs.)

use opencv::core::{Mat, Scalar, Vec2f, CV_32FC2, CV_8UC1};
use opencv::prelude::*;
use opencv::video::DISOpticalFlow;
use serde::{Deserialize, Serialize};

use super::consistency::fb_check;
use super::{FlowEngine, FlowField, PairFlow};
use crate::error::{Error, Result};
use crate::frame::{Frame, RgbImage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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

/// Parameters of the `dis` engine (OpenCV's, plus the temporal prior switch).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisConfig {
    pub preset: DisPreset,
    /// Start each estimate from the constant-velocity prediction of the previous pair.
    pub temporal_prior: bool,
    /// Refine each direction by the other where they agree (see `consistency::fb_check`).
    #[serde(default = "default_true")]
    pub symmetric_fusion: bool,
    /// Fixed-point iterations of a full-resolution variational refinement after fusion
    /// (0 = off). DIS's presets stop at ¼ (ultrafast, fast) or ½ (medium) resolution and
    /// upsample; this refines at every pixel, at a cost of about one extra DIS call.
    #[serde(default)]
    pub refine_iterations: u32,
    /// Overrides of OpenCV's preset values (None = preset's).
    pub finest_scale: Option<i32>,
    pub patch_size: Option<i32>,
    pub patch_stride: Option<i32>,
    pub gradient_descent_iterations: Option<i32>,
    pub variational_refinement_iterations: Option<i32>,
}

impl Default for DisConfig {
    /// `ultrafast`: in the whole pipeline it gave flowvo a lower ATE (0.18–0.44 % of the path vs
    /// 0.24–0.94 % with `fast`) and depth AbsRel (0.007–0.017 vs 0.009–0.028) on four 300-frame
    /// synthetic sequences, at a third of DIS's time; `fast` has the lower flow EPE alone (see
    /// `benches/flow_dis.rs`), so `streamrecon flow` keeps it.
    fn default() -> Self {
        Self {
            preset: DisPreset::Ultrafast,
            temporal_prior: true,
            symmetric_fusion: true,
            refine_iterations: 0,
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

struct Prev {
    index: u64,
    grey: Mat,
    /// Constant-velocity initial flows for the next pair (forward, backward): the pair that ended
    /// at this frame, negated (only with the temporal prior on).
    priors: Option<(Mat, Mat)>,
}

/// The `dis` engine.
pub struct DisEngine {
    config: DisConfig,
    fwd: opencv::core::Ptr<DISOpticalFlow>,
    bwd: opencv::core::Ptr<DISOpticalFlow>,
    /// Full-resolution refiners (forward, backward), when `refine_iterations` > 0.
    refiners: Option<(Refiner, Refiner)>,
    prev: Option<Prev>,
    size: Option<(u32, u32)>,
}

type Refiner = opencv::core::Ptr<opencv::video::VariationalRefinement>;

fn make_refiner(iterations: u32) -> Result<Refiner> {
    let mut r = opencv::video::VariationalRefinement::create()?;
    r.set_fixed_point_iterations(i32::try_from(iterations).unwrap_or(i32::MAX))?;
    Ok(r)
}

fn make_dis(c: &DisConfig) -> Result<opencv::core::Ptr<DISOpticalFlow>> {
    let mut d = DISOpticalFlow::create(c.preset.opencv())?;
    if let Some(v) = c.finest_scale {
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
    Ok(d)
}

/// Luma of an RGB image as an 8-bit OpenCV matrix.
///
/// # Errors
/// OpenCV allocation failure.
pub fn grey_mat(img: &RgbImage) -> Result<Mat> {
    let (w, h) = (img.width() as i32, img.height() as i32);
    let mut m = Mat::new_rows_cols_with_default(h, w, CV_8UC1, Scalar::all(0.0))?;
    let dst = m.data_bytes_mut()?;
    for (d, p) in dst.iter_mut().zip(img.pixels()) {
        *d = ((77 * u32::from(p[0]) + 150 * u32::from(p[1]) + 29 * u32::from(p[2]) + 128) >> 8)
            as u8;
    }
    Ok(m)
}

/// Copies a flow field into a CV_32FC2 matrix.
///
/// # Errors
/// OpenCV allocation failure.
pub fn mat_from_flow(f: &FlowField) -> Result<Mat> {
    scaled_mat_from_flow(f, 1.0)
}

/// `scale` × a flow field, into a CV_32FC2 matrix (−1: the next pair's initial flow).
fn scaled_mat_from_flow(f: &FlowField, scale: f32) -> Result<Mat> {
    let mut m = Mat::new_rows_cols_with_default(
        f.height as i32,
        f.width as i32,
        CV_32FC2,
        Scalar::all(0.0),
    )?;
    let dst = m.data_typed_mut::<Vec2f>()?;
    for (d, s) in dst.iter_mut().zip(f.data.chunks_exact(2)) {
        *d = Vec2f::from([scale * s[0], scale * s[1]]);
    }
    Ok(m)
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
    /// OpenCV cannot create the DIS instances.
    pub fn new(config: DisConfig) -> Result<Self> {
        // OpenCV's own pool (TBB) spins against rayon on small machines; we parallelise ourselves.
        opencv::core::set_num_threads(1)?;
        let refiners = if config.refine_iterations > 0 {
            Some((
                make_refiner(config.refine_iterations)?,
                make_refiner(config.refine_iterations)?,
            ))
        } else {
            None
        };
        Ok(Self {
            fwd: make_dis(&config)?,
            bwd: make_dis(&config)?,
            refiners,
            config,
            prev: None,
            size: None,
        })
    }

    fn calc(
        dis: &mut opencv::core::Ptr<DISOpticalFlow>,
        a: &Mat,
        b: &Mat,
        init: Option<Mat>,
    ) -> Result<FlowField> {
        // DIS starts from the input flow when it has the image's size and type (OpenCV ≥ 4.0).
        let mut flow = init.unwrap_or_default();
        dis.calc(a, b, &mut flow)?;
        flow_from_mat(&flow)
    }

    /// Flow between two grey images, both directions at once (one core each), with optional priors.
    fn pair(
        &mut self,
        a: &Mat,
        b: &Mat,
        priors: Option<(Mat, Mat)>,
    ) -> Result<(FlowField, FlowField)> {
        let (fwd_dis, bwd_dis) = (&mut self.fwd, &mut self.bwd);
        let (fwd_init, bwd_init) = match priors {
            Some((f, b)) => (Some(f), Some(b)),
            None => (None, None),
        };
        let (fwd, bwd) = rayon::join(
            || Self::calc(fwd_dis, a, b, fwd_init),
            || Self::calc(bwd_dis, b, a, bwd_init),
        );
        Ok((fwd?, bwd?))
    }

    /// Full-resolution variational refinement of both directions (one core each).
    fn refine(
        &mut self,
        a: &Mat,
        b: &Mat,
        fwd: FlowField,
        bwd: FlowField,
    ) -> Result<(FlowField, FlowField)> {
        let Some((rf, rb)) = &mut self.refiners else {
            return Ok((fwd, bwd));
        };
        let run = |r: &mut Refiner, x: &Mat, y: &Mat, f: &FlowField| -> Result<FlowField> {
            let mut m = mat_from_flow(f)?;
            r.calc(x, y, &mut m)?;
            flow_from_mat(&m)
        };
        let (fwd, bwd) = rayon::join(|| run(rf, a, b, &fwd), || run(rb, b, a, &bwd));
        Ok((fwd?, bwd?))
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
            self.size = Some(size);
        }
        let grey = grey_mat(&frame.image)?;
        let Some(prev) = self.prev.take() else {
            self.prev = Some(Prev {
                index: frame.index,
                grey,
                priors: None,
            });
            return Ok(Vec::new());
        };
        let (fwd, bwd) = self.pair(&prev.grey, &grey, prev.priors)?;
        // Confidence and occlusion are judged on the raw estimates, before they are refined by
        // each other.
        let fuse = self.config.symmetric_fusion;
        let (f, b) = rayon::join(|| fb_check(&fwd, &bwd, fuse), || fb_check(&bwd, &fwd, fuse));
        let (fwd_conf, fwd_occ, bwd_conf, bwd_occ) = (f.conf, f.occ, b.conf, b.occ);
        let (fwd, bwd) = (f.fused.unwrap_or(fwd), b.fused.unwrap_or(bwd));
        let (fwd, bwd) = self.refine(&prev.grey, &grey, fwd, bwd)?;
        // Constant velocity: this pair's backward flow, negated, predicts the next forward flow,
        // and its forward flow, negated, the next backward flow (both at the same pixel).
        let priors = if self.config.temporal_prior {
            Some((
                scaled_mat_from_flow(&bwd, -1.0)?,
                scaled_mat_from_flow(&fwd, -1.0)?,
            ))
        } else {
            None
        };
        let out = PairFlow {
            from: prev.index,
            to: frame.index,
            fwd,
            bwd,
            fwd_conf,
            bwd_conf,
            fwd_occ,
            bwd_occ,
        };
        self.prev = Some(Prev {
            index: frame.index,
            grey,
            priors,
        });
        Ok(vec![out])
    }

    fn reset(&mut self) {
        self.prev = None;
        self.size = None;
    }
}
