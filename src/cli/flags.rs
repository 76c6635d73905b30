//! Flags shared by the subcommands, and their mapping onto `RunOptions`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, ValueEnum};

use streamrecon::flow::dis::{DisBackend, DisPreset};
use streamrecon::pipeline::options::{
    DeviceName, DtypeName, FlowEngineName, GeometryEngineName, MemoryUpdateName,
};
use streamrecon::pipeline::{PipelineConfig, RunOptions};
use streamrecon::source::SourceOptions;
use streamrecon::viewer::RerunTarget;

/// rerun's standard flags.
#[derive(Args, Clone, Default)]
pub(super) struct RerunFlags {
    /// Save the recording to an .rrd file (viewable while it grows).
    #[arg(long, value_name = "FILE.rrd")]
    save: Option<PathBuf>,
    /// Start a rerun viewer process (needs `rerun` on PATH and a display).
    #[arg(long)]
    spawn: bool,
    /// Stream to a running viewer; default URL rerun+http://127.0.0.1:9876/proxy.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "rerun+http://127.0.0.1:9876/proxy")]
    connect: Option<String>,
    /// Serve the recording over gRPC for viewers to connect to (loopback unless told otherwise).
    #[arg(long, value_name = "IP:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:9876")]
    serve: Option<String>,
    /// Log the fused map to the recording (`world/map`, replacing the last) every N frames; 0 =
    /// only the final cloud at the end.
    #[arg(long, value_name = "N", default_value_t = streamrecon::viewer::MAP_EVERY)]
    map_every: u64,
    /// Most points of the logged map (evenly decimated).
    #[arg(long, value_name = "N", default_value_t = streamrecon::viewer::MAP_POINTS)]
    map_points: usize,
}

impl RerunFlags {
    pub(super) fn target(&self) -> RerunTarget {
        RerunTarget {
            save: self.save.clone(),
            spawn: self.spawn,
            connect: self.connect.clone(),
            serve: self.serve.clone(),
            map_every: Some(self.map_every),
            map_points: Some(self.map_points),
            recording_id: None,
        }
    }
}

#[derive(Args, Clone)]
pub(super) struct SourceFlags {
    /// Keep every K-th frame.
    #[arg(long, default_value_t = RunOptions::default().stride, value_name = "K")]
    stride: usize,
    /// Skip the first N frames.
    #[arg(long, default_value_t = RunOptions::default().start, value_name = "N")]
    start: usize,
    /// Stop after N frames.
    #[arg(long, value_name = "N")]
    max_frames: Option<usize>,
    /// Resize to this width in pixels, keeping the aspect ratio.
    #[arg(long, value_name = "PX")]
    size: Option<u32>,
    /// Intrinsics at the original resolution (default: the dataset's, else a 60° horizontal FoV).
    #[arg(long, value_name = "fx,fy,cx,cy", value_parser = parse_intrinsics)]
    intrinsics: Option<[f64; 4]>,
    /// OpenCV calibration file (YAML/XML: camera matrix and distortion coefficients): frames
    /// are undistorted with it, and its camera matrix is their intrinsics.
    #[arg(long, value_name = "FILE", conflicts_with = "intrinsics")]
    intrinsics_file: Option<PathBuf>,
}

pub(super) fn parse_intrinsics(s: &str) -> Result<[f64; 4], String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .map_err(|_| format!("'{x}' is not a number"))
        })
        .collect::<Result<_, _>>()?;
    match v.as_slice() {
        [fx, fy, cx, cy] if *fx > 0.0 && *fy > 0.0 && v.iter().all(|x| x.is_finite()) => {
            Ok([*fx, *fy, *cx, *cy])
        }
        _ => Err("expected fx,fy,cx,cy with positive focal lengths".into()),
    }
}

