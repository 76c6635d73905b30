//! The pipeline: source → flow → geometry → fusion + sinks, one named thread per heavy stage,
//! joined by bounded channels.
//!
//! Live sources drop the oldest pending frame when the flow stage falls behind (latest wins) and
//! count the drops; offline sources block instead and never drop. Setting the stop flag (SIGINT /
//! SIGTERM) stops reading; frames in flight drain through every stage and every output is closed
//! properly. A stage error stops the source the same way, so nothing already produced is lost.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde::Serialize;

use crate::cloud::PointCloud;
use crate::datasets::formats::depth::{depth_millimetres, surface_millimetres};
use crate::error::{Error, Result};
use crate::flow::dis::{DisConfig, DisEngine};
use crate::flow::videoflow::{VideoFlowEngine, VideoFlowEngineConfig};
use crate::flow::{FlowEngine, FlowField, PairFlow};
use crate::frame::{Frame, Intrinsics};
use crate::fusion::{Fusion, FusionConfig};
use crate::geometry::flowvo::{FlowVo, FlowVoConfig};
use crate::geometry::stabilize::{StabilizeConfig, StabilizedEngine};
use crate::geometry::vggt::{VggtEngine, VggtEngineConfig};
use crate::geometry::{FrameGeometry, GeometryEngine, GeometryStats, MemoryReadout};
use crate::sinks::files::{IntrinsicsReport, RunOutputs};
use crate::source::{Source, SourceItem};
use crate::stats::{peak_rss_mib, rss_mib, Timing, TimingSummary};
use crate::viewer::{self, paths, FrameLog, RerunTarget, ViewImages};

/// Flow engines.
#[derive(Debug, Clone, Serialize)]
pub enum FlowChoice {
    Dis(DisConfig),
    VideoFlow(VideoFlowEngineConfig),
}

/// Geometry engines.
#[derive(Debug, Clone, Serialize)]
pub enum GeometryChoice {
    FlowVo(FlowVoConfig),
    Vggt(VggtEngineConfig),
}

/// Everything a run needs besides its source.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineConfig {
    pub flow: FlowChoice,
    pub geometry: GeometryChoice,
    pub fusion: FusionConfig,
    pub out_dir: Option<PathBuf>,
    #[serde(skip)]
    pub rerun: RerunTarget,
    /// Write a depth PNG every n-th frame (0 = never).
    pub depth_every: u64,
    /// Frames between stages.
    pub channel_capacity: usize,
    pub progress: bool,
    /// Snapshot the geometry engine's state every n frames into the output folder (0 = never).
    pub snapshot_every: u64,
    /// Restore the geometry engine from this snapshot and skip the frames it has seen.
    pub resume: Option<PathBuf>,
    /// Online trajectory stabilization of the geometry output (`None` = off).
    pub stabilize: Option<StabilizeConfig>,
    /// Per-frame results for a caller (the service); sent without blocking, dropped when full.
    #[serde(skip)]
    pub results: Option<Sender<FrameResult>>,
    /// What each result carries besides the pose.
    pub result_detail: ResultDetail,
}

/// The optional parts of a [`FrameResult`].
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ResultDetail {
    /// At most this many of the points a frame added (evenly decimated; 0 = none).
    pub points: usize,
    /// The confident depth map sampled every n-th pixel in both directions (0 = none).
    pub depth_stride: u32,
}

