//! One options type for everything a run can be configured with — source, engines and presets,
//! model memory, stabilisation, fusion, outputs — shared by the command line (each field is the
//! flag of the same name: `flow_refine` is `--flow-refine`) and the service (`POST /sessions`
//! takes the same keys). [`RunOptions::pipeline_config`] is the one place they become a
//! [`PipelineConfig`]; where a run's files go, its viewer and a snapshot to resume from are the
//! caller's.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{MAX_FRAME_SIDE, MIN_FRAME_SIDE};
use streamrecon_flow::dis::{DisBackend, DisConfig, DisPreset};
use streamrecon_flow::spatial::SpatialFill;
use streamrecon_flow::streamflow::StreamFlowEngineConfig;
use streamrecon_flow::videoflow::{VideoFlowEngineConfig, DEFAULT_WINDOW};
use streamrecon_geometry::flowvo::{AdaptiveKeyframes, FlowVoConfig, WindowBaConfig};
use streamrecon_geometry::stabilize::{
    StabilizeConfig, DEFAULT_CONSTANT_VELOCITY_GAIN, DEFAULT_LATENCY_FRAMES,
    DEFAULT_SMOOTHER_BLEND, MAX_LATENCY_FRAMES,
};
use streamrecon_geometry::vggt::{ModelDtype, VggtEngineConfig};
use streamrecon_models::vggt::memory::{
    CameraCache, MemoryUpdate, DEFAULT_CAMERA_WINDOW, DEFAULT_TOTAL_BUDGET,
};

use crate::config::{FlowChoice, GeometryChoice, PipelineConfig};
use crate::fusion::FusionConfig;
use crate::source::SourceOptions;
use streamrecon_geometry::loop_closure::LoopClosureConfig;

/// Flow engines by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlowEngineName {
    #[default]
    Dis,
    Videoflow,
    Streamflow,
}

/// Geometry engines by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GeometryEngineName {
    Flowvo,
    Vggt,
}

/// How frames enter the geometry engine's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MemoryUpdateName {
    #[default]
    Uniform,
    Adaptive,
}

/// Model compute precision by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DtypeName {
    #[default]
    F32,
    F16,
    Bf16,
}

impl From<DtypeName> for ModelDtype {
    fn from(d: DtypeName) -> Self {
        match d {
            DtypeName::F32 => Self::F32,
            DtypeName::F16 => Self::F16,
            DtypeName::Bf16 => Self::Bf16,
        }
    }
}

/// Where the learned models compute: `cpu`, or `cuda` / `cuda:N` (CUDA device N, default 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceName {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceName {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device {s:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceName {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceName> for String {
    fn from(d: DeviceName) -> Self {
        d.to_string()
    }
}

impl DeviceName {
    /// Checks that the models can compute on this device before anything is read or written.
    ///
    /// # Errors
    /// For CUDA: a build without the `cuda` feature, no driver, no such device (each in one
    /// line that names CUDA), or, with a device there, that the models do not run on CUDA yet.
    pub fn check(self) -> Result<()> {
        let Self::Cuda(ordinal) = self else {
            return Ok(());
        };
        let info = streamrecon_kernels::probe(ordinal).map_err(|e| Error::Device(e.to_string()))?;
        Err(Error::Device(format!(
            "CUDA: device {ordinal} ({}, {:.1} GiB, compute capability {}.{}) is there, but the models do not run on CUDA in this version (candle's CUDA backend is not built in yet): use --device cpu",
            info.name,
            info.memory_bytes as f64 / f64::from(1u32 << 30),
            info.compute_capability.0,
            info.compute_capability.1
        )))
    }
}