/// Flags of the learned flow engine (shared by `run` and `flow`).
#[derive(Args, Clone, Default)]
#[allow(clippy::struct_field_names)] // the field names are the `--flow-*` flags
pub(super) struct VideoFlowFlags {
    /// Weights of the learned flow engine (.pth as released, or .safetensors): VideoFlow-MOF for
    /// `--flow videoflow`, StreamFlow for `--flow streamflow`.
    #[arg(long, value_name = "PATH")]
    flow_weights: Option<PathBuf>,
    /// That model's config JSON [default: the released sizes: VideoFlow-MOF, or StreamFlow
    /// with T = 4 and 15 iterations].
    #[arg(long, value_name = "JSON")]
    flow_config: Option<PathBuf>,
    /// Frames per VideoFlow window (≥ 4); StreamFlow's window is its model's T.
    #[arg(long, default_value_t = RunOptions::default().flow_window, value_name = "N")]
    flow_window: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum OnOff {
    On,
    Off,
}

/// Options of the `dis` flow engine shared by `run` and `flow` (the preset is not: their
/// defaults differ).
#[derive(Args, Clone)]
pub(super) struct DisFlags {
    /// Plain two-frame DIS (no temporal prior).
    #[arg(long)]
    no_temporal_prior: bool,
    /// Keep DIS's two directions as they come (no refinement of each by the other).
    #[arg(long)]
    no_symmetric_fusion: bool,
    /// Full-resolution Lucas–Kanade steps after DIS (0 = off). One step halves DIS's error on
    /// our synthetic sequences; a second fits image noise.
    #[arg(long, default_value_t = RunOptions::default().flow_refine, value_name = "N")]
    flow_refine: u32,
    /// Keep each flow's unreliable pixels as DIS gives them (no edge-aware filling from the
    /// reliable ones around them).
    #[arg(long)]
    no_spatial_fill: bool,
    /// Keep the forward flow's inconsistent pixels as DIS gives them (no filling from the
    /// previous pair).
    #[arg(long)]
    no_temporal_fill: bool,
    /// Wait for frame t+1 before returning the flows between t−1 and t, to fill the backward
    /// flow's inconsistent pixels from the next pair (one frame of latency).
    #[arg(long)]
    flow_look_ahead: bool,
    /// DIS's finest pyramid level, 0 = full resolution [default: the preset's].
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(i32).range(0..=8))]
    dis_finest_scale: Option<i32>,
    /// Which DIS computes the flows: `native` is OpenCV's algorithm with each frame's pyramid,
    /// gradients and patch tensors made once (for 8-pixel patches; other sizes run on
    /// OpenCV's), `opencv` is OpenCV's `DISOpticalFlow` itself.
    #[arg(long, value_enum, default_value = "native")]
    dis_backend: DisBackend,
    /// DIS's patch size in pixels [default: the preset's, 8 for all three].
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(i32).range(3..=64))]
    dis_patch_size: Option<i32>,
    /// DIS's patch stride in pixels, below the patch size [default: the preset's: 4, or 3 for
    /// `medium`].
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(i32).range(1..=63))]
    dis_patch_stride: Option<i32>,
    /// DIS's gradient-descent iterations per patch [default: the preset's: 12 for `ultrafast`, 16
    /// for `fast`, 25 for `medium`].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    dis_iterations: Option<i32>,
    /// DIS's variational refinement iterations per level [default: the preset's: 0 for
    /// `ultrafast`, else 5].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=1000))]
    dis_variational_iterations: Option<i32>,
}

