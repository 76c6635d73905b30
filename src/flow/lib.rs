//! The flow stage: multi-frame optical flow engines, forward–backward confidence, metrics and
//! visualisation.
//!
//! Engines take frames one at a time and return the pair flows that became available; a pairwise
//! engine answers at once, a windowed model (VideoFlow: 4–5 frames, StreamFlow: T frames) answers
//! when its window fills and may return several pairs per call.

pub mod colorwheel;
pub mod consistency;
pub mod dis;
pub mod inverse_search;
mod learned;
pub mod level;
pub mod metrics;
pub mod refine;
pub mod resize;
pub mod spatial;
pub mod streamflow;
pub mod temporal;
pub mod videoflow;

pub use streamrecon_core::flow_field::TargetCells;
pub use streamrecon_core::flow_field::{bilinear1, bilinear2, FlowField};

use streamrecon_core::error::Result;
use streamrecon_core::frame::Frame;

/// Flow between two neighbouring frames, both directions, with confidence.
#[derive(Debug, Clone)]
pub struct PairFlow {
    /// Index of the earlier frame.
    pub from: u64,
    /// Index of the later frame.
    pub to: u64,
    /// Flow from `from` to `to`, in `from`'s pixels.
    pub fwd: FlowField,
    /// Flow from `to` to `from`, in `to`'s pixels.
    pub bwd: FlowField,
    /// Per-pixel confidence in [0, 1] of `fwd` (forward–backward consistency).
    pub fwd_conf: Vec<f32>,
    /// Per-pixel confidence in [0, 1] of `bwd`.
    pub bwd_conf: Vec<f32>,
    /// Pixels of `from` judged occluded in `to` (or leaving the image).
    pub fwd_occ: Vec<bool>,
    /// Pixels of `to` judged occluded in `from`.
    pub bwd_occ: Vec<bool>,
}

impl PairFlow {
    /// A pair from its two flows, with confidence and occlusion from forward–backward
    /// consistency (both directions computed concurrently).
    pub fn from_flows(from: u64, to: u64, fwd: FlowField, bwd: FlowField) -> Self {
        let ((fwd_conf, fwd_occ), (bwd_conf, bwd_occ)) = rayon::join(
            || consistency::fb_consistency(&fwd, &bwd),
            || consistency::fb_consistency(&bwd, &fwd),
        );
        Self {
            from,
            to,
            fwd,
            bwd,
            fwd_conf,
            bwd_conf,
            fwd_occ,
            bwd_occ,
        }
    }
}

/// A flow engine over a stream of frames.
pub trait FlowEngine: Send {
    fn name(&self) -> &'static str;

    /// Adds the next frame; returns the pair flows now available, oldest first.
    ///
    /// # Errors
    /// A frame of a different size than the stream's first, or an engine failure.
    fn push(&mut self, frame: &Frame) -> Result<Vec<PairFlow>>;

    /// End of stream: returns whatever the engine still holds.
    ///
    /// # Errors
    /// An engine failure.
    fn flush(&mut self) -> Result<Vec<PairFlow>> {
        Ok(Vec::new())
    }

    /// Forgets the stream (a new stream follows).
    fn reset(&mut self);
}
