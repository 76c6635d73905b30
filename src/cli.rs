//! Argument parsing and the subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use streamrecon::datasets::formats::{flo, kitti_flow, tum};
use streamrecon::datasets::layouts::{Layout, LayoutWriter};
use streamrecon::datasets::native::{NativeWriter, SequenceMeta};
use streamrecon::datasets::synth::{
    Degrade, SceneKind, SurfaceSampler, SynthConfig, SynthFrame, SynthWorld, TrajectoryKind,
};
use streamrecon::eval::depth::{depth_metrics_of_folders, DepthScale};
use streamrecon::eval::long3d;
use streamrecon::eval::pose::{associate, pose_metrics};
use streamrecon::eval::run::eval_run;
use streamrecon::flow::colorwheel;
use streamrecon::flow::dis::{DisBackend, DisPreset};
use streamrecon::flow::metrics::FlowMetricsAcc;
use streamrecon::pipeline::options::{
    DtypeName, FlowEngineName, GeometryEngineName, MemoryUpdateName,
};
use streamrecon::pipeline::{self, PipelineConfig, RunOptions, RunOutcome};
use streamrecon::source::{Source, SourceItem, SourceOptions, SourceSpec};
use streamrecon::viewer::RerunTarget;

const EXAMPLES: &str = "Examples:
  streamrecon demo                                   # synthetic sequence → full pipeline → ./demo-out/
  streamrecon run video.mp4 --out out --save out/recording.rrd
  streamrecon run camera:0 --connect                 # live camera into a running viewer
  streamrecon run frames/ --stride 2 --size 640 --intrinsics 525,525,319.5,239.5 --out out
  streamrecon synth --scene room --trajectory handheld --frames 300 --out seq
  streamrecon flow seq --out flows --backward
  streamrecon eval flow --gt seq/flow_fwd --pred flows
  streamrecon eval pose --gt seq/poses.txt --pred out/trajectory.txt";

#[derive(Parser)]
#[command(name = "streamrecon", version, about = "Streaming optical flow, camera poses, depth and a growing point cloud from video, live in rerun", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline on a source: a video file, camera:N, an rtsp/http URL, an image folder or a dataset folder.
    Run(RunArgs),
    /// Generate a synthetic sequence, run the weights-free pipeline on it and report its accuracy.
    Demo(DemoArgs),
    /// Render a synthetic sequence with exact ground truth.
    Synth(SynthArgs),
    /// Compute optical flow for a source and write it to files.
    Flow(FlowArgs),
    /// Evaluate results against ground truth.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Run the pipeline as a network service: sessions push frames over HTTP and read results back.
    Serve(ServeArgs),
    /// Run a learned model directly on tensors (parity checks against the reference code).
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (loopback unless told otherwise; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7878")]
    bind: std::net::SocketAddr,
    /// File holding the bearer token; without it a random token is made and written to
    /// DATA_DIR/token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Most sessions running at once.
    #[arg(long, default_value_t = 4)]
    max_sessions: usize,
    /// Where sessions write their outputs.
    #[arg(long, default_value = "streamrecon-sessions")]
    data_dir: PathBuf,
    /// StreamVGGT weights sessions may use (`{"geometry": "vggt"}`); each such session loads
    /// its own copy.
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Model config JSON for --weights [default: the official VGGT-1B sizes].
    #[arg(long, value_name = "JSON")]
    model_config: Option<PathBuf>,
    /// VideoFlow-MOF weights sessions may use (`{"flow": "videoflow"}`).
    #[arg(long, value_name = "PATH")]
    flow_weights: Option<PathBuf>,
    /// VideoFlow model config JSON for --flow-weights [default: the released MOF sizes].
    #[arg(long, value_name = "JSON")]
    flow_config: Option<PathBuf>,
    /// A camera or stream URL sessions may read on the server (`{"source": …}`): exact, or a
    /// prefix ending in `*` (`camera:*`, `rtsp://10.0.0.5/*`). Repeatable; none by default.
    #[arg(long, value_name = "SOURCE")]
    allow_source: Vec<String>,
    /// Snapshot each session's engine (vggt) and trajectory every N frames, so a killed server
    /// loses at most N frames of a session.
    #[arg(long, value_name = "N", default_value_t = streamrecon::serve::SNAPSHOT_EVERY)]
    snapshot_every: u64,
    /// Also stream every session to a running rerun viewer.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "rerun+http://127.0.0.1:9876/proxy")]
    connect: Option<String>,
}