/// Everything a run can be configured with. Every field has a default (`RunOptions::default()`,
/// stated on each field); JSON input may give any subset and nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunOptions {
    // Source.
    /// Keep every k-th frame (default 1: all).
    pub stride: usize,
    /// Skip this many source frames first (default 0).
    pub start: usize,
    /// Stop after this many frames (default: the whole source).
    pub max_frames: Option<usize>,
    /// Resize to this width in pixels, keeping the aspect ratio (default: as read).
    pub size: Option<u32>,
    /// Pinhole intrinsics fx, fy, cx, cy at the frames' own resolution (default: the dataset's,
    /// else a 60° horizontal field of view).
    pub intrinsics: Option<[f64; 4]>,
    /// An OpenCV calibration file (YAML or XML with a camera matrix and distortion
    /// coefficients, as `calibrate_camera` writes): frames are undistorted with it before flow
    /// and geometry, and its camera matrix is their intrinsics (default: none).
    pub intrinsics_file: Option<PathBuf>,

    // Flow.
    /// Flow engine (default `dis`).
    pub flow: FlowEngineName,
    /// DIS preset (default `ultrafast`: lower trajectory and depth errors than `fast` for flowvo
    /// on our synthetic sequences, at a third of the flow time).
    pub preset: DisPreset,
    /// DIS with the previous pair's flow as its prior (default true; false: plain two-frame DIS).
    pub temporal_prior: bool,
    /// Refine each of DIS's directions by the other where they agree (default true).
    pub symmetric_fusion: bool,
    /// Full-resolution Lucas–Kanade steps after DIS (default 1; 0 = off).
    pub flow_refine: u32,
    /// Fill each flow's unreliable pixels (forward–backward disagreement over 1 px) from the
    /// reliable ones in the same image region, edge-aware (default true).
    pub spatial_fill: bool,
    /// Fill the forward flow's inconsistent pixels from the previous pair (default true).
    pub temporal_fill: bool,
    /// Wait for frame t+1 before returning the flows between t−1 and t, to fill the backward
    /// flow's inconsistent pixels from the next pair (default false: no latency).
    pub flow_look_ahead: bool,
    /// DIS's finest pyramid level, 0–8, 0 = full resolution (default: the preset's).
    pub dis_finest_scale: Option<i32>,
    /// Which DIS computes the flows (default `native`; `opencv`: OpenCV's `DISOpticalFlow`).
    pub dis_backend: DisBackend,
    /// DIS's patch size, 3–64 pixels (default: the preset's, 8).
    pub dis_patch_size: Option<i32>,
    /// DIS's patch stride, 1–63 pixels and below the patch size (default: the preset's).
    pub dis_patch_stride: Option<i32>,
    /// DIS's gradient-descent iterations per patch, 1–1000 (default: the preset's).
    pub dis_iterations: Option<i32>,
    /// DIS's variational refinement iterations per level, 0–1000 (default: the preset's).
    pub dis_variational_iterations: Option<i32>,
    /// Weights of the learned flow engine, `flow: videoflow` (VideoFlow-MOF) or `streamflow`
    /// (StreamFlow): .pth as released, or .safetensors.
    pub flow_weights: Option<PathBuf>,
    /// That model's config JSON (default: the released sizes: VideoFlow-MOF, or StreamFlow with
    /// T = 4 and 15 iterations).
    pub flow_config: Option<PathBuf>,
    /// Frames per VideoFlow window, 4 or more (default 5).
    pub flow_window: usize,

    // Geometry.
    /// Geometry engine (default: `vggt` when `weights` are given, else `flowvo`).
    pub geometry: Option<GeometryEngineName>,
    /// flowvo: windowed bundle adjustment at each keyframe (default false; experimental).
    pub bundle_adjust: bool,
    /// flowvo: the camera's rolling-shutter readout, the time from its first row to its last
    /// as a fraction of the frame interval, 0–1 (default 0: a global shutter). Each track's
    /// observation is moved along its flow to the frame's time (the middle row's).
    pub rolling_shutter: f64,
    /// StreamVGGT/InfiniteVGGT weights for `vggt` (.safetensors or the official .pth).
    pub weights: Option<PathBuf>,
    /// vggt model config JSON (default: the official VGGT-1B/StreamVGGT sizes).
    pub model_config: Option<PathBuf>,
    /// vggt's total KV-cache token budget (default 1,200,000; 0 = no pruning).
    pub total_budget: usize,
    /// Memory updates (default `uniform`: vggt stores every frame, as the reference; flowvo
    /// takes parallax keyframes). `adaptive`: vggt does not store frames whose novelty is under
    /// `admit_threshold` and keeps novel frames longer; flowvo gates and forces keyframes by
    /// novelty.
    pub memory_update: MemoryUpdateName,
    /// Novelty under which an adaptive vggt memory does not store a frame (default 0.1).
    pub admit_threshold: f32,
    /// How much an entry's novelty lowers its eviction score, adaptive updates (default 0.2).
    pub novelty_gamma: f32,
    /// vggt compute precision (default `f32`).
    pub model_dtype: DtypeName,
    /// Where the learned models compute (default `cpu`; `cuda[:N]` needs a build with the
    /// `cuda` feature and an NVIDIA GPU).
    pub device: DeviceName,
    /// vggt camera-head cache: frame 0 plus this many recent frames (default 32; 0 = unbounded,
    /// as the reference).
    pub camera_window: usize,

    /// Loop closure: places seen again are recognised among keyframes, an engine that lost
    /// tracking relocalises in an earlier map, and at the end of the run a pose graph corrects
    /// the trajectory files (the online poses go to `trajectory_online.txt`). Default (`None`):
    /// on for `flowvo`, off for `vggt`.
    pub loop_closure: Option<bool>,

    // Stabilisation.
    /// Online trajectory stabilisation of the output poses (default false).
    pub stabilize: bool,
    /// Frames each stabilised pose waits for, 0–2: 1 or 2 = a centred smoother seeing that many
    /// later frames; 0 = a causal filter, no delay but less accurate (default 2).
    pub stabilize_latency: usize,
    /// How far the centred smoother moves a pose towards its neighbours' average, in (0, 1]
    /// (default 0.8).
    pub stabilize_blend: f64,
    /// Gain of the causal filter's constant-velocity translation, in [0, 1]: lower smooths more,
    /// 0 = One-Euro translation instead (default 0.6).
    pub stabilize_gain: f64,

    // Fusion.
    /// Voxel size of the fused cloud, world units (default 0.01).
    pub voxel: f32,
    /// Most points kept in the fused cloud (default 1,500,000); its voxel map takes about
    /// 90–200 bytes per point of this cap from the first frame on.
    pub max_points: usize,

    // Outputs.
    /// Write a depth PNG every n-th frame (default 1; 0 = never).
    pub depth_every: u64,
    /// Snapshot the geometry engine's stream state every n frames (default 0 = never).
    pub snapshot_every: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        let dis = DisConfig::default();
        let fusion = FusionConfig::default();
        Self {
            stride: 1,
            start: 0,
            max_frames: None,
            size: None,
            intrinsics: None,
            intrinsics_file: None,
            flow: FlowEngineName::Dis,
            preset: DisPreset::Ultrafast,
            temporal_prior: dis.temporal_prior,
            symmetric_fusion: dis.symmetric_fusion,
            flow_refine: dis.refine_iterations,
            spatial_fill: dis.spatial_fill.is_some(),
            temporal_fill: dis.temporal_fill,
            flow_look_ahead: dis.look_ahead,
            dis_finest_scale: None,
            dis_backend: dis.backend,
            dis_patch_size: None,
            dis_patch_stride: None,
            dis_iterations: None,
            dis_variational_iterations: None,
            flow_weights: None,
            flow_config: None,
            flow_window: DEFAULT_WINDOW,
            geometry: None,
            bundle_adjust: false,
            rolling_shutter: 0.0,
            weights: None,
            model_config: None,
            total_budget: DEFAULT_TOTAL_BUDGET,
            memory_update: MemoryUpdateName::Uniform,
            admit_threshold: 0.1,
            novelty_gamma: 0.2,
            model_dtype: DtypeName::F32,
            device: DeviceName::Cpu,
            camera_window: DEFAULT_CAMERA_WINDOW,
            loop_closure: None,
            stabilize: false,
            stabilize_latency: DEFAULT_LATENCY_FRAMES,
            stabilize_blend: DEFAULT_SMOOTHER_BLEND,
            stabilize_gain: DEFAULT_CONSTANT_VELOCITY_GAIN,
            voxel: fusion.voxel,
            max_points: fusion.max_points,
            depth_every: 1,
            snapshot_every: 0,
        }
    }
}

