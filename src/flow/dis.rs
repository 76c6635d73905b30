//! Engine `dis`: OpenCV's DIS optical flow made multi-frame.
//!
//! For each new frame t, forward flow (t−1 → t) and backward flow (t → t−1) are computed by DIS,
//! concurrently (one core each; OpenCV's own thread pool is switched off because it spins against
//! rayon). With the temporal prior on (the default), both start from a constant-velocity
//! prediction: the previous pair's flows at the same pixel, negated. (OpenCV uses an initial flow
//! only at its coarsest scale, so the prior matters for large motions.) Confidence and occlusion
//! come from forward–backward consistency. Grey images are made once per frame and kept.
//! (OpenCV's DIS API builds its pyramids inside `calc`, so they cannot be shared between pairs.)

use opencv::core::{Mat, Scalar, Vec2f, CV_32FC2, CV_8UC1};
use opencv::prelude::*;
use opencv::video::DISOpticalFlow;
use serde::{Deserialize, Serialize};

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
    /// Overrides of OpenCV's preset values (None = preset's).
    pub finest_scale: Option<i32>,
    pub patch_size: Option<i32>,
    pub patch_stride: Option<i32>,
    pub gradient_descent_iterations: Option<i32>,
    pub variational_refinement_iterations: Option<i32>,
}

impl Default for DisConfig {
    fn default() -> Self {
        Self {
            preset: DisPreset::Fast,
            temporal_prior: true,
            finest_scale: None,
            patch_size: None,
            patch_stride: None,
            gradient_descent_iterations: None,
            variational_refinement_iterations: None,
        }
    }
}

struct Prev {
    index: u64,
    grey: Mat,
    /// Constant-velocity initial flows for the next pair (forward, backward): the pair that ended
    /// at this frame, negated (only with the temporal prior on).
    priors: Option<(FlowField, FlowField)>,
}

/// The `dis` engine.
pub struct DisEngine {
    config: DisConfig,
    fwd: opencv::core::Ptr<DISOpticalFlow>,
    bwd: opencv::core::Ptr<DISOpticalFlow>,
    prev: Option<Prev>,
    size: Option<(u32, u32)>,
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
    let mut m = Mat::new_rows_cols_with_default(
        f.height as i32,
        f.width as i32,
        CV_32FC2,
        Scalar::all(0.0),
    )?;
    let dst = m.data_typed_mut::<Vec2f>()?;
    for (d, s) in dst.iter_mut().zip(f.data.chunks_exact(2)) {
        *d = Vec2f::from([s[0], s[1]]);
    }
    Ok(m)
}

/// Copies a CV_32FC2 matrix into a flow field.
///
/// # Errors
/// The matrix is not CV_32FC2.
pub fn flow_from_mat(m: &Mat) -> Result<FlowField> {
    let (w, h) = (m.cols() as usize, m.rows() as usize);
    let src = m.data_typed::<Vec2f>()?;
    let mut data = Vec::with_capacity(w * h * 2);
    for v in src {
        data.push(v[0]);
        data.push(v[1]);
    }
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
        Ok(Self {
            fwd: make_dis(&config)?,
            bwd: make_dis(&config)?,
            config,
            prev: None,
            size: None,
        })
    }

    fn calc(
        dis: &mut opencv::core::Ptr<DISOpticalFlow>,
        a: &Mat,
        b: &Mat,
        init: Option<&FlowField>,
    ) -> Result<FlowField> {
        // DIS starts from the input flow when it has the image's size and type (OpenCV ≥ 4.0).
        let mut flow = match init {
            Some(f) => mat_from_flow(f)?,
            None => Mat::default(),
        };
        dis.calc(a, b, &mut flow)?;
        flow_from_mat(&flow)
    }

    /// Flow between two grey images, both directions at once (one core each), with optional priors.
    fn pair(
        &mut self,
        a: &Mat,
        b: &Mat,
        fwd_init: Option<&FlowField>,
        bwd_init: Option<&FlowField>,
    ) -> Result<(FlowField, FlowField)> {
        let (fwd_dis, bwd_dis) = (&mut self.fwd, &mut self.bwd);
        let (fwd, bwd) = rayon::join(
            || Self::calc(fwd_dis, a, b, fwd_init),
            || Self::calc(bwd_dis, b, a, bwd_init),
        );
        Ok((fwd?, bwd?))
    }
}

fn negated(f: &FlowField) -> FlowField {
    FlowField {
        width: f.width,
        height: f.height,
        data: f.data.iter().map(|v| -v).collect(),
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
        let (fwd_prior, bwd_prior) = match &prev.priors {
            Some((f, b)) => (Some(f), Some(b)),
            None => (None, None),
        };
        let (fwd, bwd) = self.pair(&prev.grey, &grey, fwd_prior, bwd_prior)?;
        // Constant velocity: this pair's backward flow, negated, predicts the next forward flow,
        // and its forward flow, negated, the next backward flow (both at the same pixel).
        let priors = self
            .config
            .temporal_prior
            .then(|| (negated(&bwd), negated(&fwd)));
        let out = PairFlow::from_flows(prev.index, frame.index, fwd, bwd);
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
