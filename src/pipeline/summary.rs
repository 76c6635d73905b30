//! The run summary (`run.json`): counts, stage timings, tracking and memory facts, gathered
//! frame by frame.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::Error;
use streamrecon_core::frame::Pose;
use streamrecon_core::stats::{Timing, TimingSummary};
use streamrecon_geometry::{GeometryStats, MemoryReadout};

use crate::sinks::files::OutputsReport;
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

/// A run's frame counts, owned by the pipeline and shared with whoever watches the run live (the
/// service's status and metrics); `run.json` has their final values. At the end of a run,
/// `received = processed + dropped_at_door + dropped_inside + skipped`. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct RunCounters(Arc<Counters>);

/// The counts behind [`RunCounters`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames that arrived: at the service's door for pushed sources, else from the source
    /// (decodable or not; frames a resumed run has already seen are not counted).
    pub received: AtomicU64,
    /// Refused room at the door (a pushed live session's queue was full; counted by the door).
    pub dropped_at_door: AtomicU64,
    /// Decoded frames taken into the pipeline.
    pub read: AtomicU64,
    /// Taken in, then dropped because the flow stage was behind (live sources).
    pub dropped_inside: AtomicU64,
    /// Undecodable frames passed over.
    pub skipped: AtomicU64,
    /// Through every stage and sink.
    pub processed: AtomicU64,
}

impl std::ops::Deref for RunCounters {
    type Target = Counters;

    fn deref(&self) -> &Counters {
        &self.0
    }
}

/// One reading of [`RunCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FrameCounts {
    pub received: u64,
    pub dropped_at_door: u64,
    pub read: u64,
    pub dropped_inside: u64,
    pub skipped: u64,
    pub processed: u64,
}

impl FrameCounts {
    /// Dropped anywhere.
    pub fn dropped(&self) -> u64 {
        self.dropped_at_door + self.dropped_inside
    }
}

impl RunCounters {
    pub fn get(&self) -> FrameCounts {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FrameCounts {
            received: v(&self.received),
            dropped_at_door: v(&self.dropped_at_door),
            read: v(&self.read),
            dropped_inside: v(&self.dropped_inside),
            skipped: v(&self.skipped),
            processed: v(&self.processed),
        }
    }

    pub(crate) fn add(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts and timings of a finished run (the body of `run.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub source: String,
    pub live: bool,
    /// See [`RunCounters`].
    pub frames_received: u64,
    pub frames_read: u64,
    pub frames_processed: u64,
    /// At the door and inside.
    pub frames_dropped: u64,
    pub frames_dropped_at_door: u64,
    pub frames_dropped_inside: u64,
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
    /// Frames without a tracked pose (not in the trajectory files), by why.
    pub frames_untracked: u64,
    pub untracked: BTreeMap<&'static str, u64>,
    /// Of the untracked frames, those with an orientation-only pose (a camera that only
    /// turned), which the trajectory files do hold.
    pub frames_orientation_only: u64,
    /// Trajectory stabilization corrections (when on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stabilization: Option<StabilizeSummary>,
    /// What loop closure found and did (`--loop-closure` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loop_closure: Option<crate::loops::LoopReport>,
    /// Model memory per frame (engines with a memory: `vggt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_memory: Option<MemorySummary>,
    pub points: usize,
    pub points_evicted: u64,
    pub median_reprojection_px: Option<f64>,
    pub median_tracked_points: Option<usize>,
    pub error: Option<String>,
    /// What the end of the run wrote to the output folder (set by the file outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<OutputsReport>,
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
    /// Frames without a tracked pose, by why.
    pub(crate) untracked: BTreeMap<&'static str, u64>,
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
            ("end_to_end", crate::stage::ms(out.read_at.elapsed())),
            ("wait_door", out.waits.door),
            ("wait_flow", out.waits.flow),
            ("wait_geometry", out.waits.geometry),
            ("wait_sinks", out.waits.sinks),
            ("held", out.waits.held),
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
        if !g.stats.tracked {
            let why = g.stats.untracked_reason.unwrap_or("no tracked pose");
            *self.untracked.entry(why).or_default() += 1;
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