/// The options that name files on the machine that runs the pipeline.
pub const PATH_OPTIONS: [&str; 5] = [
    "weights",
    "model_config",
    "flow_weights",
    "flow_config",
    "intrinsics_file",
];

fn invalid(what: String) -> Error {
    Error::Invalid(what)
}

/// `Ok` when `v` (if given) is in `lo..=hi`.
fn check_range(name: &str, v: Option<i32>, lo: i32, hi: i32) -> Result<()> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(invalid(format!("{name} must be in {lo}–{hi}, got {x}")))
        }
        _ => Ok(()),
    }
}

impl RunOptions {
    /// Checks every value on its own and against the others.
    ///
    /// # Errors
    /// The first option out of its range or at odds with another, by name.
    pub fn validate(&self) -> Result<()> {
        if self.intrinsics.is_some() && self.intrinsics_file.is_some() {
            return Err(invalid(
                "intrinsics and intrinsics_file both give the intrinsics: choose one".into(),
            ));
        }
        if let Some(k) = self.intrinsics {
            if !(k.iter().all(|v| v.is_finite()) && k[0] > 0.0 && k[1] > 0.0) {
                return Err(invalid(
                    "intrinsics must be finite fx, fy, cx, cy with positive focal lengths".into(),
                ));
            }
        }
        if self.stride == 0 {
            return Err(invalid(
                "stride must be 1 or more (1 keeps every frame)".into(),
            ));
        }
        if self.max_frames == Some(0) {
            return Err(invalid(
                "max_frames must be 1 or more (leave it out for the whole source)".into(),
            ));
        }
        if let Some(w) = self.size {
            if !(MIN_FRAME_SIDE..=MAX_FRAME_SIDE).contains(&w) {
                return Err(invalid(format!(
                    "size must be {MIN_FRAME_SIDE}–{MAX_FRAME_SIDE} pixels, got {w}"
                )));
            }
        }
        check_range("dis_finest_scale", self.dis_finest_scale, 0, 8)?;
        check_range("dis_patch_size", self.dis_patch_size, 3, 64)?;
        check_range("dis_patch_stride", self.dis_patch_stride, 1, 63)?;
        check_range("dis_iterations", self.dis_iterations, 1, 1000)?;
        check_range(
            "dis_variational_iterations",
            self.dis_variational_iterations,
            0,
            1000,
        )?;
        if self.flow == FlowEngineName::Videoflow && self.flow_window < 4 {
            return Err(invalid(format!(
                "flow_window must be 4 or more, got {}",
                self.flow_window
            )));
        }
        if self.stabilize_latency > MAX_LATENCY_FRAMES {
            return Err(invalid(format!(
                "stabilize_latency must be 0, 1 or 2, got {}",
                self.stabilize_latency
            )));
        }
        if !(0.0..=1.0).contains(&self.rolling_shutter) {
            return Err(invalid(format!(
                "rolling_shutter must be in [0, 1] (the readout over the frame interval), got {}",
                self.rolling_shutter
            )));
        }
        if !(0.0..=1.0).contains(&self.stabilize_gain) {
            return Err(invalid(format!(
                "stabilize_gain must be in [0, 1] (0 = One-Euro), got {}",
                self.stabilize_gain
            )));
        }
        if !(self.stabilize_blend > 0.0 && self.stabilize_blend <= 1.0) {
            return Err(invalid(format!(
                "stabilize_blend must be in (0, 1], got {}",
                self.stabilize_blend
            )));
        }
        if !(self.voxel.is_finite() && self.voxel > 0.0) {
            return Err(invalid(format!(
                "voxel must be a positive size, got {}",
                self.voxel
            )));
        }
        if !(self.admit_threshold.is_finite() && self.novelty_gamma.is_finite()) {
            return Err(invalid(
                "admit_threshold and novelty_gamma must be finite".into(),
            ));
        }
        Ok(())
    }