#[derive(Args, Clone)]
pub(super) struct EngineFlags {
    /// Flow engine.
    #[arg(long, value_enum, default_value = "dis")]
    flow: FlowEngineName,
    /// DIS preset (`ultrafast` gave flowvo lower trajectory and depth errors than `fast` on our
    /// synthetic sequences, at a third of the flow time).
    #[arg(long, value_enum, default_value = "ultrafast")]
    preset: DisPreset,
    #[command(flatten)]
    dis: DisFlags,
    #[command(flatten)]
    videoflow: VideoFlowFlags,
    /// Geometry engine [default: vggt when --weights is given, else flowvo].
    #[arg(long, value_enum)]
    geometry: Option<GeometryEngineName>,
    /// flowvo: windowed bundle adjustment at each keyframe (experimental: lowers the
    /// reprojection error, not the trajectory error, on our synthetic sequences; slower).
    #[arg(long)]
    bundle_adjust: bool,
    /// flowvo: the camera's rolling-shutter readout, first row to last, as a fraction of the
    /// frame interval (0 = a global shutter; phones read in about 0.5–0.9 of it at 30
    /// frames/s). Track observations are moved along their flow to the frame's time.
    #[arg(long, default_value_t = RunOptions::default().rolling_shutter, value_name = "FRACTION")]
    rolling_shutter: f64,
    /// Loop closure: recognise places seen again (ORB keyframes, verified by PnP), relocalise
    /// in an earlier map after tracking loss, and correct the trajectory files at the end with
    /// a Sim(3) pose graph; the online poses go to trajectory_online.txt. [default: on for
    /// flowvo, off for vggt; `--loop-closure` alone is `on`]
    #[arg(long, value_enum, value_name = "on|off", num_args = 0..=1, default_missing_value = "on")]
    loop_closure: Option<OnOff>,
    /// Model weights for `vggt` (.safetensors or the official .pth).
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Model config JSON for `vggt` [default: the official VGGT-1B/StreamVGGT sizes].
    #[arg(long, value_name = "JSON")]
    model_config: Option<PathBuf>,
    /// Total KV-cache token budget of `vggt`'s rolling memory (0 = no pruning).
    #[arg(long, default_value_t = RunOptions::default().total_budget, value_name = "N")]
    total_budget: usize,
    /// Memory updates: `uniform` (vggt: every frame, the reference; flowvo: parallax keyframes) or
    /// `adaptive` (vggt: frames below --admit-threshold novelty are predicted but not stored and
    /// novel frames outlive redundant ones; flowvo: keyframes gated and forced by novelty).
    #[arg(long, value_enum, default_value = "uniform")]
    memory_update: MemoryUpdateName,
    /// Novelty below which an adaptive `vggt` memory does not store a frame.
    #[arg(long, default_value_t = RunOptions::default().admit_threshold, value_name = "W")]
    admit_threshold: f32,
    /// How much an entry's novelty lowers its eviction score (adaptive updates).
    #[arg(long, default_value_t = RunOptions::default().novelty_gamma, value_name = "GAMMA")]
    novelty_gamma: f32,
    /// `vggt` compute precision (f16/bf16 halve memory; on the CPU they are slower than f32).
    #[arg(long, value_enum, default_value = "f32")]
    model_dtype: DtypeName,
    /// Where the learned models compute: cpu, cuda or cuda:N (a build with `--features cuda`
    /// and an NVIDIA GPU).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda[:N]")]
    device: DeviceName,
    /// `vggt` camera-head cache: frame 0 plus the N most recent frames (0 = unbounded, as the
    /// reference).
    #[arg(long, default_value_t = RunOptions::default().camera_window, value_name = "N")]
    camera_window: usize,
    /// Online trajectory stabilization of the output poses (see --stabilize-latency).
    #[arg(long, value_enum, default_value = "off")]
    stabilize: OnOff,
    /// Frames each stabilized pose waits for: 1 or 2 = a centred smoother that sees that many
    /// later frames; 0 = a causal filter (constant-velocity translation, One-Euro rotation),
    /// no delay but less accurate.
    #[arg(long, default_value_t = RunOptions::default().stabilize_latency, value_name = "N", value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u8).range(0..=2), usize::from))]
    stabilize_latency: usize,
    /// How far the centred smoother moves each pose towards its neighbours' average, in (0, 1].
    #[arg(long, default_value_t = RunOptions::default().stabilize_blend, value_name = "B")]
    stabilize_blend: f64,
    /// Gain α of the causal filter's constant-velocity translation (--stabilize-latency 0), in
    /// (0, 1]: lower smooths more (0 = One-Euro translation instead).
    #[arg(long, default_value_t = RunOptions::default().stabilize_gain, value_name = "ALPHA")]
    stabilize_gain: f64,
    /// Write the geometry engine's stream state to OUT/snapshot.safetensors every N frames (0 = never); each takes effect once the poses of every frame before it are in OUT/checkpoint.json.
    #[arg(long, default_value_t = RunOptions::default().snapshot_every, value_name = "N")]
    snapshot_every: u64,
    /// Continue a stream from a snapshot: the engine state is restored and the source's frames
    /// before the snapshot's position are skipped.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    /// Voxel size of the fused cloud, world units.
    #[arg(long, default_value_t = RunOptions::default().voxel)]
    voxel: f32,
    /// Most points kept in the fused cloud. Its voxel map takes about 90–200 bytes per point of
    /// this cap from the first frame on (180 MiB at the default and frames up to 1280×720).
    #[arg(long, default_value_t = RunOptions::default().max_points)]
    max_points: usize,
    /// Write a depth PNG every N frames (0 = never).
    #[arg(long, default_value_t = RunOptions::default().depth_every, value_name = "N")]
    depth_every: u64,
}

