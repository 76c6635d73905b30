//! The pipeline: source → flow → geometry → fusion + sinks, one named thread per heavy stage
//! (`stage/`), joined by bounded channels; this file is the wiring.
//!
//! Live sources drop the oldest pending frame when the flow stage falls behind (latest wins) and
//! count the drops; offline sources block instead and never drop. Setting the stop flag (SIGINT /
//! SIGTERM) stops reading; frames in flight drain through every stage and every output is closed
//! properly. A stage error, or a stage or sink that panics, stops the source the same way, so
//! nothing already produced is lost, and becomes the run's error.

pub mod calibration;
pub mod config;
pub mod fusion;
pub mod loops;
pub mod options;
pub mod sinks;
mod snapshot;
pub mod source;
mod stage;
pub mod summary;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Pose;
use streamrecon_core::stats::peak_rss_mib;
use streamrecon_datasets::formats::depth::{depth_millimetres, surface_millimetres};
use streamrecon_flow::FlowEngine;
use streamrecon_geometry::loop_closure::{Places, Relocaliser};
use streamrecon_geometry::GeometryEngine;

pub use config::{FlowChoice, GeometryChoice, PipelineConfig};
pub use options::RunOptions;
pub use sinks::files::CHECKPOINT_FILE;
pub use sinks::results::{DepthSample, FrameResult, ResultDetail, ResultPose};
pub use sinks::{FrameOutput, RunEnd, Sink, Tick, Waits};
pub use snapshot::{CLOUD_FILE, SNAPSHOT_FILE};
pub use summary::{
    FrameCounts, FrameMemory, MemorySummary, RunCounters, RunOutcome, RunSummary, StabilizeSummary,
    TrajectoryEntry,
};

use fusion::Fusion;
use sinks::files::{FilesSink, IntrinsicsReport, RunOutputs};
use sinks::progress::ProgressSink;
use sinks::rerun::RerunSink;
use sinks::results::{HeldFrames, ResultsSink};
use snapshot::{CloudSaver, PendingSnapshot};
use source::Source;
use stage::{ErrorSlot, GeometryMsg};
use summary::RunTally;

/// How often the sinks hear the stream's rate.
const TICK: Duration = Duration::from_millis(500);

/// Runs a source through the whole pipeline until it ends or `stop` is set, with the engines and
/// sinks `config` names.
///
/// # Errors
/// Setting up the engines, the viewer or the output folder fails. Errors during the run are
/// returned inside [`RunOutcome`] after every output has been written.
pub fn run(source: Source, config: &PipelineConfig, stop: &Arc<AtomicBool>) -> Result<RunOutcome> {
    let flow = config.flow.engine()?;
    let geometry = config.geometry.engine(config.stabilize.as_ref())?;
    run_with(source, config, flow, geometry, Vec::new(), stop)
}