impl FrameResult {
    /// Drops the points and depth (keeps the pose and counts), freeing their memory.
    pub fn strip_detail(&mut self) {
        self.points = Vec::new();
        self.colors = Vec::new();
        self.depth = None;
    }
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

/// What a caller is told about each processed frame.
#[derive(Debug, Clone, Serialize)]
pub struct FrameResult {
    pub index: u64,
    pub timestamp: f64,
    /// world_from_cam: translation (x, y, z) and rotation quaternion (x, y, z, w).
    pub translation: [f64; 3],
    pub rotation_xyzw: [f64; 4],
    pub intrinsics: crate::frame::Intrinsics,
    /// Points this frame added to the cloud, and the cloud's size after it.
    pub new_points: usize,
    pub cloud_points: usize,
    pub tracked: bool,
    /// Milliseconds from reading the frame to this result.
    pub latency_ms: f64,
    /// Milliseconds each stage spent on this frame.
    pub flow_ms: f64,
    pub geometry_ms: f64,
    pub fusion_ms: f64,
    /// Up to [`ResultDetail::points`] world points this frame added, with their colours.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<[f32; 3]>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub colors: Vec<[u8; 3]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthSample>,
}

/// File name of the engine snapshot in the output folder.
pub const SNAPSHOT_FILE: &str = "snapshot.safetensors";

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            flow: FlowChoice::Dis(DisConfig::default()),
            geometry: GeometryChoice::FlowVo(FlowVoConfig::default()),
            fusion: FusionConfig::default(),
            out_dir: None,
            rerun: RerunTarget::default(),
            depth_every: 1,
            channel_capacity: 4,
            progress: false,
            snapshot_every: 0,
            resume: None,
            result_detail: ResultDetail::default(),
            stabilize: None,
            results: None,
        }
    }
}

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
    pub world_from_cam: crate::frame::Pose,
    pub stats: GeometryStats,
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

struct SourceMsg {
    frame: Frame,
    read_at: Instant,
}

struct FlowMsg {
    frame: Frame,
    read_at: Instant,
    flow: Option<PairFlow>,
    flow_ms: f64,
}

struct Result3 {
    frame: Frame,
    read_at: Instant,
    geometry: FrameGeometry,
    /// The backward flow into this frame, kept for the viewer's colour image (made in the sink
    /// loop, off the geometry thread).
    flow_bwd: Option<FlowField>,
    flow_ms: f64,
    geometry_ms: f64,
}

/// An engine snapshot on disk that is not yet the one a resume reads. The engine writes it when
/// it has taken frames up to `next`, but frames before `next` may still be on their way to the
/// outputs (in channels, or held by a smoother): put in place before they are written and the
/// process killed, a resume would skip frames whose poses no file holds.
struct PendingSnapshot {
    next: u64,
    path: PathBuf,
}

impl PendingSnapshot {
    fn path_in(dir: &Path) -> PathBuf {
        dir.join(format!("{SNAPSHOT_FILE}.pending"))
    }

    /// Once every source frame before the pending snapshot's `next` is in the outputs
    /// (`handled_next` ≥ `next`): writes the trajectory checkpoint, then moves the snapshot into
    /// place, so a snapshot in place never runs ahead of the checkpoint beside it.
    fn commit(slot: &Mutex<Option<Self>>, handled_next: u64, outputs: &RunOutputs) {
        let Ok(mut slot) = slot.lock() else { return };
        let Some(p) = slot.as_ref().filter(|p| p.next <= handled_next) else {
            return;
        };
        let target = p.path.with_file_name(SNAPSHOT_FILE);
        let res = outputs
            .checkpoint()
            .and_then(|()| std::fs::rename(&p.path, &target).map_err(|e| Error::io(&target, e)));
        match res {
            Ok(()) => log::debug!("snapshot at source frame {} in place", p.next),
            // The previous snapshot and checkpoint stay in force.
            Err(e) => log::error!("snapshot at source frame {} not put in place: {e}", p.next),
        }
        *slot = None;
    }
}

/// Runs `f` with its rayon work on `pool`, or on the global pool when there is none.
fn on_pool<R: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

fn make_flow(choice: &FlowChoice) -> Result<Box<dyn FlowEngine>> {
    Ok(match choice {
        FlowChoice::Dis(c) => Box::new(DisEngine::new(c.clone())?),
        FlowChoice::VideoFlow(c) => Box::new(VideoFlowEngine::new(c)?),
    })
}

fn make_geometry(choice: &GeometryChoice) -> Result<Box<dyn GeometryEngine>> {
    Ok(match choice {
        GeometryChoice::FlowVo(c) => Box::new(FlowVo::new(c.clone())),
        GeometryChoice::Vggt(c) => Box::new(VggtEngine::new(c)?),
    })
}