// The command line's flags onto the one options type (`RunOptions`; the service maps its
// request body onto the same type).

impl SourceFlags {
    pub(super) fn apply(&self, o: &mut RunOptions) {
        o.stride = self.stride;
        o.start = self.start;
        o.max_frames = self.max_frames;
        o.size = self.size;
        o.intrinsics = self.intrinsics;
        o.intrinsics_file.clone_from(&self.intrinsics_file);
    }

    pub(super) fn options(&self) -> SourceOptions {
        let mut o = RunOptions::default();
        self.apply(&mut o);
        o.source_options()
    }
}

impl DisFlags {
    pub(super) fn apply(&self, o: &mut RunOptions) {
        o.temporal_prior = !self.no_temporal_prior;
        o.symmetric_fusion = !self.no_symmetric_fusion;
        o.flow_refine = self.flow_refine;
        o.spatial_fill = !self.no_spatial_fill;
        o.temporal_fill = !self.no_temporal_fill;
        o.flow_look_ahead = self.flow_look_ahead;
        o.dis_finest_scale = self.dis_finest_scale;
        o.dis_backend = self.dis_backend;
        o.dis_patch_size = self.dis_patch_size;
        o.dis_patch_stride = self.dis_patch_stride;
        o.dis_iterations = self.dis_iterations;
        o.dis_variational_iterations = self.dis_variational_iterations;
    }
}

impl VideoFlowFlags {
    pub(super) fn apply(&self, o: &mut RunOptions) {
        o.flow_weights.clone_from(&self.flow_weights);
        o.flow_config.clone_from(&self.flow_config);
        o.flow_window = self.flow_window;
    }
}

impl EngineFlags {
    pub(super) fn options(&self) -> RunOptions {
        let mut o = RunOptions {
            flow: self.flow,
            preset: self.preset,
            geometry: self.geometry,
            bundle_adjust: self.bundle_adjust,
            rolling_shutter: self.rolling_shutter,
            loop_closure: self.loop_closure.map(|v| v == OnOff::On),
            weights: self.weights.clone(),
            model_config: self.model_config.clone(),
            total_budget: self.total_budget,
            memory_update: self.memory_update,
            admit_threshold: self.admit_threshold,
            novelty_gamma: self.novelty_gamma,
            model_dtype: self.model_dtype,
            device: self.device,
            camera_window: self.camera_window,
            stabilize: self.stabilize == OnOff::On,
            stabilize_latency: self.stabilize_latency,
            stabilize_blend: self.stabilize_blend,
            stabilize_gain: self.stabilize_gain,
            voxel: self.voxel,
            max_points: self.max_points,
            depth_every: self.depth_every,
            snapshot_every: self.snapshot_every,
            ..RunOptions::default()
        };
        self.dis.apply(&mut o);
        self.videoflow.apply(&mut o);
        o
    }

    /// The pipeline for these flags (and the source's), writing into `out` and showing in
    /// `rerun`.
    pub(super) fn pipeline_config(
        &self,
        source: Option<&SourceFlags>,
        out: Option<PathBuf>,
        rerun: RerunTarget,
        progress: bool,
    ) -> Result<PipelineConfig> {
        let mut o = self.options();
        if let Some(s) = source {
            s.apply(&mut o);
        }
        Ok(PipelineConfig {
            resume: self.resume.clone(),
            out_dir: out,
            rerun,
            progress,
            ..o.pipeline_config()?
        })
    }
}

impl Default for EngineFlags {
    fn default() -> Self {
        // The flags as parsed from an empty command line: `RunOptions`' defaults.
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            engines: EngineFlags,
        }
        Defaults::parse_from(["streamrecon"]).engines
    }
}