/// A bearer token from a file: one word of 16 characters or more.
fn read_token(f: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(f)
        .with_context(|| format!("cannot read the token file {}", f.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 || t.chars().any(char::is_whitespace) {
        bail!(
            "the token in {} must be one word of 16 characters or more",
            f.display()
        );
    }
    Ok(t)
}

fn cmd_serve(a: &ServeArgs) -> Result<()> {
    use rand::Rng;
    streamrecon::io_util::create_dir(&a.data_dir)?;
    let token = if let Some(f) = &a.token_file {
        read_token(f)?
    } else if a.data_dir.join("token").exists() {
        // Made by an earlier start: clients keep working across restarts.
        read_token(&a.data_dir.join("token"))?
    } else {
        let mut rng = rand::rng();
        let t: String = (0..32)
            .map(|_| char::from_digit(u32::from(rng.random_range(0..16u8)), 16).unwrap_or('0'))
            .collect();
        let path = a.data_dir.join("token");
        streamrecon::io_util::write_secret(&path, t.as_bytes())?;
        eprintln!("bearer token written to {} (mode 0600)", path.display());
        t
    };
    if !a.bind.ip().is_loopback() {
        eprintln!(
            "listening beyond this machine ({}): every endpoint but /health needs the token",
            a.bind
        );
    }
    let config = streamrecon::serve::ServeConfig {
        options: RunOptions {
            weights: a.weights.clone(),
            model_config: a.model_config.clone(),
            flow_weights: a.flow_weights.clone(),
            flow_config: a.flow_config.clone(),
            ..RunOptions::default()
        },
        bind: a.bind,
        token,
        max_sessions: a.max_sessions.max(1),
        data_dir: a.data_dir.clone(),
        allow_sources: a.allow_source.clone(),
        connect: a.connect.clone(),
        snapshot_every: a.snapshot_every,
    };
    streamrecon::serve::serve(
        &config,
        |addr| {
            println!("listening on http://{addr}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("shutting down: closing sessions");
        },
    )?;
    Ok(())
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Stream the frames of a safetensors tensor `[S, 3, H, W]` (RGB in [0, 1]) through the vggt
    /// model and write every per-frame output to one safetensors file.
    Run {
        /// Model config JSON (fixture-style `model_config`, or bare).
        #[arg(long, value_name = "JSON")]
        model_config: Option<PathBuf>,
        #[arg(long, value_name = "PATH")]
        weights: PathBuf,
        /// FILE.safetensors[:TENSOR] (default tensor: input.images).
        #[arg(long, value_name = "FILE[:TENSOR]")]
        frames: String,
        /// Total KV-cache token budget (0 = no pruning).
        #[arg(long, default_value_t = streamrecon::models::vggt::DEFAULT_TOTAL_BUDGET)]
        total_budget: usize,
        /// Compute precision (outputs are written as f32).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeName,
        #[arg(long, value_name = "OUT.safetensors")]
        out: PathBuf,
    },
    /// Run the VideoFlow-MOF model on the frames of a safetensors tensor `[N, 3, H, W]` (0..255,
    /// any dtype) and write `flow` `[2(N−2), 2, H, W]` (forward flows of the middle frames, then
    /// their backward flows).
    Flow {
        #[arg(long, value_name = "JSON")]
        model_config: Option<PathBuf>,
        #[arg(long, value_name = "PATH")]
        weights: PathBuf,
        /// FILE.safetensors[:TENSOR] (default tensor: input.images_u8).
        #[arg(long, value_name = "FILE[:TENSOR]")]
        frames: String,
        #[arg(long, value_name = "OUT.safetensors")]
        out: PathBuf,
    },
}

/// Writes named tensors atomically.
fn save_tensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    out: &Path,
) -> Result<()> {
    streamrecon::models::weights::save_tensors_atomic(tensors, out)?;
    println!("{} tensors → {}", tensors.len(), out.display());
    Ok(())
}

/// rerun's standard flags.
#[derive(Args, Clone, Default)]
struct RerunFlags {
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
}

impl RerunFlags {
    fn target(&self) -> RerunTarget {
        RerunTarget {
            save: self.save.clone(),
            spawn: self.spawn,
            connect: self.connect.clone(),
            serve: self.serve.clone(),
        }
    }
}

#[derive(Args, Clone)]
struct SourceFlags {
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
}

fn parse_intrinsics(s: &str) -> Result<[f64; 4], String> {
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
struct VideoFlowFlags {
    /// VideoFlow-MOF weights (.pth as released, or .safetensors) for `--flow videoflow`.
    #[arg(long, value_name = "PATH")]
    flow_weights: Option<PathBuf>,
    /// VideoFlow model config JSON [default: the released MOF sizes].
    #[arg(long, value_name = "JSON")]
    flow_config: Option<PathBuf>,
    /// Frames per VideoFlow window (≥ 4).
    #[arg(long, default_value_t = RunOptions::default().flow_window, value_name = "N")]
    flow_window: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Options of the `dis` flow engine shared by `run` and `flow` (the preset is not: their
/// defaults differ).
#[derive(Args, Clone)]
struct DisFlags {
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
    /// Keep the forward flow's inconsistent pixels as DIS gives them (no filling from the
    /// previous pair).
    #[arg(long)]
    no_temporal_fill: bool,
    /// Wait for frame t+1 before returning the flows between t−1 and t, to fill the backward
    /// flow's inconsistent pixels from the next pair (one frame of latency).
    #[arg(long)]
    flow_look_ahead: bool,
    /// DIS's finest pyramid level, 0 = full resolution [default: the preset's; 2 for `medium`
    /// with --flow-refine, whose full-resolution step does the last octave].
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
struct EngineFlags {
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
    fn apply(&self, o: &mut RunOptions) {
        o.stride = self.stride;
        o.start = self.start;
        o.max_frames = self.max_frames;
        o.size = self.size;
        o.intrinsics = self.intrinsics;
    }

    fn options(&self) -> SourceOptions {
        let mut o = RunOptions::default();
        self.apply(&mut o);
        o.source_options()
    }
}

impl DisFlags {
    fn apply(&self, o: &mut RunOptions) {
        o.temporal_prior = !self.no_temporal_prior;
        o.symmetric_fusion = !self.no_symmetric_fusion;
        o.flow_refine = self.flow_refine;
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
    fn apply(&self, o: &mut RunOptions) {
        o.flow_weights.clone_from(&self.flow_weights);
        o.flow_config.clone_from(&self.flow_config);
        o.flow_window = self.flow_window;
    }
}

impl EngineFlags {
    fn options(&self) -> RunOptions {
        let mut o = RunOptions {
            flow: self.flow,
            preset: self.preset,
            geometry: self.geometry,
            bundle_adjust: self.bundle_adjust,
            weights: self.weights.clone(),
            model_config: self.model_config.clone(),
            total_budget: self.total_budget,
            memory_update: self.memory_update,
            admit_threshold: self.admit_threshold,
            novelty_gamma: self.novelty_gamma,
            model_dtype: self.model_dtype,
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
    fn pipeline_config(
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

#[derive(Args)]
struct RunArgs {
    /// Video file, camera:N, rtsp://… or http://… URL, image folder, or dataset folder.
    source: String,
    /// Output folder (trajectory, points, depth, COLMAP, run.json).
    #[arg(long, default_value = "streamrecon-out")]
    out: PathBuf,
    #[command(flatten)]
    source_flags: SourceFlags,
    #[command(flatten)]
    engines: EngineFlags,
    #[command(flatten)]
    rerun: RerunFlags,
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Frames to generate.
    #[arg(long, default_value_t = 150)]
    frames: usize,
    #[arg(long, value_enum, default_value = "handheld")]
    trajectory: TrajectoryKind,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[command(flatten)]
    rerun: RerunFlags,
}

#[derive(Args)]
struct SynthArgs {
    #[arg(long, value_enum, default_value = "room")]
    scene: SceneKind,
    #[arg(long, value_enum, default_value = "smooth")]
    trajectory: TrajectoryKind,
    #[arg(long, default_value_t = 100)]
    frames: usize,
    /// Image size WxH.
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    size: (u32, u32),
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Degradations, e.g. noise=0.02,blur=4,exposure=0.2,fog=0.05.
    #[arg(long, value_parser = Degrade::parse)]
    degrade: Option<Degrade>,
    #[arg(long)]
    out: PathBuf,
    /// Dataset layout to write.
    #[arg(long, value_enum, default_value = "native")]
    format: Layout,
    /// Skip the optical flow and occlusion ground truth (native and sintel layouts; tum and
    /// long3d never store it): faster, and a native sequence shrinks to about a third.
    #[arg(long)]
    no_flow: bool,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WxH, e.g. 640x480")?;
    let w: u32 = w.parse().map_err(|_| "bad width")?;
    let h: u32 = h.parse().map_err(|_| "bad height")?;
    if !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
        return Err("width and height must be within 16..8192".into());
    }
    Ok((w, h))
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FlowFormat {
    Flo,
    Kitti,
    Png,
}

#[derive(Args)]
struct FlowArgs {
    source: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "flo")]
    format: FlowFormat,
    #[arg(long, value_enum, default_value = "dis")]
    engine: FlowEngineName,
    /// DIS preset (`medium` here: with refinement, the lowest flow EPE at about `fast`'s time;
    /// `run` defaults to `ultrafast`, which serves the geometry better).
    #[arg(long, value_enum, default_value = "medium")]
    preset: DisPreset,
    #[command(flatten)]
    dis: DisFlags,
    #[command(flatten)]
    videoflow: VideoFlowFlags,
    /// Also write backward flows to OUT/bwd/.
    #[arg(long)]
    backward: bool,
    /// Flow magnitude of full colour saturation for --format png (default: per image maximum).
    #[arg(long)]
    flow_max: Option<f32>,
    #[command(flatten)]
    source_flags: SourceFlags,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Flow metrics (EPE all/noc/occ, Fl-all, 1/3/5 px) of predicted .flo files against ground truth.
    Flow {
        #[arg(long)]
        gt: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        /// Occlusion masks (PNG, 255 = occluded) named like the flows; default GT/../occ_fwd if present.
        #[arg(long)]
        occ: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The Long3D protocol (as the official InfiniteVGGT script): Acc, Comp, NC of a predicted cloud.
    Long3d {
        /// Predicted cloud (.ply or .pcd), in the run's camera/world frame.
        #[arg(long)]
        pred: PathBuf,
        /// Ground-truth map (.pcd or .ply), e.g. dense_cloud_map.pcd.
        #[arg(long)]
        gt: PathBuf,
        /// Camera→LiDAR extrinsic: official, identity, or a file of 16 numbers (row-major 4×4).
        #[arg(long, default_value = "official")]
        extrinsic: String,
        #[arg(long, default_value_t = 0.015)]
        voxel: f64,
        /// Factor on rms_gt/rms_pred in the initial scale (the official 0.75; 1.0 for some scenes).
        #[arg(long, default_value_t = 0.75)]
        scale_init: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Depth metrics (AbsRel, RMSE, δ<1.25) of predicted depth PNGs (mm) against ground truth
    /// (.npy metres or 16-bit PNG mm), matched by file name.
    Depth {
        #[arg(long)]
        gt: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        /// Median scaling per frame, or one scale for the whole sequence.
        #[arg(long, value_enum, default_value = "frame")]
        scale: DepthScale,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the pipeline over a dataset folder (or every dataset inside it) and evaluate poses,
    /// depth and the reconstruction: metrics.json, metrics.md and plots; finished sequences are skipped.
    Run {
        #[arg(long)]
        dataset: PathBuf,
        #[command(flatten)]
        engines: EngineFlags,
        #[arg(long)]
        out: PathBuf,
        /// The predicted cloud is built from every N-th frame's depth map (the official protocol: 10).
        #[arg(long, default_value_t = 10)]
        stride: u64,
    },
    /// ATE / RPE of a TUM trajectory against a TUM ground truth (matched by timestamp as evo
    /// does).
    Pose {
        #[arg(long)]
        gt: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        #[arg(long, default_value_t = 1)]
        delta: usize,
        /// Poses further apart in time than this are not matched, seconds (evo's `--t_max_diff`).
        #[arg(long, default_value_t = streamrecon::eval::pose::MAX_TIME_DIFF)]
        max_time_diff: f64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => cmd_run(&a),
        Command::Demo(a) => cmd_demo(&a),
        Command::Synth(a) => cmd_synth(&a).map(|()| ExitCode::SUCCESS),
        Command::Flow(a) => cmd_flow(&a),
        Command::Eval(e) => cmd_eval(&e).map(|()| ExitCode::SUCCESS),
        Command::Model(m) => cmd_model(&m).map(|()| ExitCode::SUCCESS),
        Command::Serve(a) => cmd_serve(&a).map(|()| ExitCode::SUCCESS),
    }
}

/// SIGINT/SIGTERM set the flag; a second signal exits at once.
fn install_stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without draining");
            std::process::exit(130);
        }
        eprintln!(
            "interrupted: draining the pipeline and closing outputs (interrupt again to abort)"
        );
    })
    .context("cannot install the signal handler")?;
    Ok(stop)
}

fn print_summary(outcome: &RunOutcome, out: &Path) {
    let s = &outcome.summary;
    println!(
        "{} frames processed ({} read, {} dropped, {} skipped) in {:.1} s: {:.1} fps, peak RSS {:.0} MiB",
        s.frames_processed, s.frames_read, s.frames_dropped, s.frames_skipped, s.wall_s, s.fps, s.peak_rss_mib
    );
    if s.frames_tracked == 0 && s.frames_processed > 0 {
        // The engine counts the segments it started; none of them made a map.
        println!(
            "tracked 0 / {} frames: no map was initialised (flowvo needs the camera to move \
             sideways, not only turn); {} points",
            s.frames_processed, s.points
        );
    } else {
        println!(
            "tracked {} / {} frames in {} map segment(s); median reprojection error {}; {} points",
            s.frames_tracked,
            s.frames_processed,
            s.map_segments,
            s.median_reprojection_px
                .map_or("n/a".into(), |e| format!("{e:.2} px")),
            s.points
        );
    }
    println!("outputs: {}", out.display());
}

fn cmd_run(a: &RunArgs) -> Result<ExitCode> {
    let spec = SourceSpec::parse(&a.source)?;
    let source = Source::open(&spec, a.source_flags.options())?;
    let config = a.engines.pipeline_config(
        Some(&a.source_flags),
        Some(a.out.clone()),
        a.rerun.target(),
        true,
    )?;
    let stop = install_stop_flag()?;
    let outcome = pipeline::run(source, &config, &stop)?;
    print_summary(&outcome, &a.out);
    if let Some(e) = outcome.error {
        return Err(anyhow::Error::new(e)
            .context("the run stopped early; outputs up to that point are written"));
    }
    Ok(ExitCode::SUCCESS)
}

fn write_sequence(config: &SynthConfig, out: &Path) -> Result<()> {
    write_layout(config, out, Layout::Native)
}

/// Renders every frame of `world` into `write`, sampling the GT cloud from every 5th frame.
fn render_into(
    world: &SynthWorld,
    mut write: impl FnMut(&SynthFrame) -> Result<()>,
) -> Result<SurfaceSampler> {
    let mut sampler = SurfaceSampler::new(0.02, 4);
    let pb = indicatif::ProgressBar::new(world.config.frames as u64);
    for f in world.frames() {
        if f.index % 5 == 0 {
            sampler.add(&f.view, &f.image, &world.intrinsics);
        }
        write(&f)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(sampler)
}

fn write_layout(config: &SynthConfig, out: &Path, layout: Layout) -> Result<()> {
    let world = SynthWorld::new(config.clone());
    if layout != Layout::Native {
        let scene = format!("{:?}_{:?}", config.scene, config.trajectory).to_lowercase();
        let mut writer = LayoutWriter::create(layout, out, world.intrinsics, &scene)?;
        let sampler = render_into(&world, |f| Ok(writer.write_frame(f)?))?;
        writer.finish(&sampler.cloud())?;
        return Ok(());
    }
    let mut writer = NativeWriter::create(out, world.intrinsics)?;
    let sampler = render_into(&world, |f| Ok(writer.write_frame(f)?))?;
    let meta = SequenceMeta {
        generator: format!("streamrecon {}", env!("CARGO_PKG_VERSION")),
        frames: config.frames,
        fps: config.fps,
        jump_frames: world.trajectory.jump_frames(config.frames),
        config: serde_json::to_value(config)?,
    };
    writer.finish(&sampler.cloud(), &meta)?;
    Ok(())
}

fn cmd_synth(a: &SynthArgs) -> Result<()> {
    let config = SynthConfig {
        scene: a.scene,
        trajectory: a.trajectory,
        frames: a.frames,
        width: a.size.0,
        height: a.size.1,
        seed: a.seed,
        degrade: a.degrade.unwrap_or_default(),
        flow: !a.no_flow && matches!(a.format, Layout::Native | Layout::Sintel | Layout::Kitti),
        ..SynthConfig::default()
    };
    if a.no_flow && a.format == Layout::Kitti {
        bail!("the kitti layout is made of flow pairs; --no-flow leaves nothing to write");
    }
    let t = std::time::Instant::now();
    write_layout(&config, &a.out, a.format)?;
    println!(
        "wrote {} frames to {} in {:.1} s",
        a.frames,
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_demo(a: &DemoArgs) -> Result<ExitCode> {
    let seq = a.out.join("sequence");
    let run_dir = a.out.join("run");
    println!(
        "1/3 rendering a synthetic room ({} frames, {:?} camera) into {}",
        a.frames,
        a.trajectory,
        seq.display()
    );
    let config = SynthConfig {
        scene: SceneKind::Room,
        trajectory: a.trajectory,
        frames: a.frames,
        seed: a.seed,
        ..SynthConfig::default()
    };
    write_sequence(&config, &seq)?;
    let mut rerun = a.rerun.target();
    if !rerun.is_enabled() {
        rerun.save = Some(a.out.join("recording.rrd"));
    }
    println!("2/3 running dis flow → flowvo → fusion");
    let engines = EngineFlags::default();
    let config = engines.pipeline_config(None, Some(run_dir.clone()), rerun.clone(), true)?;
    let source = Source::open(
        &SourceSpec::parse(&seq.display().to_string())?,
        SourceOptions::default(),
    )?;
    let stop = install_stop_flag()?;
    let outcome = pipeline::run(source, &config, &stop)?;
    print_summary(&outcome, &run_dir);
    println!("3/3 accuracy against the ground truth");
    let report = streamrecon::eval::report::accuracy_report(&seq, &run_dir, &outcome)?;
    println!("{report}");
    if let Some(p) = &rerun.save {
        println!(
            "view the recording: pip install rerun-sdk==0.36.3 && rerun {}",
            p.display()
        );
    }
    if let Some(e) = outcome.error {
        return Err(anyhow::Error::new(e).context("the demo run stopped early"));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_flow(a: &FlowArgs) -> Result<ExitCode> {
    let spec = SourceSpec::parse(&a.source)?;
    let mut source = Source::open(&spec, a.source_flags.options())?;
    let mut options = RunOptions {
        flow: a.engine,
        preset: a.preset,
        ..RunOptions::default()
    };
    a.dis.apply(&mut options);
    a.videoflow.apply(&mut options);
    a.source_flags.apply(&mut options);
    options.validate()?;
    let mut engine = options.flow_choice()?.engine()?;
    streamrecon::io_util::create_dir(&a.out)?;
    if a.backward {
        streamrecon::io_util::create_dir(&a.out.join("bwd"))?;
    }
    let stop = install_stop_flag()?;
    let ext = match a.format {
        FlowFormat::Flo => "flo",
        FlowFormat::Kitti | FlowFormat::Png => "png",
    };
    let write = |path: &Path, f: &streamrecon::flow::FlowField| -> Result<()> {
        match a.format {
            FlowFormat::Flo => flo::write_flo(path, f)?,
            FlowFormat::Kitti => kitti_flow::write_kitti_flow(path, f, None)?,
            FlowFormat::Png => {
                let img = colorwheel::flow_to_rgb(f, a.flow_max);
                let bytes = streamrecon::datasets::native::rgb_png_bytes(&img);
                streamrecon::io_util::write_bytes_atomic(path, &bytes)?;
            }
        }
        Ok(())
    };
    let mut n = 0usize;
    let t0 = std::time::Instant::now();
    let mut save = |pairs: Vec<streamrecon::flow::PairFlow>| -> Result<()> {
        for p in pairs {
            write(&a.out.join(format!("{:06}.{ext}", p.from)), &p.fwd)?;
            if a.backward {
                write(
                    &a.out.join("bwd").join(format!("{:06}.{ext}", p.to)),
                    &p.bwd,
                )?;
            }
            n += 1;
        }
        Ok(())
    };
    while !stop.load(Ordering::SeqCst) {
        let Some(item) = source.next_item() else {
            break;
        };
        let frame = match item? {
            SourceItem::Frame(f) => f,
            SourceItem::Skipped { what } => {
                log::warn!("skipped a corrupt frame: {what}");
                continue;
            }
        };
        save(engine.push(&frame)?)?;
    }
    save(engine.flush()?)?;
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "{n} flows written to {} ({:.1} pairs/s)",
        a.out.display(),
        n as f64 / dt.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

fn read_cloud(path: &Path) -> Result<streamrecon::cloud::PointCloud> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("ply") => Ok(streamrecon::datasets::formats::ply::read_ply(path)?),
        Some("pcd") => Ok(streamrecon::datasets::formats::pcd::read_pcd(path)?),
        _ => bail!("point clouds must be .ply or .pcd: {}", path.display()),
    }
}

fn parse_extrinsic(s: &str) -> Result<[[f64; 4]; 4]> {
    match s {
        "official" => Ok(long3d::OFFICIAL_CAM_TO_LIDAR),
        "identity" => Ok(std::array::from_fn(|r| {
            std::array::from_fn(|c| if r == c { 1.0 } else { 0.0 })
        })),
        file => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the extrinsic: {file}"))?;
            let v: Vec<f64> = text
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .filter(|t| !t.is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("the extrinsic must be 16 numbers: {file}"))?;
            if v.len() != 16 || v.iter().any(|x| !x.is_finite()) {
                bail!("the extrinsic must be 16 finite numbers (row-major 4×4): {file}");
            }
            Ok(std::array::from_fn(|r| {
                std::array::from_fn(|c| v[r * 4 + c])
            }))
        }
    }
}

fn write_json(value: &impl serde::Serialize, out: Option<&Path>) -> Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    println!("{json}");
    if let Some(o) = out {
        streamrecon::io_util::write_bytes_atomic(o, json.as_bytes())?;
    }
    Ok(())
}

/// Depth maps of a folder by file stem: `.npy` in metres or 16-bit `.png` in millimetres.
fn cmd_eval(e: &EvalCommand) -> Result<()> {
    match e {
        EvalCommand::Long3d {
            pred,
            gt,
            extrinsic,
            voxel,
            scale_init,
            seed,
            out,
        } => {
            let cfg = long3d::Long3dConfig {
                cam_to_lidar: parse_extrinsic(extrinsic)?,
                voxel: *voxel,
                scale_init: *scale_init,
                seed: *seed,
                ..long3d::Long3dConfig::default()
            };
            let (p, g) = (read_cloud(pred)?, read_cloud(gt)?);
            let t = std::time::Instant::now();
            let report = long3d::evaluate(&p, &g, &cfg)?;
            log::info!("Long3D evaluation in {:.1} s", t.elapsed().as_secs_f64());
            write_json(&report.metrics, out.as_deref())?;
        }
        EvalCommand::Depth {
            gt,
            pred,
            scale,
            out,
        } => {
            let m = depth_metrics_of_folders(gt, pred, *scale)?;
            write_json(
                &serde_json::json!({"scale": format!("{scale:?}").to_lowercase(), "metrics": m}),
                out.as_deref(),
            )?;
        }
        EvalCommand::Run {
            dataset,
            engines,
            out,
            stride,
        } => {
            let md = eval_run(dataset, &engines.options(), out, *stride, |line| {
                println!("{line}");
            })?;
            print!("{md}");
        }
        EvalCommand::Flow { gt, pred, occ, out } => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(gt)
                .with_context(|| format!("cannot list {}", gt.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "flo"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("no .flo files in {}", gt.display());
            }
            let occ_dir = occ.clone().or_else(|| {
                gt.parent()
                    .map(|p| p.join("occ_fwd"))
                    .filter(|p| p.is_dir())
            });
            let mut acc = FlowMetricsAcc::default();
            let mut n = 0;
            for g in &files {
                let name = g.file_name().context("file name")?;
                let p = pred.join(name);
                if !p.exists() {
                    continue;
                }
                let gf = flo::read_flo(g)?;
                let pf = flo::read_flo(&p)?;
                let occ_mask = match &occ_dir {
                    Some(d) => {
                        let op = d.join(Path::new(name).with_extension("png"));
                        image::open(&op).ok().map(|i| {
                            i.to_luma8()
                                .as_raw()
                                .iter()
                                .map(|&v| v > 127)
                                .collect::<Vec<bool>>()
                        })
                    }
                    None => None,
                };
                acc.add(&gf, &pf, None, occ_mask.as_deref())
                    .with_context(|| format!("comparing {}", p.display()))?;
                n += 1;
            }
            if n == 0 {
                bail!(
                    "no predicted flow in {} matches a ground-truth file name",
                    pred.display()
                );
            }
            let json = serde_json::to_string_pretty(
                &serde_json::json!({"frames": n, "metrics": acc.finish()}),
            )?;
            println!("{json}");
            if let Some(o) = out {
                streamrecon::io_util::write_bytes_atomic(o, json.as_bytes())?;
            }
        }
        EvalCommand::Pose {
            gt,
            pred,
            delta,
            max_time_diff,
            out,
        } => {
            let g = tum::read_tum(gt)?;
            let p = tum::read_tum(pred)?;
            let (gts, ests) = associate(&g, &p, *max_time_diff)
                .with_context(|| format!("matching {} to {}", pred.display(), gt.display()))?;
            let m = pose_metrics(&gts, &ests, *delta)?;
            let json = serde_json::to_string_pretty(&m)?;
            println!("{json}");
            if let Some(o) = out {
                streamrecon::io_util::write_bytes_atomic(o, json.as_bytes())?;
            }
        }
    }
    Ok(())
}

/// Per-sequence results of `eval run`.
fn cmd_model(cmd: &ModelCommand) -> Result<()> {
    use streamrecon::models::parity::{load_tensor_spec, vggt_config, vggt_outputs};
    use streamrecon::models::vggt::StreamVggt;
    let (model_config, weights, frames, total_budget, dtype, out) = match cmd {
        ModelCommand::Run {
            model_config,
            weights,
            frames,
            total_budget,
            dtype,
            out,
        } => (model_config, weights, frames, total_budget, dtype, out),
        ModelCommand::Flow {
            model_config,
            weights,
            frames,
            out,
        } => return cmd_model_flow(model_config.as_deref(), weights, frames, out),
    };
    let model = StreamVggt::load_as(
        weights,
        vggt_config(model_config.as_deref())?,
        streamrecon::geometry::vggt::ModelDtype::from(*dtype).dtype(),
    )?;
    let images = load_tensor_spec(frames, "input.images")?;
    let outputs = vggt_outputs(
        &model,
        &images,
        (*total_budget > 0).then_some(*total_budget),
        |f| {
            println!(
                "frame {}: {:.1} ms, kv {:?}, memory {:.2} MiB",
                f.index,
                f.ms,
                f.kv_len,
                f.memory_bytes as f64 / f64::from(1 << 20)
            );
        },
    )
    .with_context(|| format!("the frames {frames}"))?;
    save_tensors(&outputs, out)
}

fn cmd_model_flow(config: Option<&Path>, weights: &Path, frames: &str, out: &Path) -> Result<()> {
    use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
    let config = match config {
        Some(p) => VideoFlowConfig::from_json_file(p)?,
        None => VideoFlowConfig::mof_released(),
    };
    let net = MofNet::load(weights, config)?;
    let images = streamrecon::models::parity::load_tensor_spec(frames, "input.images_u8")?;
    let t0 = std::time::Instant::now();
    let flow = net.forward(&images, &mut |_, _| {})?;
    println!(
        "{} frames {:?}: {:.1} ms",
        images.dim(0)?,
        images.dims(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut outputs = std::collections::HashMap::new();
    outputs.insert("flow".to_string(), flow);
    save_tensors(&outputs, out)
}