    /// How the source is read.
    pub fn source_options(&self) -> SourceOptions {
        SourceOptions {
            stride: self.stride,
            start: self.start,
            max_frames: self.max_frames,
            width: self.size,
            intrinsics: self.intrinsics.map(|k| (k[0], k[1], k[2], k[3])),
            intrinsics_file: self.intrinsics_file.clone(),
            gt_depth: false,
        }
    }

    /// The `dis` engine's parameters.
    pub fn dis_config(&self) -> DisConfig {
        DisConfig {
            preset: self.preset,
            temporal_prior: self.temporal_prior,
            symmetric_fusion: self.symmetric_fusion,
            refine_iterations: self.flow_refine,
            spatial_fill: self.spatial_fill.then(SpatialFill::default),
            temporal_fill: self.temporal_fill,
            look_ahead: self.flow_look_ahead,
            finest_scale: self.dis_finest_scale,
            backend: self.dis_backend,
            patch_size: self.dis_patch_size,
            patch_stride: self.dis_patch_stride,
            gradient_descent_iterations: self.dis_iterations,
            variational_refinement_iterations: self.dis_variational_iterations,
            ..DisConfig::default()
        }
    }

    /// The flow engine.
    ///
    /// # Errors
    /// `videoflow` or `streamflow` without weights.
    pub fn flow_choice(&self) -> Result<FlowChoice> {
        Ok(match self.flow {
            FlowEngineName::Dis => FlowChoice::Dis(self.dis_config()),
            FlowEngineName::Videoflow => {
                let Some(w) = &self.flow_weights else {
                    return Err(invalid(
                        "flow videoflow needs flow_weights (a VideoFlow-MOF checkpoint)".into(),
                    ));
                };
                FlowChoice::VideoFlow(VideoFlowEngineConfig {
                    weights: w.clone(),
                    model_config: self.flow_config.clone(),
                    window: self.flow_window,
                })
            }
            FlowEngineName::Streamflow => {
                let Some(w) = &self.flow_weights else {
                    return Err(invalid(
                        "flow streamflow needs flow_weights (a StreamFlow checkpoint)".into(),
                    ));
                };
                FlowChoice::StreamFlow(StreamFlowEngineConfig {
                    weights: w.clone(),
                    model_config: self.flow_config.clone(),
                })
            }
        })
    }

