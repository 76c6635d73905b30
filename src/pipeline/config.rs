//! What a run is configured with besides its source, and the engines it names.

use std::path::PathBuf;

use crossbeam_channel::Sender;
use serde::Serialize;

use streamrecon_core::error::Result;
use streamrecon_flow::dis::{DisConfig, DisEngine};
use streamrecon_flow::streamflow::{StreamFlowEngine, StreamFlowEngineConfig};
use streamrecon_flow::videoflow::{VideoFlowEngine, VideoFlowEngineConfig};
use streamrecon_flow::FlowEngine;
use streamrecon_geometry::flowvo::{FlowVo, FlowVoConfig};
use streamrecon_geometry::loop_closure::LoopClosureConfig;
use streamrecon_geometry::stabilize::{StabilizeConfig, StabilizedEngine};
use streamrecon_geometry::vggt::{VggtEngine, VggtEngineConfig};
use streamrecon_geometry::GeometryEngine;
use streamrecon_viewer::RerunTarget;

use crate::fusion::FusionConfig;
use crate::sinks::results::{FrameResult, ResultDetail};
use crate::summary::RunCounters;

/// Flow engines.
#[derive(Debug, Clone, Serialize)]
pub enum FlowChoice {
    Dis(DisConfig),
    VideoFlow(VideoFlowEngineConfig),
    StreamFlow(StreamFlowEngineConfig),
}

impl FlowChoice {
    /// The engine this names.
    ///
    /// # Errors
    /// The engine cannot be set up (e.g. weights that do not load).
    pub fn engine(&self) -> Result<Box<dyn FlowEngine>> {
        Ok(match self {
            Self::Dis(c) => Box::new(DisEngine::new(c.clone())?),
            Self::VideoFlow(c) => Box::new(VideoFlowEngine::new(c)?),
            Self::StreamFlow(c) => Box::new(StreamFlowEngine::new(c)?),
        })
    }
}

/// Geometry engines.
#[derive(Debug, Clone, Serialize)]
pub enum GeometryChoice {
    FlowVo(FlowVoConfig),
    Vggt(VggtEngineConfig),
}

impl GeometryChoice {
    /// The engine this names, wrapped in the stabilizer when `stabilize` is given.
    ///
    /// # Errors
    /// The engine cannot be set up (e.g. weights that do not load).
    pub fn engine(&self, stabilize: Option<&StabilizeConfig>) -> Result<Box<dyn GeometryEngine>> {
        let engine: Box<dyn GeometryEngine> = match self {
            Self::FlowVo(c) => Box::new(FlowVo::new(c.clone())),
            Self::Vggt(c) => Box::new(VggtEngine::new(c)?),
        };
        Ok(match stabilize {
            Some(s) => Box::new(StabilizedEngine::new(engine, s.clone())),
            None => engine,
        })
    }
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
    /// At most this many frames in the stages at once (frames parked in an engine, waiting
    /// for later ones, not counted); the next waits in the source (a live service session: at
    /// its door, where a newer frame replaces it). `None`: no limit beyond the channels. 1 gives
    /// a live stream the lowest latency (no frame waits behind another) at the cost of
    /// pipelining the stages.
    pub in_flight: Option<usize>,
    pub progress: bool,
    /// Snapshot the geometry engine's state every n frames into the output folder (0 = never).
    pub snapshot_every: u64,
    /// Restore the geometry engine from this snapshot and skip the frames it has seen.
    pub resume: Option<PathBuf>,
    /// Online trajectory stabilization of the geometry output (`None` = off).
    pub stabilize: Option<StabilizeConfig>,
    /// Loop closure beside the stream, the trajectory files corrected at the end (`None` = off).
    pub loop_closure: Option<LoopClosureConfig>,
    /// Per-frame results for a caller (the service); sent without blocking, dropped when full.
    #[serde(skip)]
    pub results: Option<Sender<FrameResult>>,
    /// Counters to count this run's frames into, for a caller that watches them live (the
    /// service); the run makes its own otherwise. Never share one between runs.
    #[serde(skip)]
    pub counters: Option<RunCounters>,
    /// What each result carries besides the pose.
    pub result_detail: ResultDetail,
}

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
            in_flight: None,
            progress: false,
            snapshot_every: 0,
            resume: None,
            result_detail: ResultDetail::default(),
            stabilize: None,
            loop_closure: None,
            results: None,
            counters: None,
        }
    }
}
