//! Everything rerun: opening the recording from the standard flags, entity paths, and logging.
//!
//! Conventions (rerun's own examples): `cam_from_world` logged with `ChildFromParent`, a `Pinhole`
//! with RDF axes under the camera, rgb/depth/flow images under it (the viewer back-projects the
//! depth), per-frame decimated points (never one ever-growing entity), plots, and two timelines:
//! `frame` (sequence) and `time` (seconds).

use std::path::PathBuf;

use crate::frame::{Intrinsics, Pose, RgbImage};

/// Entity paths, fixed here and nowhere else.
pub mod paths {
    pub const CAMERA: &str = "world/camera";
    pub const RGB: &str = "world/camera/image/rgb";
    pub const DEPTH: &str = "world/camera/image/depth";
    pub const FLOW: &str = "world/camera/image/flow";
    pub const IMAGE: &str = "world/camera/image";
    pub const POINTS: &str = "world/points";
    pub const TRAJECTORY: &str = "world/trajectory";
    pub const PLOT_FPS: &str = "plot/fps";
    pub const PLOT_LATENCY: &str = "plot/latency_ms";
    pub const PLOT_MEMORY: &str = "plot/memory_mb";
    pub const PLOT_TRACKED: &str = "plot/tracked_points";
    pub const PLOT_KV_TOKENS: &str = "plot/kv_tokens";
    pub const PLOT_KV_MIB: &str = "plot/kv_mib";
    pub const PLOT_MODEL_MS: &str = "plot/model_ms";
    pub const PLOT_NOVELTY: &str = "plot/novelty";
    pub const PLOT_ADMITTED: &str = "plot/admitted";
    pub const PLOT_STABILIZE_MM: &str = "plot/stabilize_correction_mm";
    pub const PLOT_STABILIZE_DEG: &str = "plot/stabilize_correction_deg";
}

/// Timeline names.
pub const TIMELINE_FRAME: &str = "frame";
pub const TIMELINE_TIME: &str = "time";

/// Where the recording goes (rerun's standard flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RerunTarget {
    /// `--save FILE.rrd`
    pub save: Option<PathBuf>,
    /// `--spawn`: start a viewer process (needs `rerun` on PATH and a display).
    pub spawn: bool,
    /// `--connect [URL]`: a running viewer, e.g. `rerun+http://127.0.0.1:9876/proxy`.
    pub connect: Option<String>,
    /// `--serve`: serve the recording over gRPC on `bind` for viewers to connect to.
    pub serve: Option<String>,
}

impl RerunTarget {
    pub fn is_enabled(&self) -> bool {
        self.save.is_some() || self.spawn || self.connect.is_some() || self.serve.is_some()
    }
}

/// What the sinks get per processed frame.
pub struct FrameLog<'a> {
    pub index: u64,
    pub timestamp: f64,
    pub cam_from_world: Pose,
    pub intrinsics: &'a Intrinsics,
    pub image: &'a RgbImage,
    pub depth: Option<&'a [f32]>,
    pub flow_rgb: Option<&'a RgbImage>,
    pub points: &'a [[f32; 3]],
    pub colors: &'a [[u8; 3]],
}

#[cfg(feature = "rerun")]
mod recording;
#[cfg(feature = "rerun")]
pub use recording::{open, Viewer};

#[cfg(not(feature = "rerun"))]
mod no_recording;
#[cfg(not(feature = "rerun"))]
pub use no_recording::{open, Viewer};

/// The service's web page (`streamrecon serve`, `GET /`): sessions and webcam capture.
pub const WEB_PAGE: &str = include_str!("web/index.html");
