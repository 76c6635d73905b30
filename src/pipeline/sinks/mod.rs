//! The sinks: where each processed frame goes — files, the rerun recording, the service's
//! results, the progress bar. The pipeline hands every sink the same [`FrameOutput`] and does no
//! sink's work itself.

pub mod files;
pub mod progress;
pub mod rerun;
pub mod results;

use std::time::Instant;

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::Result;
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::Frame;
use streamrecon_geometry::FrameGeometry;

use crate::fusion::FramePoints;
use crate::summary::RunSummary;
use files::IntrinsicsReport;

/// One processed frame, as every sink sees it.
pub struct FrameOutput<'a> {
    pub frame: &'a Frame,
    pub geometry: &'a FrameGeometry,
    /// The points this frame added to the world cloud.
    pub new_points: &'a FramePoints,
    /// The world cloud's size after this frame.
    pub cloud_points: usize,
    /// Confident depth in millimetres at the geometry's resolution, 0 = unknown (converted once
    /// for every sink).
    pub depth_mm: Option<&'a [u16]>,
    /// Depth pixels under this confidence are not shown or written.
    pub min_confidence: f32,
    /// When the frame arrived: a pushed frame's upload, any other frame's reading.
    pub read_at: Instant,
    /// A decimated view of the whole fused map, on the frames a sink asked for it
    /// ([`Sink::map_every`]).
    pub map: Option<&'a FramePoints>,
    /// Milliseconds each stage spent on this frame.
    pub flow_ms: f64,
    pub geometry_ms: f64,
    pub fusion_ms: f64,
    /// Milliseconds the frame waited before each stage and inside the engines.
    pub waits: Waits,
    /// The file sink puts a snapshot in place in this frame's turn (sinks before it have
    /// what they wrote on disk first, so it goes with the snapshot).
    pub snapshot_due: bool,
}

/// Where a frame waited on its way through the pipeline, milliseconds. With the stages' own
/// times they make up its latency.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Waits {
    /// At the door: from a pushed frame's upload to the pipeline's reading it (0 for frames
    /// the pipeline reads itself).
    pub door: f64,
    /// Before the flow stage took it.
    pub flow: f64,
    /// Before the geometry stage took it.
    pub geometry: f64,
    /// Before fusion and the sinks took it.
    pub sinks: f64,
    /// Inside the engines: waiting for the frames after it (a learned flow's window, a map
    /// being started).
    pub held: f64,
}

/// The stream's rate, about twice a second.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// Frames a second since the last tick.
    pub fps: f64,
    pub frames_processed: u64,
    pub frames_dropped: u64,
    pub cloud_points: usize,
}

/// The end of a run, as the sinks close.
pub struct RunEnd<'a> {
    pub summary: &'a RunSummary,
    /// The final world cloud (outliers removed, normals).
    pub cloud: &'a PointCloud,
    pub intrinsics: Option<&'a IntrinsicsReport>,
    /// The trajectory after loop closure's pose graph, when it ran and found loops.
    pub corrected: Option<&'a [streamrecon_geometry::loop_closure::Corrected]>,
}

/// Somewhere processed frames go. Sinks run on the pipeline's own thread, in the order given;
/// a sink that fails or panics stops the run's source (frames in flight still reach the other
/// sinks), is not called again until [`Sink::finish`], and its error becomes the run's.
pub trait Sink: Send {
    fn name(&self) -> &'static str;

    /// Whether the sink wants the backward flow into each frame ([`Sink::prepare`]).
    fn wants_flow(&self) -> bool {
        false
    }

    /// How often the sink wants a view of the whole map in [`FrameOutput::map`]: every this
    /// many frames, at most this many points; `None`: never.
    fn map_every(&self) -> Option<(u64, usize)> {
        None
    }

    /// Called as a frame arrives, before it is fused: work that needs no fusion result can start
    /// here and run while the frame is fused.
    fn prepare(&mut self, _frame: &Frame, _flow_bwd: Option<FlowField>) {}

    /// One processed frame.
    ///
    /// # Errors
    /// The sink cannot take the frame (a file that cannot be written, a viewer gone).
    fn frame(&mut self, out: &FrameOutput<'_>) -> Result<()>;

    /// The stream's rate, about twice a second.
    fn tick(&mut self, _tick: &Tick) {}

    /// The run is over: write and close whatever the sink holds.
    ///
    /// # Errors
    /// What the sink holds cannot be written.
    fn finish(&mut self, end: &RunEnd<'_>) -> Result<()>;
}
