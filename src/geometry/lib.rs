//! The geometry stage: per-frame camera pose, intrinsics, depth and confidence.
//!
//! Engines: `flowvo` (classical monocular VO driven by the flow stage, no weights) and `vggt`
//! (the learned StreamVGGT/InfiniteVGGT model); both fill the same [`FrameGeometry`] contract.

mod cv;
pub mod flowvo;
pub mod loop_closure;
pub mod novelty;
pub mod stabilize;
pub mod triangulate;
pub mod vggt;
pub mod window_ba;

use serde::Serialize;

use streamrecon_core::error::Result;
use streamrecon_core::frame::{Frame, Intrinsics, Pose};
use streamrecon_flow::PairFlow;

/// What a geometry engine says about one frame.
#[derive(Debug, Clone)]
pub struct FrameGeometry {
    pub index: u64,
    pub timestamp: f64,
    pub world_from_cam: Pose,
    /// Intrinsics at the resolution the engine worked at (= the frame's here).
    pub intrinsics: Intrinsics,
    /// Depth (camera z, engine units), row-major at `intrinsics` size, 0 = unknown.
    pub depth: Option<Vec<f32>>,
    /// Per-pixel confidence in [0, 1] of `depth`.
    pub confidence: Option<Vec<f32>>,
    pub stats: GeometryStats,
    /// State held by engines with a model memory (`vggt`).
    pub memory: Option<MemoryReadout>,
}

/// What a model's memory holds after a frame, and what the frame cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReadout {
    /// Cached tokens per global-attention layer.
    pub tokens_per_layer: Vec<usize>,
    /// Cached entries per camera-head layer.
    pub camera_entries: usize,
    /// Bytes of valid K/V entries.
    pub bytes: usize,
    /// Bytes allocated for the caches.
    pub allocated_bytes: usize,
    /// Per-layer token budgets used for the frame (empty without pruning).
    pub budgets: Vec<i64>,
    /// Model time for the frame, milliseconds.
    pub model_ms: f64,
    /// Novelty weight w_t (adaptive memory updates only).
    pub novelty: Option<f64>,
    /// Whether the frame entered the memory.
    pub admitted: bool,
}

/// Per-frame tracking facts, reported in `run.json` and rerun plots.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GeometryStats {
    /// Whether the pose comes from tracking (false: carried over while tracking was lost).
    pub tracked: bool,
    pub keyframe: bool,
    /// Map segment: increments at every re-initialisation.
    pub segment: u32,
    /// 3D points used for the pose.
    pub tracked_points: usize,
    /// Median reprojection error of the pose's inliers, pixels.
    pub reprojection_median_px: Option<f64>,
    /// Trajectory stabilization: how far the filtered pose moved from the raw one (world units,
    /// degrees); 0 without stabilization.
    pub stabilize_translation: f64,
    pub stabilize_rotation_deg: f64,
    /// Untracked, but the pose's orientation is known (a camera that only turns, before it has
    /// a map): written with the segment's position, in the trajectory files.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub orientation_only: bool,
    /// Why a frame has no tracked pose (one of [`untracked`]'s reasons), when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untracked_reason: Option<&'static str>,
    /// On the frame a relocalisation placed in an earlier map after tracking loss: that map's
    /// segment (this frame's `segment` continues it from here on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejoined: Option<u32>,
}

/// Why frames have no tracked pose: what the engine saw while it waited for a map.
pub mod untracked {
    pub const STATIC: &str = "static camera: too little motion to start a map";
    pub const ROTATION: &str = "rotation only: the camera turns without moving sideways";
    pub const TEXTURE: &str = "too little texture to track";
    pub const GEOMETRY: &str = "the views do not fit one rigid scene (moving objects, noise)";
    pub const GAP: &str = "no flow into the frame (a gap in the stream)";
    pub const LOST: &str = "too few of the map's points seen to place the frame";
    pub const ENDED: &str = "the stream ended before a map could start";
}

impl GeometryStats {
    /// Whether the frame's pose is worth writing: tracked, or an orientation-only one.
    pub fn has_pose(&self) -> bool {
        self.tracked || self.orientation_only
    }
}

impl FrameGeometry {
    pub fn cam_from_world(&self) -> Pose {
        self.world_from_cam.inverse()
    }
}

/// A geometry engine over a stream of frames and their flows.
pub trait GeometryEngine: Send {
    fn name(&self) -> &'static str;

    /// Adds frame t and the flow pair (t−1, t) when there is one; returns the frames whose geometry
    /// is now known, oldest first (an engine may hold frames back while it initialises).
    ///
    /// # Errors
    /// An engine failure (tracking loss is not an error: it is reported in [`GeometryStats`]).
    fn push(&mut self, frame: &Frame, flow: Option<&PairFlow>) -> Result<Vec<FrameGeometry>>;