/// [`run`] with engines made by the caller (`config.flow` and `config.geometry` are then only
/// reported) and sinks of its own after the ones `config` names.
///
/// # Errors
/// As [`run`].
pub fn run_with(
    mut source: Source,
    config: &PipelineConfig,
    flow_engine: Box<dyn FlowEngine>,
    mut geo_engine: Box<dyn GeometryEngine>,
    extra_sinks: Vec<Box<dyn Sink>>,
    stop: &Arc<AtomicBool>,
) -> Result<RunOutcome> {
    let started = Instant::now();
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
    let snapshot_slot = Arc::new(Mutex::new(None::<PendingSnapshot>));
    let outputs_report = Arc::new(Mutex::new(None));
    let counters = config.counters.clone().unwrap_or_default();
    let mut sinks: Vec<SinkSlot> = Vec::new();
    let mut files_sink = None;
    if let Some(d) = &config.out_dir {
        let mut o = RunOutputs::create(d, config.depth_every)?;
        // Poses of the frames before a snapshot survive the interruption: from the checkpoint
        // beside the snapshot, whichever folder this run writes to.
        if let (Some(next), Some(snapshot)) = (resumed_next, &config.resume) {
            let from = snapshot
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let kept = o.restore_checkpoint(next, from)?;
            log::info!(
                "{kept} earlier poses restored from the checkpoint in {}",
                from.display()
            );
        }
        files_sink = Some(FilesSink::new(
            o,
            snapshot_slot.clone(),
            resume_from,
            outputs_report.clone(),
        ));
    }
    if let Some(v) = streamrecon_viewer::open(&config.rerun, "streamrecon")? {
        sinks.push(SinkSlot::new(Box::new(RerunSink::new(
            v,
            config.stabilize.is_some(),
            &config.rerun,
        ))));
    }
    if let Some(tx) = &config.results {
        sinks.push(SinkSlot::new(Box::new(ResultsSink::new(
            tx.clone(),
            config.result_detail,
            counters.clone(),
        ))));
    }
    if config.progress {
        sinks.push(SinkSlot::new(Box::new(ProgressSink::new(
            source.len_hint(),
        ))));
    }
    sinks.extend(extra_sinks.into_iter().map(SinkSlot::new));
    // The files last: run.json, written at their end, records how the others ended.
    sinks.extend(files_sink.map(|s| SinkSlot::new(Box::new(s))));
    let keep_flow = sinks.iter().any(|s| s.sink.wants_flow());
    // The map is sampled for the sinks that want it, as often as the most eager asks.
    let map_every = sinks
        .iter()
        .filter_map(|s| s.sink.map_every())
        .filter(|(every, _)| *every > 0)
        .fold(None, |acc: Option<(u64, usize)>, (e, n)| {
            Some(acc.map_or((e, n), |(ae, an)| (ae.min(e), an.max(n))))
        });

    let live = source.is_live();
    let pushed = source.is_pushed();
    let source_name = source.name().to_string();
    let errors = ErrorSlot::default();
    let counts = stage::source::SourceFacts {
        counters: counters.clone(),
        door_counts: pushed,
        ..Default::default()
    };
    let cap = config.channel_capacity.max(1);
    let (tx1, rx1) = bounded(cap);
    let (tx2, rx2) = bounded(cap);
    let (tx3, rx3) = bounded::<GeometryMsg>(cap);
    let gate = stage::Gate::new(config.in_flight);
    let src_thread = stage::source::start(
        source,
        resume_from,
        tx1,
        live.then(|| rx1.clone()),
        counts.clone(),
        gate.clone(),
        stop.clone(),
        errors.clone(),
    )?;
    let primer = geo_engine.take_resume_frame();
    let flow_thread = stage::flow::start(
        flow_engine,
        primer,
        rx1,
        tx2,
        gate.clone(),
        stop.clone(),
        errors.clone(),
    )?;
    // Snapshots are written beside the final file and put in its place by the file sink once
    // every frame before the snapshot's position is in the outputs (see `PendingSnapshot`).
    // The cloud is saved beside each snapshot as it is put in place (`CloudSaver`).
    let mut cloud_saver = config
        .out_dir
        .as_ref()
        .filter(|_| config.snapshot_every > 0)
        .map(|d| CloudSaver::new(d, snapshot_slot.clone()));
    let snapshots = stage::geometry::Snapshots {
        path: config
            .out_dir
            .as_ref()
            .filter(|_| config.snapshot_every > 0)
            .map(|d| PendingSnapshot::path_in(d)),
        every: config.snapshot_every,
        slot: snapshot_slot,
    };
    // Loop closure's place database, shared with the engine to relocalise in.
    let places = match &config.loop_closure {
        Some(cfg) => {
            let places = Places::default();
            geo_engine.relocalise_with(Relocaliser::new(cfg.clone(), places.clone())?);
            Some(places)
        }
        None => None,
    };
    let geometry_thread = stage::geometry::start(
        geo_engine,
        rx2,
        tx3,
        keep_flow,
        resume_from,
        snapshots,
        config.results.as_ref().map(|tx| HeldFrames {
            tx: tx.clone(),
            counters: counters.clone(),
        }),
        gate.clone(),
        stop.clone(),
        errors.clone(),
    )?;

    // Fusion and the sinks on this thread.
    let mut fusion = Fusion::new(config.fusion.clone());
    if let (Some(next), Some(snapshot)) = (resumed_next, &config.resume) {
        snapshot::restore_cloud(&mut fusion, snapshot, next);
    }
    let mut tally = RunTally::default();
    let mut loops = config
        .loop_closure
        .as_ref()
        .zip(places)
        .map(|(cfg, places)| loops::LoopThread::start(cfg, places, !live))
        .transpose()?;
    let mut model_k = None;
    let mut sink_error: Option<Error> = None;
    let mut last_tick = Instant::now();
    let mut frames_since_tick = 0u64;
    for mut r in &rx3 {
        r.clock.waits.sinks = r.clock.waited();
        let t0 = Instant::now();
        let mut wanting = sinks
            .iter()
            .filter(|s| !s.failed && s.sink.wants_flow())
            .count();
        for s in &mut sinks {
            let flow = if s.failed || !s.sink.wants_flow() {
                None
            } else {
                wanting -= 1;
                if wanting == 0 {
                    r.flow_bwd.take()
                } else {
                    r.flow_bwd.clone()
                }
            };
            s.call(&mut sink_error, |sink| {
                sink.prepare(&r.frame, flow);
                Ok(())
            });
        }
        let g = &r.geometry;
        model_k.get_or_insert(g.intrinsics);
        let new_points = fusion.integrate(g, &r.frame.image);
        if let Some(l) = &mut loops {
            l.offer(&r.frame, g);
        }
        let fusion_ms = stage::ms(t0.elapsed());
        let t1 = Instant::now();
        // Depth shown and written only where it is confident (0 = unknown), in millimetres.
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
        let map = map_every
            .filter(|(every, _)| (tally.processed() + 1).is_multiple_of(*every))
            .map(|(_, max)| fusion.sample(max));
        // Before the file sink puts the snapshot in place, in this frame's call.
        let snapshot_due = cloud_saver
            .as_mut()
            .is_some_and(|c| c.save_if_due(&fusion, r.frame.source_index + 1));
        let out = FrameOutput {
            frame: &r.frame,
            geometry: g,
            new_points: &new_points,
            map: map.as_ref(),
            cloud_points: fusion.len(),
            depth_mm: depth_mm.as_deref(),
            min_confidence: config.fusion.min_confidence,
            read_at: r.clock.arrived,
            flow_ms: r.clock.flow_ms,
            geometry_ms: r.clock.geometry_ms,
            fusion_ms,
            waits: r.clock.waits,
            snapshot_due,
        };
        // Counted before the sinks, so the results carry counts that include their frame.
        RunCounters::add(&counters.processed);
        let failed_before = sink_error.is_some();
        for s in &mut sinks {
            s.call(&mut sink_error, |sink| sink.frame(&out));
        }
        if sink_error.is_some() && !failed_before {
            stop.store(true, Ordering::SeqCst);
        }
        tally.add(&out, stage::ms(t1.elapsed()));
        gate.leave(&mut r.clock);
        frames_since_tick += 1;
        let dt = last_tick.elapsed();
        if dt >= TICK {
            let tick = Tick {
                fps: frames_since_tick as f64 / dt.as_secs_f64(),
                frames_processed: tally.processed(),
                frames_dropped: counters.get().dropped(),
                cloud_points: fusion.len(),
            };
            for s in &mut sinks {
                s.call(&mut sink_error, |sink| {
                    sink.tick(&tick);
                    Ok(())
                });
            }
            last_tick = Instant::now();
            frames_since_tick = 0;
        }
    }
    stage::join(src_thread, &errors);
    stage::join(flow_thread, &errors);
    let segments = stage::join(geometry_thread, &errors);
    let mut error = errors.take().or(sink_error);
    let processed = tally.processed();
    if processed == 0 && error.is_none() && !stop.load(Ordering::SeqCst) && !pushed {
        // A source that produced nothing usable is a failure, not an empty success.
        let FrameCounts { read, skipped, .. } = counters.get();
        if resumed_next.is_some() && skipped == 0 {
            log::warn!("the source has no frame after the snapshot's position");
        } else {
            let last = counts.last_skip.lock().ok().and_then(|g| g.clone());
            error = Some(Error::source(
                &source_name,
                format!(
                    "no frame could be processed ({read} read, {skipped} skipped{})",
                    last.map_or(String::new(), |w| format!("; the last: {w}"))
                ),
            ));
        }
    }
    let (corrected, loop_report) = match loops {
        Some(l) => {
            let online: Vec<(u64, u32, Pose)> = tally
                .trajectory
                .iter()
                // The frames the trajectory files hold: placed ones, and a turning camera's
                // orientation-only poses.
                .filter(|t| t.stats.tracked || t.stats.orientation_only)
                .map(|t| (t.index, t.stats.segment, t.world_from_cam))
                .collect();
            let (c, r) = l.finish(&online);
            (c.filter(|c| !c.is_empty()), Some(r))
        }
        None => (None, None),
    };
    let t_cloud = Instant::now();
    let cloud = match &corrected {
        Some(c) => fusion.finished_cloud_moved(&|frame, p| loops::follow(c, frame, p)),
        None => fusion.finished_cloud(),
    };
    log::debug!(
        "final cloud: {} points in {:.0} ms",
        cloud.len(),
        t_cloud.elapsed().as_secs_f64() * 1e3
    );
    let wall = started.elapsed().as_secs_f64();
    let (median_reprojection_px, median_tracked_points) = tally.medians();
    let n = counters.get();
    let summary = RunSummary {
        source: source_name,
        live,
        frames_received: n.received,
        frames_read: n.read,
        frames_processed: processed,
        frames_dropped: n.dropped(),
        frames_dropped_at_door: n.dropped_at_door,
        frames_dropped_inside: n.dropped_inside,
        frames_skipped: n.skipped,
        interrupted: stop.load(Ordering::SeqCst) && error.is_none(),
        wall_s: wall,
        fps: if wall > 0.0 {
            processed as f64 / wall
        } else {
            0.0
        },
        streaming_fps: match (tally.first_read, tally.last_out) {
            (Some(a), Some(b)) if b > a && processed > 1 => {
                processed as f64 / (b - a).as_secs_f64()
            }
            _ => 0.0,
        },
        peak_rss_mib: peak_rss_mib(),
        stages: tally
            .timings
            .iter()
            .map(|(k, v)| (*k, v.summary()))
            .collect(),
        map_segments: segments,
        frames_tracked: tally.trajectory.iter().filter(|t| t.stats.tracked).count() as u64,
        frames_untracked: tally.untracked.values().sum(),
        untracked: std::mem::take(&mut tally.untracked),
        frames_orientation_only: tally
            .trajectory
            .iter()
            .filter(|t| t.stats.orientation_only)
            .count() as u64,
        model_memory: tally.model_memory.take(),
        loop_closure: loop_report,
        stabilization: config.stabilize.as_ref().map(|_| tally.stabilization()),
        points: cloud.len(),
        points_evicted: fusion.evicted(),
        median_reprojection_px,
        median_tracked_points,
        error: error.as_ref().map(ToString::to_string),
        outputs: None,
        config: serde_json::to_value(config).unwrap_or_default(),
    };
    let original = counts.original_k.lock().ok().and_then(|k| *k);
    let report = model_k.map(|m| IntrinsicsReport {
        original: original.map_or(m, |o| o.0),
        model: m,
        origin: original.map_or("default 60° horizontal FoV", |o| o.1),
    });
    if let Some(c) = &mut cloud_saver {
        // The last snapshot is put in place as the file sink finishes.
        c.save_if_due(&fusion, u64::MAX);
    }
    // Every sink closes, the failed ones too: what they hold was written before they failed.
    // Each sees the errors so far (the files, last, write them into run.json).
    let mut summary = summary;
    let mut finish_error = None;
    for s in &mut sinks {
        let end = RunEnd {
            summary: &summary,
            cloud: &cloud,
            intrinsics: report.as_ref(),
            corrected: corrected.as_deref(),
        };
        s.failed = false;
        s.call(&mut finish_error, |sink| sink.finish(&end));
        if summary.error.is_none() {
            summary.error = finish_error.as_ref().map(ToString::to_string);
        }
    }
    summary.outputs = outputs_report.lock().ok().and_then(|mut r| r.take());
    Ok(RunOutcome {
        summary,
        error: error.or(finish_error),
        cloud,
        trajectory: tally.trajectory,
    })
}

/// A sink and whether it has failed.
struct SinkSlot {
    sink: Box<dyn Sink>,
    failed: bool,
}

impl SinkSlot {
    fn new(sink: Box<dyn Sink>) -> Self {
        Self {
            sink,
            failed: false,
        }
    }

    /// Calls the sink unless it has failed; an error or a panic marks it failed and is kept in
    /// `first_error` unless one is there already.
    fn call(
        &mut self,
        first_error: &mut Option<Error>,
        f: impl FnOnce(&mut dyn Sink) -> Result<()>,
    ) {
        if self.failed {
            return;
        }
        let sink = &mut *self.sink;
        let res = catch_unwind(AssertUnwindSafe(|| f(sink))).unwrap_or_else(|payload| {
            Err(Error::Invalid(format!(
                "the {} sink stopped on a bug: {}",
                self.sink.name(),
                stage::panic_message(payload.as_ref())
            )))
        });
        if let Err(e) = res {
            self.failed = true;
            first_error.get_or_insert(e);
        }
    }
}