/// Keeps the first error any stage reports.
#[derive(Clone, Default)]
struct ErrorSlot(Arc<Mutex<Option<Error>>>);

impl ErrorSlot {
    fn set(&self, e: Error) {
        if let Ok(mut g) = self.0.lock() {
            g.get_or_insert(e);
        }
    }
    fn take(&self) -> Option<Error> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| Error::Invalid(format!("cannot start thread {name}: {e}")))
}

/// Runs a source through the whole pipeline until it ends or `stop` is set.
///
/// # Errors
/// Setting up the engines, the viewer or the output folder fails. Errors during the run are
/// returned inside [`RunOutcome`] after every output has been written.
pub fn run(
    mut source: Source,
    config: &PipelineConfig,
    stop: &Arc<AtomicBool>,
) -> Result<RunOutcome> {
    let started = Instant::now();
    let mut flow_engine = make_flow(&config.flow)?;
    let mut geo_engine = make_geometry(&config.geometry)?;
    if let Some(s) = &config.stabilize {
        geo_engine = Box::new(StabilizedEngine::new(geo_engine, s.clone()));
    }
    let mut resumed_next = None;
    let resume_from = match &config.resume {
        Some(p) => {
            let next = geo_engine.restore(p)?;
            resumed_next = Some(next);
            log::info!(
                "resumed from {}: continuing at source frame {next}",
                p.display()
            );
            // A live stream starts afresh: its first frame is the next one, numbered on.
            if source.is_live() || source.is_pushed() {
                source.continue_at(next);
                0
            } else {
                next
            }
        }
        None => 0,
    };
    let mut outputs = match &config.out_dir {
        Some(d) => {
            let mut o = RunOutputs::create(d, config.depth_every)?;
            // Poses of the frames before a snapshot survive the interruption.
            if let Some(next) = resumed_next {
                let kept = o.restore_checkpoint(next)?;
                log::info!("{kept} earlier poses restored from the checkpoint");
            }
            Some(o)
        }
        None => None,
    };
    let mut viewer = viewer::open(&config.rerun, "streamrecon")?;
    let want_flow_rgb = viewer.is_some();
    let live = source.is_live();
    let source_name = source.name().to_string();
    let total = source.len_hint();
    let errors = ErrorSlot::default();
    let read = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let cap = config.channel_capacity.max(1);
    let (tx1, rx1): (Sender<SourceMsg>, Receiver<SourceMsg>) = bounded(cap);
    let (tx2, rx2) = bounded::<FlowMsg>(cap);
    let (tx3, rx3) = bounded::<Result3>(cap);
    let original_k = Arc::new(Mutex::new(None::<(Intrinsics, &'static str)>));

    let src_thread = {
        let (stop, errors, read, dropped, skipped, original_k) = (
            stop.clone(),
            errors.clone(),
            read.clone(),
            dropped.clone(),
            skipped.clone(),
            original_k.clone(),
        );
        let rx1_drop = rx1.clone();
        spawn("source", move || {
            while !stop.load(Ordering::SeqCst) {
                let Some(item) = source.next_item() else {
                    break;
                };
                match item {
                    Ok(SourceItem::Frame(frame)) => {
                        // Frames the resumed stream has already seen.
                        if frame.source_index < resume_from {
                            continue;
                        }
                        read.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut k) = original_k.lock() {
                            if k.is_none() {
                                *k = source
                                    .original_intrinsics()
                                    .map(|i| (i, source.intrinsics_origin()));
                            }
                        }
                        let mut msg = SourceMsg {
                            frame: *frame,
                            read_at: Instant::now(),
                        };
                        if live {
                            // Latest wins: make room by discarding the oldest pending frame.
                            loop {
                                match tx1.try_send(msg) {
                                    Ok(()) => break,
                                    Err(TrySendError::Full(m)) => {
                                        if rx1_drop.try_recv().is_ok() {
                                            dropped.fetch_add(1, Ordering::Relaxed);
                                        }
                                        msg = m;
                                    }
                                    Err(TrySendError::Disconnected(_)) => return,
                                }
                            }
                        } else if tx1.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(SourceItem::Skipped { what }) => {
                        log::warn!("skipped a corrupt frame: {what}");
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.set(e);
                        break;
                    }
                }
            }
        })?
    };

    let flow_thread = {
        let (errors, stop) = (errors.clone(), stop.clone());
        spawn("flow", move || {
            // Frames waiting for their incoming pair (t−1, t): windowed engines answer a few
            // frames late. Frames leave in order.
            let mut pending: VecDeque<FlowMsg> = VecDeque::new();
            let mut first: Option<u64> = None;
            let attach = |pending: &mut VecDeque<FlowMsg>, pairs: Vec<PairFlow>| {
                for p in pairs {
                    if let Some(m) = pending.iter_mut().find(|m| m.frame.index == p.to) {
                        m.flow = Some(p);
                    }
                }
            };
            let send_ready = |pending: &mut VecDeque<FlowMsg>, first: Option<u64>, all: bool| {
                while let Some(front) = pending.front() {
                    let ready = all || front.flow.is_some() || Some(front.frame.index) == first;
                    if !ready {
                        break;
                    }
                    let Some(m) = pending.pop_front() else { break };
                    if tx2.send(m).is_err() {
                        return false;
                    }
                }
                true
            };
            for msg in &rx1 {
                first.get_or_insert(msg.frame.index);
                let t0 = Instant::now();
                match flow_engine.push(&msg.frame) {
                    Ok(pairs) => {
                        pending.push_back(FlowMsg {
                            frame: msg.frame,
                            read_at: msg.read_at,
                            flow: None,
                            flow_ms: t0.elapsed().as_secs_f64() * 1e3,
                        });
                        attach(&mut pending, pairs);
                        if !send_ready(&mut pending, first, false) {
                            return;
                        }
                    }
                    Err(e) => {
                        errors.set(e);
                        stop.store(true, Ordering::SeqCst);
                        // Keep draining so the source thread can finish.
                    }
                }
            }
            match flow_engine.flush() {
                Ok(pairs) => attach(&mut pending, pairs),
                Err(e) => errors.set(e),
            }
            send_ready(&mut pending, first, true);
        })?
    };

    // Snapshots are written beside the final file and put in its place by the sink loop once
    // every frame before the snapshot's position is in the outputs (see `PendingSnapshot`).
    let snapshot_path = config
        .out_dir
        .as_ref()
        .filter(|_| config.snapshot_every > 0)
        .map(|d| PendingSnapshot::path_in(d));
    let pending_snapshot = Arc::new(Mutex::new(None::<PendingSnapshot>));
    let snapshot_every = config.snapshot_every;
    let geometry_thread = {
        let (errors, stop) = (errors.clone(), stop.clone());
        let pending_snapshot = pending_snapshot.clone();
        spawn("geometry", move || {
            // The engine's row loops get a pool of their own: on the shared one they queued
            // behind the flow stage's DIS calls (pipeline bench, five alternated runs: geometry
            // stage 33-37 -> 26-31 ms a frame, end-to-end latency 315-380 -> 288-305 ms).
            let geo_pool = rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .thread_name(|i| format!("geometry-{i}"))
                .build()
                .ok();
            let mut pushed = 0u64;
            let mut next_source = resume_from;
            let mut snapshot_path = snapshot_path;
            // `last`: the end of the stream, after which every result reaches the outputs; before
            // it, a snapshot still waiting for its frames is kept rather than replaced, or a
            // sink that lags by more than the cadence would never see one put in place.
            // Returns whether a snapshot at `next` was written.
            let snapshot = |engine: &dyn GeometryEngine,
                            next: u64,
                            path: &mut Option<PathBuf>,
                            last: bool| {
                let Some(p) = path.as_ref() else {
                    return false;
                };
                // Held while writing, so the sink loop never moves a half-replaced file.
                let Ok(mut slot) = pending_snapshot.lock() else {
                    return false;
                };
                if slot.is_some() && !last {
                    log::debug!("snapshot at source frame {next} skipped: the last one is pending");
                    return false;
                }
                match engine.snapshot(p, next) {
                    Ok(true) => {
                        log::debug!("snapshot at source frame {next}: {}", p.display());
                        *slot = Some(PendingSnapshot {
                            next,
                            path: p.clone(),
                        });
                        return true;
                    }
                    Ok(false) => {
                        log::warn!("the {} engine has no state to snapshot", engine.name());
                        *path = None;
                    }
                    Err(e) => {
                        log::error!("snapshot failed: {e}");
                        errors.set(e);
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                false
            };
            let mut snapshot_at = None;
            // Frames the engine holds back (initialisation), by index.
            let mut waiting: HashMap<u64, (Frame, Instant, Option<FlowField>, f64)> =
                HashMap::new();
            let emit =
                |geos: Vec<FrameGeometry>, waiting: &mut HashMap<u64, _>, geo_ms: f64| -> bool {
                    for g in geos {
                        let Some((frame, read_at, flow_bwd, flow_ms)) = waiting.remove(&g.index)
                        else {
                            continue;
                        };
                        let r = Result3 {
                            frame,
                            read_at,
                            geometry: g,
                            flow_bwd,
                            flow_ms,
                            geometry_ms: geo_ms,
                        };
                        if tx3.send(r).is_err() {
                            return false;
                        }
                    }
                    true
                };
            for msg in &rx2 {
                let t0 = Instant::now();
                let res = on_pool(geo_pool.as_ref(), || {
                    geo_engine.push(&msg.frame, msg.flow.as_ref())
                });
                let geo_ms = t0.elapsed().as_secs_f64() * 1e3;
                next_source = msg.frame.source_index + 1;
                waiting.insert(
                    msg.frame.index,
                    (
                        msg.frame,
                        msg.read_at,
                        msg.flow.filter(|_| want_flow_rgb).map(|p| p.bwd),
                        msg.flow_ms,
                    ),
                );
                match res {
                    Ok(geos) => {
                        pushed += 1;
                        if snapshot_every > 0
                            && pushed.is_multiple_of(snapshot_every)
                            && snapshot(geo_engine.as_ref(), next_source, &mut snapshot_path, false)
                        {
                            snapshot_at = Some(next_source);
                        }
                        if !emit(geos, &mut waiting, geo_ms) {
                            return geo_engine.segments();
                        }
                    }
                    Err(e) => {
                        errors.set(e);
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }
            match geo_engine.flush() {
                Ok(geos) => {
                    emit(geos, &mut waiting, 0.0);
                }
                Err(e) => errors.set(e),
            }
            // A final snapshot, so an interrupted run can be continued.
            if snapshot_every > 0 && pushed > 0 && snapshot_at != Some(next_source) {
                snapshot(geo_engine.as_ref(), next_source, &mut snapshot_path, true);
            }
            geo_engine.segments()
        })?
    };

    // Fusion and sinks on this thread.
    let mut fusion = Fusion::new(config.fusion.clone());
    let mut timings: HashMap<&'static str, Timing> = HashMap::new();
    let mut trajectory = Vec::new();
    let mut processed = 0u64;
    let mut model_k = None;
    let mut model_memory: Option<MemorySummary> = None;
    let mut reproj: Vec<f64> = Vec::new();
    let mut tracked_counts: Vec<usize> = Vec::new();
    let progress = config.progress.then(|| make_progress(total));
    let mut sink_error: Option<Error> = None;
    let mut last_tick = Instant::now();
    let mut frames_since_tick = 0u64;
    // Source frames before this one have reached the outputs.
    let mut handled_next = resume_from;
    // The viewer's images (flow colours, JPEG) are made on a one-thread pool of their own,
    // while this thread fuses: on the shared rayon pool the colour rows queued behind the flow
    // stage's DIS calls, and the sink stage took 30 ms a frame instead of 18 (pipeline bench).
    let image_pool = viewer.as_ref().and_then(|_| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "viewer-images".into())
            .build()
            .ok()
    });
    // The first frame read and the moment the last one left the sinks (`streaming_fps`).
    let (mut first_read, mut last_out): (Option<Instant>, Option<Instant>) = (None, None);
    for mut r in &rx3 {
        let t0 = Instant::now();
        // (Not once the sinks have failed: nothing would log them.)
        let images = viewer.as_ref().filter(|_| sink_error.is_none()).map(|_| {
            let (image, flow) = (r.frame.image.clone(), r.flow_bwd.take());
            let (tx, rx) = bounded(1);
            let job = move || {
                let _ = tx.send(ViewImages::encode(&image, flow.as_ref()));
            };
            match image_pool.as_ref() {
                Some(pool) => pool.spawn(job),
                None => job(),
            }
            rx
        });
        let g = &r.geometry;
        model_k.get_or_insert(g.intrinsics);
        let pts = fusion.integrate(g, &r.frame.image);
        let fusion_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        // Depth shown and written only where it is confident (0 = unknown), in millimetres,
        // converted once for the viewer and the files.
        let depth_mm: Option<Vec<u16>> = match (&g.depth, &g.confidence) {
            (Some(d), Some(c)) => Some(
                d.iter()
                    .zip(c)
                    .map(|(&d, &c)| {
                        if c >= config.fusion.min_confidence {
                            surface_millimetres(d)
                        } else {
                            0
                        }
                    })
                    .collect(),
            ),
            (Some(d), None) => Some(depth_millimetres(d)),
            _ => None,
        };
        if sink_error.is_none() {
            let images = images.map(|rx| {
                rx.recv()
                    .unwrap_or_else(|_| Err(Error::Rerun("viewer image thread stopped".into())))
            });
            let images = match images {
                Some(Ok(i)) => Some(i),
                Some(Err(e)) => {
                    sink_error = Some(e);
                    None
                }
                None => None,
            };
            if let (Some(v), Some(images)) = (viewer.as_mut(), images) {
                // Decimate what the viewer gets per frame.
                let step = (pts.points.len() / 20_000).max(1);
                let p: Vec<[f32; 3]> = pts.points.iter().step_by(step).copied().collect();
                let c: Vec<[u8; 3]> = pts.colors.iter().step_by(step).copied().collect();
                let log = FrameLog {
                    index: g.index,
                    timestamp: g.timestamp,
                    cam_from_world: g.cam_from_world(),
                    intrinsics: &g.intrinsics,
                    images: &images,
                    depth_mm: depth_mm.as_deref(),
                    points: &p,
                    colors: &c,
                };
                let res = v.log_frame(&log).and_then(|()| {
                    let lat = r.read_at.elapsed().as_secs_f64() * 1e3;
                    v.log_scalar(paths::PLOT_LATENCY, lat)?;
                    v.log_scalar(paths::PLOT_MEMORY, rss_mib())?;
                    v.log_scalar(paths::PLOT_TRACKED, g.stats.tracked_points as f64)
                });
                if let Err(e) = res {
                    sink_error = Some(e);
                }
            }
            if let Some(o) = outputs.as_mut() {
                let depth = depth_mm.as_deref().map(|d| (d, &g.intrinsics));
                if let Err(e) = o.add_frame(g.index, g.timestamp, g.world_from_cam, depth) {
                    sink_error = Some(e);
                }
                handled_next = handled_next.max(r.frame.source_index + 1);
                PendingSnapshot::commit(&pending_snapshot, handled_next, o);
            }
            if sink_error.is_some() {
                stop.store(true, Ordering::SeqCst);
            }
        }
        let sink_ms = t1.elapsed().as_secs_f64() * 1e3;
        first_read.get_or_insert(r.read_at);
        last_out = Some(Instant::now());
        timings.entry("flow").or_default().add(r.flow_ms);
        timings.entry("geometry").or_default().add(r.geometry_ms);
        timings.entry("fusion").or_default().add(fusion_ms);
        timings.entry("sinks").or_default().add(sink_ms);
        timings
            .entry("end_to_end")
            .or_default()
            .add(r.read_at.elapsed().as_secs_f64() * 1e3);
        if let Some(e) = g.stats.reprojection_median_px {
            reproj.push(e);
        }
        if g.stats.tracked {
            tracked_counts.push(g.stats.tracked_points);
        }
        if let Some(m) = &g.memory {
            let tokens: usize = m.tokens_per_layer.iter().sum();
            let ms = model_memory.get_or_insert_with(MemorySummary::default);
            ms.per_frame.push(FrameMemory {
                index: g.index,
                tokens,
                bytes: m.bytes,
                model_ms: m.model_ms,
                novelty: m.novelty,
                admitted: m.admitted,
            });
            ms.peak_bytes = ms.peak_bytes.max(m.bytes);
            ms.frames_admitted += u64::from(m.admitted);
            ms.last = m.clone();
            if let Some(v) = viewer.as_ref() {
                let _ = v.log_scalar(paths::PLOT_KV_TOKENS, tokens as f64);
                let _ = v.log_scalar(paths::PLOT_KV_MIB, m.bytes as f64 / f64::from(1 << 20));
                let _ = v.log_scalar(paths::PLOT_MODEL_MS, m.model_ms);
                if let Some(w) = m.novelty {
                    let _ = v.log_scalar(paths::PLOT_NOVELTY, w);
                    let _ = v.log_scalar(paths::PLOT_ADMITTED, f64::from(u8::from(m.admitted)));
                }
            }
        }
        if let Some(tx) = &config.results {
            let q = g.world_from_cam.rotation.quaternion();
            let t = g.world_from_cam.translation.vector;
            let detail = config.result_detail;
            let step = pts.points.len().div_ceil(detail.points.max(1)).max(1);
            let depth = match (g.depth.as_deref(), detail.depth_stride) {
                (Some(d), s) if s > 0 => Some(sample_depth(
                    d,
                    g.confidence.as_deref(),
                    config.fusion.min_confidence,
                    &g.intrinsics,
                    s,
                )),
                _ => None,
            };
            let _ = tx.try_send(FrameResult {
                index: g.index,
                timestamp: g.timestamp,
                translation: [t.x, t.y, t.z],
                rotation_xyzw: [q.i, q.j, q.k, q.w],
                intrinsics: g.intrinsics,
                new_points: pts.points.len(),
                cloud_points: fusion.len(),
                tracked: g.stats.tracked,
                latency_ms: r.read_at.elapsed().as_secs_f64() * 1e3,
                flow_ms: r.flow_ms,
                geometry_ms: r.geometry_ms,
                fusion_ms,
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
            });
        }
        if config.stabilize.is_some() {
            if let Some(v) = viewer.as_ref() {
                let _ = v.log_scalar(
                    paths::PLOT_STABILIZE_MM,
                    g.stats.stabilize_translation * 1e3,
                );
                let _ = v.log_scalar(paths::PLOT_STABILIZE_DEG, g.stats.stabilize_rotation_deg);
            }
        }
        trajectory.push(TrajectoryEntry {
            index: g.index,
            source_index: r.frame.source_index,
            timestamp: g.timestamp,
            world_from_cam: g.world_from_cam,
            stats: g.stats,
        });
        processed += 1;
        frames_since_tick += 1;
        let dt = last_tick.elapsed();
        if dt >= Duration::from_millis(500) {
            let fps = frames_since_tick as f64 / dt.as_secs_f64();
            if let Some(v) = viewer.as_ref() {
                let _ = v.log_scalar(paths::PLOT_FPS, fps);
            }
            if let Some(p) = &progress {
                p.set_message(format!(
                    "{fps:.1} fps, {:.0} MiB, {} points, dropped {}",
                    rss_mib(),
                    fusion.len(),
                    dropped.load(Ordering::Relaxed)
                ));
            }
            last_tick = Instant::now();
            frames_since_tick = 0;
        }
        if let Some(p) = &progress {
            p.set_position(processed);
        }
    }
    let _ = src_thread.join();
    let _ = flow_thread.join();
    let segments = geometry_thread.join().unwrap_or(0);
    // Every result the engine made has been through the sinks: the last snapshot can take over.
    if let Some(o) = outputs.as_mut() {
        PendingSnapshot::commit(&pending_snapshot, u64::MAX, o);
    }
    if let Some(p) = &progress {
        p.finish_and_clear();
    }
    let stage_error = errors.take();
    let error = stage_error.or(sink_error);
    let t_cloud = Instant::now();
    let cloud = fusion.finished_cloud();
    log::debug!(
        "final cloud: {} points in {:.0} ms",
        cloud.len(),
        t_cloud.elapsed().as_secs_f64() * 1e3
    );
    let wall = started.elapsed().as_secs_f64();
    let median = |v: &mut Vec<f64>| {
        if v.is_empty() {
            None
        } else {
            v.sort_by(f64::total_cmp);
            Some(v[v.len() / 2])
        }
    };
    tracked_counts.sort_unstable();
    let summary = RunSummary {
        source: source_name,
        live,
        frames_read: read.load(Ordering::Relaxed),
        frames_processed: processed,
        frames_dropped: dropped.load(Ordering::Relaxed),
        frames_skipped: skipped.load(Ordering::Relaxed),
        interrupted: stop.load(Ordering::SeqCst) && error.is_none(),
        wall_s: wall,
        fps: if wall > 0.0 {
            processed as f64 / wall
        } else {
            0.0
        },
        streaming_fps: match (first_read, last_out) {
            (Some(a), Some(b)) if b > a && processed > 1 => {
                processed as f64 / (b - a).as_secs_f64()
            }
            _ => 0.0,
        },
        peak_rss_mib: peak_rss_mib(),
        stages: timings.iter().map(|(k, v)| (*k, v.summary())).collect(),
        map_segments: segments,
        frames_tracked: trajectory.iter().filter(|t| t.stats.tracked).count() as u64,
        model_memory,
        stabilization: config.stabilize.as_ref().map(|_| {
            let n = trajectory.len().max(1) as f64;
            let mut s = StabilizeSummary::default();
            for t in &trajectory {
                s.mean_translation += t.stats.stabilize_translation / n;
                s.mean_rotation_deg += t.stats.stabilize_rotation_deg / n;
                s.max_translation = s.max_translation.max(t.stats.stabilize_translation);
                s.max_rotation_deg = s.max_rotation_deg.max(t.stats.stabilize_rotation_deg);
            }
            s
        }),
        points: cloud.len(),
        points_evicted: fusion.evicted(),
        median_reprojection_px: median(&mut reproj),
        median_tracked_points: tracked_counts.get(tracked_counts.len() / 2).copied(),
        error: error.as_ref().map(ToString::to_string),
        config: serde_json::to_value(config).unwrap_or_default(),
    };
    let mut finish_error = None;
    if let Some(v) = viewer.as_mut() {
        if let Err(e) = v.finish() {
            finish_error = Some(e);
        }
    }
    if let Some(o) = &outputs {
        let original = original_k.lock().ok().and_then(|k| *k);
        let report = model_k.map(|m| IntrinsicsReport {
            original: original.map_or(m, |o| o.0),
            model: m,
            origin: original.map_or("default 60° horizontal FoV", |o| o.1),
        });
        if let Err(e) = o.finish(&cloud, report.as_ref(), &summary) {
            finish_error.get_or_insert(e);
        }
    }
    Ok(RunOutcome {
        summary,
        error: error.or(finish_error),
        cloud,
        trajectory,
    })
}

fn make_progress(total: Option<usize>) -> indicatif::ProgressBar {
    let pb = match total {
        Some(n) => indicatif::ProgressBar::new(n as u64).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} frames  eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} frames  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        ),
    };
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}