    /// The geometry engine.
    ///
    /// # Errors
    /// `vggt` without weights, or weights given to `flowvo`.
    pub fn geometry_choice(&self) -> Result<GeometryChoice> {
        let adaptive = self.memory_update == MemoryUpdateName::Adaptive;
        Ok(match (self.geometry, &self.weights) {
            (Some(GeometryEngineName::Flowvo) | None, None) => {
                GeometryChoice::FlowVo(FlowVoConfig {
                    adaptive: adaptive.then(AdaptiveKeyframes::default),
                    window_ba: self.bundle_adjust.then(WindowBaConfig::default),
                    rolling_shutter: self.rolling_shutter,
                    ..FlowVoConfig::default()
                })
            }
            (Some(GeometryEngineName::Flowvo), Some(_)) => {
                return Err(invalid(
                    "weights are for geometry vggt; flowvo needs no weights".into(),
                ))
            }
            (Some(GeometryEngineName::Vggt), None) => {
                return Err(invalid(
                    "geometry vggt needs weights (a StreamVGGT checkpoint)".into(),
                ))
            }
            (Some(GeometryEngineName::Vggt) | None, Some(w)) => {
                GeometryChoice::Vggt(VggtEngineConfig {
                    weights: w.clone(),
                    model_config: self.model_config.clone(),
                    total_budget: (self.total_budget > 0).then_some(self.total_budget),
                    dtype: self.model_dtype.into(),
                    update: if adaptive {
                        MemoryUpdate::Adaptive {
                            threshold: self.admit_threshold,
                            gamma: self.novelty_gamma,
                        }
                    } else {
                        MemoryUpdate::Uniform
                    },
                    camera_cache: if self.camera_window == 0 {
                        CameraCache::Reference
                    } else {
                        CameraCache::Window(self.camera_window)
                    },
                })
            }
        })
    }

