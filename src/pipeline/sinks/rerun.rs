//! The rerun recording: when and what of each frame is logged (how it is logged is the viewer
//! crate's).

use crossbeam_channel::{bounded, Receiver};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::Frame;
use streamrecon_core::stats::rss_mib;
use streamrecon_viewer::{paths, FrameLog, RerunTarget, ViewImages, Viewer, MAP_EVERY, MAP_POINTS};

use super::{FrameOutput, RunEnd, Sink, Tick};

/// Most points of a frame the viewer gets (evenly decimated).
const POINTS_PER_FRAME: usize = 20_000;

/// Logs each frame — camera, images, depth, new points — and the run's plots to a recording.
pub struct RerunSink {
    viewer: Viewer,
    /// The viewer's images (flow colours, JPEG) are made on a one-thread pool of their own,
    /// while the pipeline fuses: on the shared rayon pool the colour rows queued behind the flow
    /// stage's DIS calls, and the sink stage took 30 ms a frame instead of 18 (pipeline bench).
    image_pool: Option<rayon::ThreadPool>,
    /// The frame being prepared's images.
    images: Option<Receiver<Result<ViewImages>>>,
    /// Plot the stabilizer's corrections.
    stabilize: bool,
    /// Log the map every this many frames (0: only the final one), at most this many points.
    map_every: u64,
    map_points: usize,
}

impl RerunSink {
    /// A sink logging to `viewer`; `stabilize`: the run's poses are stabilized (plot how much).
    pub fn new(viewer: Viewer, stabilize: bool, target: &RerunTarget) -> Self {
        let image_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "viewer-images".into())
            .build()
            .ok();
        Self {
            viewer,
            image_pool,
            images: None,
            stabilize,
            map_every: target.map_every.unwrap_or(MAP_EVERY),
            map_points: target.map_points.unwrap_or(MAP_POINTS).max(1),
        }
    }

    fn log_scalars(&self, out: &FrameOutput<'_>) {
        let v = &self.viewer;
        let g = out.geometry;
        if let Some(m) = &g.memory {
            let tokens: usize = m.tokens_per_layer.iter().sum();
            let _ = v.log_scalar(paths::PLOT_KV_TOKENS, tokens as f64);
            let _ = v.log_scalar(paths::PLOT_KV_MIB, m.bytes as f64 / f64::from(1 << 20));
            let _ = v.log_scalar(paths::PLOT_MODEL_MS, m.model_ms);
            if let Some(w) = m.novelty {
                let _ = v.log_scalar(paths::PLOT_NOVELTY, w);
                let _ = v.log_scalar(paths::PLOT_ADMITTED, f64::from(u8::from(m.admitted)));
            }
        }
        if self.stabilize {
            let _ = v.log_scalar(
                paths::PLOT_STABILIZE_MM,
                g.stats.stabilize_translation * 1e3,
            );
            let _ = v.log_scalar(paths::PLOT_STABILIZE_DEG, g.stats.stabilize_rotation_deg);
        }
    }
}

impl Sink for RerunSink {
    fn name(&self) -> &'static str {
        "rerun"
    }

    fn wants_flow(&self) -> bool {
        true
    }

    fn map_every(&self) -> Option<(u64, usize)> {
        (self.map_every > 0).then_some((self.map_every, self.map_points))
    }

    fn prepare(&mut self, frame: &Frame, flow_bwd: Option<FlowField>) {
        let image = frame.image.clone();
        let (tx, rx) = bounded(1);
        let job = move || {
            let _ = tx.send(ViewImages::encode(&image, flow_bwd.as_ref()));
        };
        match self.image_pool.as_ref() {
            Some(pool) => pool.spawn(job),
            None => job(),
        }
        self.images = Some(rx);
    }

    fn frame(&mut self, out: &FrameOutput<'_>) -> Result<()> {
        let images = match self.images.take() {
            Some(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(Error::Rerun("viewer image thread stopped".into())))?,
            None => ViewImages::encode(&out.frame.image, None)?,
        };
        let g = out.geometry;
        let pts = out.new_points;
        let step = (pts.points.len() / POINTS_PER_FRAME).max(1);
        let (p, c) = (every(&pts.points, step), every(&pts.colors, step));
        let log = FrameLog {
            index: g.index,
            timestamp: g.timestamp,
            cam_from_world: g.stats.has_pose().then(|| g.cam_from_world()),
            intrinsics: &g.intrinsics,
            images: &images,
            depth_mm: out.depth_mm,
            points: &p,
            colors: &c,
        };
        let v = &mut self.viewer;
        v.log_frame(&log)?;
        v.log_scalar(
            paths::PLOT_LATENCY,
            out.read_at.elapsed().as_secs_f64() * 1e3,
        )?;
        v.log_scalar(paths::PLOT_MEMORY, rss_mib())?;
        v.log_scalar(paths::PLOT_TRACKED, g.stats.tracked_points as f64)?;
        if let Some(m) = out.map {
            v.log_map(&m.points, &m.colors, None)?;
        }
        self.log_scalars(out);
        if out.snapshot_due {
            // The recording up to the snapshot is on disk when the snapshot is: a NATS worker
            // stores both, and a resumed session's recording goes on from there.
            self.viewer.flush()?;
        }
        Ok(())
    }

    fn tick(&mut self, t: &Tick) {
        let _ = self.viewer.log_scalar(paths::PLOT_FPS, t.fps);
    }

    fn finish(&mut self, end: &RunEnd<'_>) -> Result<()> {
        // The final cleaned cloud, with its normals, replaces the live map.
        let c = end.cloud;
        if !c.points.is_empty() {
            let step = c.points.len().div_ceil(self.map_points).max(1);
            let colors = c
                .colors
                .as_deref()
                .map_or_else(Vec::new, |v| every(v, step));
            let normals = c.normals.as_deref().map(|v| every(v, step));
            self.viewer
                .log_map(&every(&c.points, step), &colors, normals.as_deref())?;
        }
        if let Some(frames) = end.corrected {
            let centres: Vec<[f32; 3]> = frames
                .iter()
                .map(|f| {
                    let c = f.world_from_cam.translation.vector;
                    [c.x as f32, c.y as f32, c.z as f32]
                })
                .collect();
            self.viewer.log_corrected_trajectory(&centres)?;
        }
        self.viewer.finish()
    }
}

/// Every `step`-th value of `v` (an even decimation for the viewer).
fn every<T: Copy>(v: &[T], step: usize) -> Vec<T> {
    v.iter().step_by(step.max(1)).copied().collect()
}