    /// End of stream: the frames still held back.
    ///
    /// # Errors
    /// An engine failure.
    fn flush(&mut self) -> Result<Vec<FrameGeometry>>;

    /// Number of maps so far: map segments started (re-initialisations + 1), those a
    /// relocalisation rejoined to an earlier one counted with it.
    fn segments(&self) -> u32;

    /// Gives the engine the loop closure's place database, to relocalise in after tracking
    /// loss. Engines that cannot use it ignore it.
    fn relocalise_with(&mut self, relocaliser: loop_closure::Relocaliser) {
        let _ = relocaliser;
    }

    /// Writes the engine's whole stream state to `path` (atomically); `Ok(false)` when the
    /// engine has no snapshot support. `next_source_index` is stored for resuming;
    /// `last_frame`, the last frame pushed, is kept by engines that track along the flow, for
    /// [`GeometryEngine::take_resume_frame`].
    ///
    /// # Errors
    /// The file cannot be written.
    fn snapshot(
        &self,
        path: &std::path::Path,
        next_source_index: u64,
        last_frame: Option<&Frame>,
    ) -> Result<bool> {
        let _ = (path, next_source_index, last_frame);
        Ok(false)
    }

    /// After [`GeometryEngine::restore`]: the last frame the snapshot's engine saw, for the flow
    /// stage to see first, so that the first resumed frame's flow links to it (engines that
    /// track along the flow need that link to continue their map).
    fn take_resume_frame(&mut self) -> Option<Frame> {
        None
    }

    /// Restores a state written by [`GeometryEngine::snapshot`]; returns the source index to
    /// continue from.
    ///
    /// # Errors
    /// Unreadable or foreign snapshot, or an engine without snapshot support.
    fn restore(&mut self, path: &std::path::Path) -> Result<u64> {
        Err(streamrecon_core::error::Error::Geometry(format!(
            "the {} engine cannot resume from a snapshot ({})",
            self.name(),
            path.display()
        )))
    }
}

/// The frame number an engine snapshot continues at (`None`: not a readable snapshot). Every
/// engine's snapshot is a safetensors file with a `meta.json` byte tensor whose `owner` holds
/// `next_source_index`.
pub fn snapshot_next_frame(path: &std::path::Path) -> Option<u64> {
    read_snapshot_meta(path).ok()?["owner"]["next_source_index"].as_u64()
}

/// [`snapshot_next_frame`] of a snapshot already read into memory (`path` names it in errors).
pub fn snapshot_next_frame_in(bytes: &[u8], path: &std::path::Path) -> Option<u64> {
    parse_snapshot(bytes, path).ok()?.0["owner"]["next_source_index"].as_u64()
}

/// The `meta.json` of a snapshot file.
fn read_snapshot_meta(path: &std::path::Path) -> Result<serde_json::Value> {
    read_snapshot(path).map(|(meta, _)| meta)
}

/// A snapshot file's `meta.json` and its other tensors.
fn read_snapshot(
    path: &std::path::Path,
) -> Result<(
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
)> {
    let bytes = std::fs::read(path).map_err(|e| streamrecon_core::error::Error::io(path, e))?;
    parse_snapshot(&bytes, path)
}

/// A snapshot's `meta.json` and its other tensors, from its bytes.
fn parse_snapshot(
    bytes: &[u8],
    path: &std::path::Path,
) -> Result<(
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
)> {
    use streamrecon_core::error::Error;
    let mut tensors = candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu)
        .map_err(|e| Error::format(path, format!("snapshot: {e}")))?;
    let meta: Vec<u8> = tensors
        .remove("meta.json")
        .ok_or_else(|| Error::format(path, "snapshot without meta.json"))?
        .to_vec1()
        .map_err(|e| Error::format(path, format!("snapshot: {e}")))?;
    let meta =
        serde_json::from_slice(&meta).map_err(|e| Error::format(path, format!("snapshot: {e}")))?;
    Ok((meta, tensors))
}

/// Writes a snapshot: `meta` as the `meta.json` byte tensor beside `tensors`.
fn write_snapshot(
    path: &std::path::Path,
    meta: &serde_json::Value,
    mut tensors: std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let json = serde_json::to_vec(meta)
        .map_err(|e| streamrecon_core::error::Error::Geometry(e.to_string()))?;
    let n = json.len();
    let t = candle_core::Tensor::from_vec(json, n, &candle_core::Device::Cpu)
        .map_err(|e| streamrecon_core::error::Error::Geometry(e.to_string()))?;
    tensors.insert("meta.json".to_string(), t);
    streamrecon_models::weights::save_tensors_atomic(&tensors, path)
}