    /// Trajectory stabilisation, when on.
    pub fn stabilize_config(&self) -> Option<StabilizeConfig> {
        self.stabilize.then(|| StabilizeConfig {
            constant_velocity_gain: (self.stabilize_gain > 0.0).then_some(self.stabilize_gain),
            latency_frames: self.stabilize_latency,
            smoother_blend: self.stabilize_blend,
            ..StabilizeConfig::default()
        })
    }

    /// The pipeline these options ask for, validated. Where its files go (`out_dir`), its
    /// viewer, a snapshot to resume from, a progress bar and a results channel are the caller's
    /// to set on it.
    ///
    /// # Errors
    /// [`RunOptions::validate`], [`RunOptions::flow_choice`], [`RunOptions::geometry_choice`].
    pub fn pipeline_config(&self) -> Result<PipelineConfig> {
        self.validate()?;
        self.device.check()?;
        let geometry = self.geometry_choice()?;
        let loop_closure = self
            .loop_closure
            .unwrap_or(matches!(geometry, GeometryChoice::FlowVo(_)));
        let mut config = PipelineConfig {
            flow: self.flow_choice()?,
            geometry,
            stabilize: self.stabilize_config(),
            loop_closure: loop_closure.then(LoopClosureConfig::default),
            snapshot_every: self.snapshot_every,
            depth_every: self.depth_every,
            ..PipelineConfig::default()
        };
        config.fusion.voxel = self.voxel;
        config.fusion.max_points = self.max_points;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_gives_any_subset_and_nothing_else() {
        let o: RunOptions =
            serde_json::from_str(r#"{"preset": "medium", "stabilize": true, "voxel": 0.02}"#)
                .unwrap();
        assert_eq!(o.preset, DisPreset::Medium);
        assert!(o.stabilize);
        assert_eq!(
            RunOptions {
                preset: DisPreset::Ultrafast,
                stabilize: false,
                voxel: RunOptions::default().voxel,
                ..o.clone()
            },
            RunOptions::default()
        );
        let e = serde_json::from_str::<RunOptions>(r#"{"presett": "medium"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `presett`"), "{e}");
        let o: RunOptions = serde_json::from_str(r#"{"device": "cuda:1"}"#).unwrap();
        assert_eq!(o.device, DeviceName::Cuda(1));
        assert_eq!(serde_json::to_value(o.device).unwrap(), "cuda:1");
        let e = serde_json::from_str::<RunOptions>(r#"{"device": "gpu"}"#).unwrap_err();
        assert!(
            e.to_string().contains("expected cpu, cuda or cuda:N"),
            "{e}"
        );
        // What the defaults serialise to reads back the same.
        let back: RunOptions =
            serde_json::from_value(serde_json::to_value(RunOptions::default()).unwrap()).unwrap();
        assert_eq!(back, RunOptions::default());
    }

    #[test]
    fn out_of_range_values_are_refused_by_name() {
        for (json, want) in [
            (
                r#"{"dis_patch_size": 2}"#,
                "dis_patch_size must be in 3–64, got 2",
            ),
            (
                r#"{"stabilize_gain": 1.5}"#,
                "stabilize_gain must be in [0, 1]",
            ),
            (
                r#"{"rolling_shutter": 1.2}"#,
                "rolling_shutter must be in [0, 1]",
            ),
            (
                r#"{"stabilize_latency": 3}"#,
                "stabilize_latency must be 0, 1 or 2",
            ),
            (r#"{"intrinsics": [0, 1, 2, 3]}"#, "positive focal lengths"),
            (r#"{"geometry": "vggt"}"#, "geometry vggt needs weights"),
            (
                r#"{"flow": "videoflow"}"#,
                "flow videoflow needs flow_weights",
            ),
            (
                r#"{"flow": "streamflow"}"#,
                "flow streamflow needs flow_weights",
            ),
        ] {
            let o: RunOptions = serde_json::from_str(json).unwrap();
            let e = o.pipeline_config().unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
