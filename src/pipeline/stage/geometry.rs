//! The geometry thread: pushes each frame and its flow into the geometry engine, hands the
//! results on with their frames, and writes the engine's snapshots.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use streamrecon_core::error::Result;
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::Frame;
use streamrecon_geometry::{FrameGeometry, GeometryEngine};

use super::{ms, on_pool, spawn, Clock, ErrorSlot, FlowMsg, Gate, GeometryMsg};
use crate::sinks::results::HeldFrames;
use crate::snapshot::{PendingSnapshot, SnapshotSlot};

/// Where and how often the engine's state is saved.
pub(crate) struct Snapshots {
    /// The pending file (`None`: no snapshots).
    pub(crate) path: Option<PathBuf>,
    /// Frames between snapshots (0 = never).
    pub(crate) every: u64,
    pub(crate) slot: SnapshotSlot,
}

/// A frame in the engine: itself, its clock and the backward flow into it (for the sinks).
type Waiting = (Frame, Clock, Option<FlowField>);

/// Starts the geometry thread; it returns the engine's map segment count.
pub(crate) fn start(
    mut engine: Box<dyn GeometryEngine>,
    rx: Receiver<FlowMsg>,
    tx: Sender<GeometryMsg>,
    // Whether a sink shows the flow (else it is dropped here).
    keep_flow: bool,
    resume_from: u64,
    snapshots: Snapshots,
    // Told of each frame the engine holds back, at once.
    held: Option<HeldFrames>,
    gate: Gate,
    stop: Arc<AtomicBool>,
    errors: ErrorSlot,
) -> Result<JoinHandle<u32>> {
    spawn("geometry", move || {
        // The engine's row loops get a pool of their own: on the shared one they queued
        // behind the flow stage's DIS calls (pipeline bench, five alternated runs: geometry
        // stage 33-37 -> 26-31 ms a frame, end-to-end latency 315-380 -> 288-305 ms).
        let geo_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("geometry-{i}"))
            .build()
            .ok();
        let Snapshots {
            path: mut snapshot_path,
            every: snapshot_every,
            slot,
        } = snapshots;
        let mut pushed = 0u64;
        let mut next_source = resume_from;
        // `last`: the end of the stream, after which every result reaches the outputs; before
        // it, a snapshot still waiting for its frames is kept rather than replaced, or a
        // sink that lags by more than the cadence would never see one put in place.
        // Returns whether a snapshot at `next` was written.
        let snapshot = |engine: &dyn GeometryEngine,
                        next: u64,
                        last_frame: Option<&Frame>,
                        path: &mut Option<PathBuf>,
                        last: bool| {
            let Some(p) = path.as_ref() else {
                return false;
            };
            // Held while writing, so the file sink never moves a half-replaced file.
            let Ok(mut slot) = slot.lock() else {
                return false;
            };
            if slot.is_some() && !last {
                log::debug!("snapshot at source frame {next} deferred: the last one is pending");
                return false;
            }
            match engine.snapshot(p, next, last_frame) {
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
        // Frames pushed when the last snapshot was written: one is due every `snapshot_every`
        // frames after it, and a due one deferred (the last still pending) is tried again on
        // the next frame rather than dropped until the next multiple.
        let mut snapshot_pushed = 0u64;
        // The last frame pushed, for the snapshots (kept only when there are any).
        let mut last_frame: Option<Frame> = None;
        // Frames the engine holds back (initialisation), by index.
        let mut waiting: HashMap<u64, Waiting> = HashMap::new();
        let emit =
            |geos: Vec<FrameGeometry>, waiting: &mut HashMap<u64, Waiting>, geo_ms: f64| -> bool {
                for g in geos {
                    let Some((frame, mut clock, flow_bwd)) = waiting.remove(&g.index) else {
                        continue;
                    };
                    clock.geometry_ms = geo_ms;
                    clock.waits.held += clock.waited();
                    clock.hand_on();
                    let r = GeometryMsg {
                        frame,
                        clock,
                        geometry: g,
                        flow_bwd,
                    };
                    if tx.send(r).is_err() {
                        return false;
                    }
                }
                true
            };
        for mut msg in &rx {
            msg.clock.waits.geometry = msg.clock.waited();
            let t0 = Instant::now();
            let res = on_pool(geo_pool.as_ref(), || {
                engine.push(&msg.frame, msg.flow.as_ref())
            });
            let geo_ms = ms(t0.elapsed());
            msg.clock.hand_on();
            next_source = msg.frame.source_index + 1;
            if snapshot_path.is_some() {
                // Without its ground truth: the image is what a resumed flow stage needs.
                last_frame = Some(Frame {
                    gt: None,
                    image: msg.frame.image.clone(),
                    ..msg.frame
                });
            }
            let index = msg.frame.index;
            waiting.insert(
                index,
                (
                    msg.frame,
                    msg.clock,
                    msg.flow.filter(|_| keep_flow).map(|p| p.bwd),
                ),
            );
            match res {
                Ok(geos) => {
                    pushed += 1;
                    if snapshot_every > 0
                        && pushed >= snapshot_pushed + snapshot_every
                        && snapshot(
                            engine.as_ref(),
                            next_source,
                            last_frame.as_ref(),
                            &mut snapshot_path,
                            false,
                        )
                    {
                        snapshot_at = Some(next_source);
                        snapshot_pushed = pushed;
                    }
                    if !emit(geos, &mut waiting, geo_ms) {
                        return engine.segments();
                    }
                    // Held by the engine: its caller hears of the frame now, its pose later, and
                    // it makes way for the frames that will release it.
                    if let Some((frame, clock, _)) = waiting.get_mut(&index) {
                        if let Some(held) = &held {
                            held.notify(frame, clock, geo_ms);
                        }
                        gate.leave(clock);
                    }
                }
                Err(e) => {
                    errors.set(e);
                    stop.store(true, Ordering::SeqCst);
                }
            }
        }
        match engine.flush() {
            Ok(geos) => {
                emit(geos, &mut waiting, 0.0);
            }
            Err(e) => errors.set(e),
        }
        // A final snapshot, so an interrupted run can be continued.
        if snapshot_every > 0 && pushed > 0 && snapshot_at != Some(next_source) {
            snapshot(
                engine.as_ref(),
                next_source,
                last_frame.as_ref(),
                &mut snapshot_path,
                true,
            );
        }
        engine.segments()
    })
}
