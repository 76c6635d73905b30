//! The run summary (`run.json`): counts, stage timings, tracking and memory facts, gathered
//! frame by frame.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::Error;
use streamrecon_core::frame::Pose;
use streamrecon_core::stats::{Timing, TimingSummary};
use streamrecon_geometry::{GeometryStats, MemoryReadout};

use crate::sinks::FrameOutput;

/// The model memory over a run: per frame, and the last frame's full read-out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemorySummary {
    pub per_frame: Vec<FrameMemory>,
    pub peak_bytes: usize,
    pub frames_admitted: u64,
    pub last: MemoryReadout,
}

/// How much stabilization moved the poses over a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StabilizeSummary {
    pub mean_translation: f64,
    pub max_translation: f64,
    pub mean_rotation_deg: f64,
    pub max_rotation_deg: f64,
}

/// One frame's memory facts in `run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct FrameMemory {
    pub index: u64,
    /// Cached tokens over all global layers.
    pub tokens: usize,
    pub bytes: usize,
    pub model_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub novelty: Option<f64>,
    pub admitted: bool,
}

/// Counts and timings of a finished run (the body of `run.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub source: String,
    pub live: bool,
    pub frames_read: u64,
    pub frames_processed: u64,
    pub frames_dropped: u64,
    pub frames_skipped: u64,
    pub interrupted: bool,
    pub wall_s: f64,
    /// Frames processed over `wall_s` (start-up and the final cloud included).
    pub fps: f64,
    /// Frames processed a second while streaming: from the first frame read to the last one
    /// through the sinks. What an endless stream sustains; `fps` also counts the one-off costs
    /// (the final cloud's outlier removal and normals: 0.5 s for 226 k points).
    pub streaming_fps: f64,
    pub peak_rss_mib: f64,
    pub stages: HashMap<&'static str, TimingSummary>,
    pub map_segments: u32,
    pub frames_tracked: u64,
    /// Trajectory stabilization corrections (when on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stabilization: Option<StabilizeSummary>,
    /// Model memory per frame (engines with a memory: `vggt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_memory: Option<MemorySummary>,
    pub points: usize,
    pub points_evicted: u64,
    pub median_reprojection_px: Option<f64>,
    pub median_tracked_points: Option<usize>,
    pub error: Option<String>,
    pub config: serde_json::Value,
}

/// The outcome of a run: the summary always, the stage error if one stopped it.
pub struct RunOutcome {
    pub summary: RunSummary,
    pub error: Option<Error>,
    /// The world cloud as written to `points.ply`.
    pub cloud: PointCloud,
    /// Per-frame (index, source index, timestamp, world_from_cam, stats), in order.
    pub trajectory: Vec<TrajectoryEntry>,
}

#[derive(Debug, Clone, Copy)]
pub struct TrajectoryEntry {
    pub index: u64,
    pub source_index: u64,
    pub timestamp: f64,
    pub world_from_cam: Pose,
    pub stats: GeometryStats,
}

/// What the run summary is made from, gathered as frames leave the sinks.
#[derive(Default)]
pub(crate) struct RunTally {
    pub(crate) timings: HashMap<&'static str, Timing>,
    pub(crate) trajectory: Vec<TrajectoryEntry>,
    pub(crate) model_memory: Option<MemorySummary>,
    reprojection: Vec<f64>,
    tracked_points: Vec<usize>,
    /// The first frame read and the moment the last one left the sinks (`streaming_fps`).
    pub(crate) first_read: Option<Instant>,
    pub(crate) last_out: Option<Instant>,
}

impl RunTally {
    /// Counts a frame that has been through every sink, which took `sink_ms`.
    pub(crate) fn add(&mut self, out: &FrameOutput<'_>, sink_ms: f64) {
        let g = out.geometry;
        self.first_read.get_or_insert(out.read_at);
        self.last_out = Some(Instant::now());
        for (stage, ms) in [
            ("flow", out.flow_ms),
            ("geometry", out.geometry_ms),
            ("fusion", out.fusion_ms),
            ("sinks", sink_ms),
            ("end_to_end", out.read_at.elapsed().as_secs_f64() * 1e3),
        ] {
            self.timings.entry(stage).or_default().add(ms);
        }
        if let Some(e) = g.stats.reprojection_median_px {
            self.reprojection.push(e);
        }
        if g.stats.tracked {
            self.tracked_points.push(g.stats.tracked_points);
        }
        if let Some(m) = &g.memory {
            let ms = self.model_memory.get_or_insert_with(MemorySummary::default);
            ms.per_frame.push(FrameMemory {
                index: g.index,
                tokens: m.tokens_per_layer.iter().sum(),
                bytes: m.bytes,
                model_ms: m.model_ms,
                novelty: m.novelty,
                admitted: m.admitted,
            });
            ms.peak_bytes = ms.peak_bytes.max(m.bytes);
            ms.frames_admitted += u64::from(m.admitted);
            ms.last = m.clone();
        }
        self.trajectory.push(TrajectoryEntry {
            index: g.index,
            source_index: out.frame.source_index,
            timestamp: g.timestamp,
            world_from_cam: g.world_from_cam,
            stats: g.stats,
        });
    }

    pub(crate) fn processed(&self) -> u64 {
        self.trajectory.len() as u64
    }

    /// The median reprojection error and tracked point count over the run.
    pub(crate) fn medians(&mut self) -> (Option<f64>, Option<usize>) {
        self.reprojection.sort_by(f64::total_cmp);
        self.tracked_points.sort_unstable();
        (
            self.reprojection.get(self.reprojection.len() / 2).copied(),
            self.tracked_points
                .get(self.tracked_points.len() / 2)
                .copied(),
        )
    }

    /// How much stabilization moved the poses.
    pub(crate) fn stabilization(&self) -> StabilizeSummary {
        let n = self.trajectory.len().max(1) as f64;
        let mut s = StabilizeSummary::default();
        for t in &self.trajectory {
            s.mean_translation += t.stats.stabilize_translation / n;
            s.mean_rotation_deg += t.stats.stabilize_rotation_deg / n;
            s.max_translation = s.max_translation.max(t.stats.stabilize_translation);
            s.max_rotation_deg = s.max_rotation_deg.max(t.stats.stabilize_rotation_deg);
        }
        s
    }
}
