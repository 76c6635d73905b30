//! Loop closure beside the stream (`--loop-closure`): keyframes go to a thread of their own
//! ("loops", at the lowest priority) through a bounded channel. In a live run place
//! recognition never delays a frame (a keyframe that finds the thread busy is skipped and
//! counted); an offline or lossless run waits for it instead, so its loops and relocalisations
//! do not depend on the machine's load; at the end of the run the pose graph
//! corrects the trajectory ([`streamrecon_geometry::loop_closure`]). The thread's place
//! database is shared with the geometry engine, which relocalises in it after tracking loss.

use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};
use serde::Serialize;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{pose_to_array, Frame, Intrinsics, Pose, RgbImage};
use streamrecon_geometry::loop_closure::{Corrected, LoopCloser, LoopClosureConfig, Places};
use streamrecon_geometry::FrameGeometry;

/// What loop closure did (run.json's `loop_closure`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoopReport {
    pub keyframes: u64,
    /// Keyframes not looked at because the thread was still busy with an earlier one (live
    /// runs only).
    pub keyframes_skipped: u64,
    pub loop_closures: usize,
    /// The run's map segments among the keyframes once loops and relocalisations join them (a
    /// chain of loops makes one segment of several).
    pub segments_after_loops: usize,
    /// Frames the engine placed in an earlier map after tracking loss.
    pub relocalisations: usize,
    /// The loops found: (older frame, newer frame, PnP inliers, the measured older_from_newer
    /// as [tx, ty, tz, qx, qy, qz, qw, scale]: the newer camera in the older one's, in the
    /// older map's units).
    pub loops: Vec<(u64, u64, usize, [f64; 8])>,
    /// Whether the trajectory files hold the pose graph's corrected poses.
    pub corrected: bool,
}

struct KeyframeIn {
    index: u64,
    segment: u32,
    image: RgbImage,
    world_from_cam: Pose,
    intrinsics: Intrinsics,
    depth: Option<Vec<f32>>,
    /// Relocalisations since the last keyframe sent: (segment, earlier segment).
    rejoined: Vec<(u32, u32)>,
}

pub(crate) struct LoopThread {
    tx: Option<Sender<KeyframeIn>>,
    handle: JoinHandle<Result<LoopCloser>>,
    every: u64,
    /// Whether a keyframe waits for the thread rather than being skipped (runs that drop no
    /// frame).
    wait: bool,
    placed: u64,
    report: LoopReport,
    /// (segment, earlier segment) of each relocalisation.
    rejoined: Vec<(u32, u32)>,
    /// How many of `rejoined` the thread has been sent.
    rejoined_sent: usize,
}

impl LoopThread {
    /// A loop-closure thread keeping its keyframes in `places`.
    ///
    /// # Errors
    /// The thread or the feature detector cannot be made.
    pub(crate) fn start(cfg: &LoopClosureConfig, places: Places, wait: bool) -> Result<Self> {
        let mut closer = LoopCloser::new(cfg.clone(), places)?;
        let (tx, rx) = bounded::<KeyframeIn>(2);
        let handle = std::thread::Builder::new()
            .name("loops".into())
            .spawn(move || {
                // Background work: the stream's stages go first on a busy machine.
                if let Err(e) = thread_priority::set_current_thread_priority(
                    thread_priority::ThreadPriority::Min,
                ) {
                    log::debug!("loops thread keeps its priority: {e:?}");
                }
                for k in rx {
                    for &(segment, earlier) in &k.rejoined {
                        closer.rejoin(segment, earlier);
                    }
                    if let Some(e) = closer.observe(
                        k.index,
                        k.segment,
                        &k.image,
                        &k.world_from_cam,
                        &k.intrinsics,
                        k.depth.as_deref(),
                    )? {
                        log::info!(
                            "loop: frame {} sees frame {} again ({} inliers, scale {:.3})",
                            e.newer,
                            e.older,
                            e.inliers,
                            e.older_from_newer.scaling()
                        );
                    }
                }
                Ok(closer)
            })
            .map_err(|e| Error::Invalid(format!("cannot start the loop-closure thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            handle,
            every: cfg.keyframe_every.max(1),
            wait,
            placed: 0,
            report: LoopReport::default(),
            rejoined: Vec::new(),
            rejoined_sent: 0,
        })
    }

    /// A processed frame: every `keyframe_every`-th one the engine placed goes to the thread.
    pub(crate) fn offer(&mut self, frame: &Frame, g: &FrameGeometry) {
        if !g.stats.tracked {
            return;
        }
        if let Some(earlier) = g.stats.rejoined {
            self.rejoined.push((g.stats.segment, earlier));
        }
        self.placed += 1;
        if !(self.placed - 1).is_multiple_of(self.every) {
            return;
        }
        let Some(tx) = &self.tx else { return };
        let k = KeyframeIn {
            index: g.index,
            segment: g.stats.segment,
            image: frame.image.clone(),
            world_from_cam: g.world_from_cam,
            intrinsics: g.intrinsics,
            depth: g.depth.clone(),
            rejoined: self.rejoined[self.rejoined_sent..].to_vec(),
        };
        let sent = if self.wait {
            tx.send(k)
                .map_err(|e| TrySendError::Disconnected(e.into_inner()))
        } else {
            tx.try_send(k)
        };
        match sent {
            Ok(()) => {
                self.report.keyframes += 1;
                self.rejoined_sent = self.rejoined.len();
            }
            Err(TrySendError::Full(_)) => self.report.keyframes_skipped += 1,
            // The thread ended on an error; `finish` reports it.
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
    }

    /// Waits for the thread and corrects `online` (frame index, map segment, world_from_cam, in
    /// order) when loops were found.
    pub(crate) fn finish(
        mut self,
        online: &[(u64, u32, Pose)],
    ) -> (Option<Vec<Corrected>>, LoopReport) {
        self.tx = None;
        let mut report = self.report;
        let mut closer = match self.handle.join() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                log::warn!("loop closure stopped: {e}");
                return (None, report);
            }
            Err(_) => {
                log::warn!("loop closure panicked; the online trajectory stands");
                return (None, report);
            }
        };
        report.loop_closures = closer.loops().len();
        // The relocalisations after the last keyframe sent.
        for &(segment, earlier) in &self.rejoined[self.rejoined_sent..] {
            closer.rejoin(segment, earlier);
        }
        report.segments_after_loops = closer.segments_after_loops();
        report.relocalisations = self.rejoined.len();
        report.loops = closer
            .loops()
            .iter()
            .map(|e| {
                let [tx, ty, tz, qx, qy, qz, qw] = pose_to_array(&e.older_from_newer.isometry);
                let m = [tx, ty, tz, qx, qy, qz, qw, e.older_from_newer.scaling()];
                (e.older, e.newer, e.inliers, m)
            })
            .collect();
        let corrected = closer.correct(online);
        report.corrected = corrected.is_some();
        (corrected, report)
    }
}

/// Where a point of the online map goes after loop closure: moved by the correction of the last
/// frame that saw it (`frame`, wrapped to 32 bits as the fusion keeps it), or of the first
/// corrected frame before it. `corrected` is in frame order and not empty.
pub(crate) fn follow(corrected: &[Corrected], frame: u32, p: [f32; 3]) -> [f32; 3] {
    let at = corrected
        .partition_point(|f| f.index <= u64::from(frame))
        .max(1)
        - 1;
    let x = corrected[at]
        .correction
        .transform_point(&nalgebra::Point3::new(p[0], p[1], p[2]).cast::<f64>());
    [x.x as f32, x.y as f32, x.z as f32]
}
