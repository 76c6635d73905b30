//! Per-frame results for a caller (the service): the pose, counts, stage times and, as asked,
//! some of the frame's points and a sampled depth map; sent without blocking.

use crossbeam_channel::Sender;
use serde::Serialize;

use streamrecon_core::error::Result;
use streamrecon_core::frame::{Frame, Intrinsics};

use super::{FrameOutput, RunEnd, Sink, Waits};
use crate::stage::{ms, Clock};
use crate::summary::{FrameCounts, RunCounters};

/// The optional parts of a [`FrameResult`].
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ResultDetail {
    /// At most this many of the points a frame added (evenly decimated; 0 = none).
    pub points: usize,
    /// The confident depth map sampled every n-th pixel in both directions (0 = none).
    pub depth_stride: u32,
}

/// A depth map sampled on a grid: row-major, metres, 0 = unknown.
#[derive(Debug, Clone, Serialize)]
pub struct DepthSample {
    pub width: u32,
    pub height: u32,
    /// Pixel step between samples in the frame at model resolution.
    pub stride: u32,
    pub metres: Vec<f32>,
}

/// What a caller is told about each frame: its pose once known, and at once, without the pose,
/// for a frame the engine holds back (`pending`).
#[derive(Debug, Clone, Serialize)]
pub struct FrameResult {
    /// The results' order of making, numbered by their receiver (the service); 0 before.
    pub seq: u64,
    pub index: u64,
    pub timestamp: f64,
    /// The engine holds this frame until it can place it (a map being started): there is no
    /// pose yet, and a later result with the same index carries it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// Absent while `pending`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub pose: Option<ResultPose>,
    /// Milliseconds from the frame's arrival (a pushed frame's upload, else its reading) to
    /// this result.
    pub latency_ms: f64,
    /// Milliseconds each stage spent on this frame.
    pub flow_ms: f64,
    pub geometry_ms: f64,
    pub fusion_ms: f64,
    /// Milliseconds it waited before each stage and inside the engines.
    pub waits_ms: Waits,
    /// The run's frame counts as this result left (a frame with a pose counted as processed).
    pub counts: FrameCounts,
}

/// A placed frame's part of its [`FrameResult`].
#[derive(Debug, Clone, Serialize)]
pub struct ResultPose {
    /// world_from_cam: translation (x, y, z) and rotation quaternion (x, y, z, w).
    pub translation: [f64; 3],
    pub rotation_xyzw: [f64; 4],
    pub intrinsics: Intrinsics,
    /// Points this frame added to the cloud, and the cloud's size after it.
    pub new_points: usize,
    pub cloud_points: usize,
    pub tracked: bool,
    /// Up to [`ResultDetail::points`] world points this frame added, with their colours.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<[f32; 3]>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub colors: Vec<[u8; 3]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthSample>,
}

impl FrameResult {
    /// Drops the points and depth (keeps the pose and counts), freeing their memory.
    pub fn strip_detail(&mut self) {
        if let Some(p) = &mut self.pose {
            p.points = Vec::new();
            p.colors = Vec::new();
            p.depth = None;
        }
    }
}

/// Tells the results' receiver at once of each frame the geometry engine holds back, with a
/// pending [`FrameResult`] (its pose follows in the frame's own result).
#[derive(Clone)]
pub(crate) struct HeldFrames {
    pub(crate) tx: Sender<FrameResult>,
    pub(crate) counters: RunCounters,
}

impl HeldFrames {
    pub(crate) fn notify(&self, frame: &Frame, clock: &Clock, geometry_ms: f64) {
        let _ = self.tx.try_send(FrameResult {
            seq: 0,
            index: frame.index,
            timestamp: frame.timestamp,
            pending: true,
            pose: None,
            latency_ms: clock.latency_ms(),
            flow_ms: clock.flow_ms,
            geometry_ms,
            fusion_ms: 0.0,
            waits_ms: clock.waits,
            counts: self.counters.get(),
        });
    }
}

/// Sends each frame's [`FrameResult`] to a channel; a full channel drops the result.
pub struct ResultsSink {
    tx: Sender<FrameResult>,
    detail: ResultDetail,
    counters: RunCounters,
}

impl ResultsSink {
    pub fn new(tx: Sender<FrameResult>, detail: ResultDetail, counters: RunCounters) -> Self {
        Self {
            tx,
            detail,
            counters,
        }
    }
}

impl Sink for ResultsSink {
    fn name(&self) -> &'static str {
        "results"
    }

    fn frame(&mut self, out: &FrameOutput<'_>) -> Result<()> {
        let g = out.geometry;
        let q = g.world_from_cam.rotation.quaternion();
        let t = g.world_from_cam.translation.vector;
        let detail = self.detail;
        let pts = out.new_points;
        let step = pts.points.len().div_ceil(detail.points.max(1)).max(1);
        let depth = match (g.depth.as_deref(), detail.depth_stride) {
            (Some(d), s) if s > 0 => Some(sample_depth(
                d,
                g.confidence.as_deref(),
                out.min_confidence,
                &g.intrinsics,
                s,
            )),
            _ => None,
        };
        let _ = self.tx.try_send(FrameResult {
            seq: 0,
            index: g.index,
            timestamp: g.timestamp,
            pending: false,
            pose: Some(ResultPose {
                translation: [t.x, t.y, t.z],
                rotation_xyzw: [q.i, q.j, q.k, q.w],
                intrinsics: g.intrinsics,
                new_points: pts.points.len(),
                cloud_points: out.cloud_points,
                tracked: g.stats.tracked,
                points: pts
                    .points
                    .iter()
                    .step_by(step)
                    .take(detail.points)
                    .copied()
                    .collect(),
                colors: pts
                    .colors
                    .iter()
                    .step_by(step)
                    .take(detail.points)
                    .copied()
                    .collect(),
                depth,
            }),
            latency_ms: ms(out.read_at.elapsed()),
            flow_ms: out.flow_ms,
            geometry_ms: out.geometry_ms,
            fusion_ms: out.fusion_ms,
            waits_ms: out.waits,
            counts: self.counters.get(),
        });
        Ok(())
    }

    fn finish(&mut self, _end: &RunEnd<'_>) -> Result<()> {
        Ok(())
    }
}

/// Every `stride`-th pixel of a depth map at the model resolution of `k`; 0 where the
/// confidence, if given, is under `min_confidence`.
fn sample_depth(
    depth: &[f32],
    confidence: Option<&[f32]>,
    min_confidence: f32,
    k: &Intrinsics,
    stride: u32,
) -> DepthSample {
    let (w, h) = (k.width as usize, k.height as usize);
    let s = stride as usize;
    if depth.len() != w * h || confidence.is_some_and(|c| c.len() != w * h) {
        return DepthSample {
            width: 0,
            height: 0,
            stride,
            metres: Vec::new(),
        };
    }
    let metres = (0..h)
        .step_by(s)
        .flat_map(|y| {
            (0..w).step_by(s).map(move |x| {
                let i = y * w + x;
                match confidence {
                    Some(c) if c[i] < min_confidence => 0.0,
                    _ => depth[i],
                }
            })
        })
        .collect();
    DepthSample {
        width: w.div_ceil(s) as u32,
        height: h.div_ceil(s) as u32,
        stride,
        metres,
    }
}
