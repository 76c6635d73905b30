//! Argument parsing and the subcommands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use streamrecon::datasets::formats::{flo, kitti_flow};
use streamrecon::datasets::layouts::{Layout, LayoutWriter};
use streamrecon::datasets::native::{NativeWriter, SequenceMeta};
use streamrecon::datasets::synth::{
    Degrade, SceneKind, SurfaceSampler, SynthConfig, SynthFrame, SynthWorld, TrajectoryKind,
};
use streamrecon::flow::colorwheel;
use streamrecon::flow::dis::DisPreset;
use streamrecon::pipeline::options::FlowEngineName;
use streamrecon::pipeline::{self, RunOptions, RunOutcome};
use streamrecon::source::{Source, SourceItem, SourceOptions, SourceSpec};

mod eval;
mod flags;
mod model;
mod serve;

use eval::{cmd_eval, EvalCommand};
use flags::{DisFlags, EngineFlags, RerunFlags, SourceFlags, VideoFlowFlags};
use model::{cmd_model, ModelArgs};
use serve::{cmd_serve, cmd_view, cmd_worker, ServeArgs, ViewArgs, WorkerArgs};

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
    /// Run sessions for front doors on NATS (`serve --nats`): claims them through leases, takes
    /// over those of a worker that died.
    Worker(WorkerArgs),
    /// Show a recording (.rrd) in rerun's web viewer in any browser, served by this binary.
    View(ViewArgs),
    /// Run a learned model directly on tensors (parity checks against the reference code).
    Model(ModelArgs),
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
    /// Seconds the run has after SIGINT/SIGTERM to finish the frames in flight and close its
    /// outputs; past that it exits anyway (status 130), saying so in run.json.
    #[arg(long, default_value_t = DEFAULT_STOP_GRACE_S, value_name = "SECONDS")]
    stop_grace: f64,
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
    /// With `--trajectory loop`: this many laps (300 frames each), instead of `--frames`.
    #[arg(long, value_name = "N")]
    laps: Option<usize>,
    /// Image size WxH.
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    size: (u32, u32),
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Degradations, e.g. noise=0.02,shot=0.001,blur=4,exposure=0.2,fog=0.05,jpeg=75,rolling=0.7,
    /// lens=-0.2 (rolling: a rolling shutter's readout, as a fraction of the frame interval;
    /// lens: radial distortion k1, with calibration.yml written beside the frames for
    /// --intrinsics-file).
    #[arg(long, value_parser = Degrade::parse)]
    degrade: Option<Degrade>,
    /// Camera speed along the path: 2 moves twice as far a frame (faster hand-held motion).
    #[arg(long, default_value_t = 1.0, value_parser = parse_speed)]
    speed: f64,
    /// Photographs as the scene's textures (the first materials; up to 10), e.g. opencv-doc's
    /// examples/data/*.jpg: real surfaces instead of procedural patterns.
    #[arg(long, value_name = "IMAGE", num_args = 1..)]
    photos: Vec<PathBuf>,
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

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 100.0 => Ok(v),
        _ => Err(format!("speed must be a number in (0, 100], got {s}")),
    }
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
        Command::Worker(a) => cmd_worker(&a).map(|()| ExitCode::SUCCESS),
        Command::View(a) => cmd_view(&a).map(|()| ExitCode::SUCCESS),
    }
}

/// Seconds a run has after SIGINT/SIGTERM to drain and close its outputs before it exits anyway.
pub(crate) const DEFAULT_STOP_GRACE_S: f64 = 30.0;

/// SIGINT/SIGTERM set the flag; a second signal exits at once, and so does the process when the
/// run has not ended `grace_s` seconds after the first (a frame's work is not interruptible: a
/// large model step can take many seconds). Exiting that way, it records why in `out/run.json`
/// unless the run wrote its own.
fn install_stop_flag(out: Option<&Path>, grace_s: f64) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let run_json = out.map(|o| o.join("run.json"));
    let started = std::time::SystemTime::now();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without draining");
            exit_now(130);
        }
        eprintln!(
            "interrupted: draining the pipeline and closing outputs (interrupt again to abort; \
             exiting anyway in {grace_s:.0} s)"
        );
        let run_json = run_json.clone();
        let _ = std::thread::Builder::new()
            .name("stop-grace".into())
            .spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs_f64(grace_s.max(0.0)));
                let why = format!(
                    "interrupted, and still busy {grace_s:.0} s later: exited without closing \
                     the outputs (files written by then are kept; checkpoints hold the poses)"
                );
                eprintln!("{why}");
                if let Some(p) = run_json.filter(|p| !written_since(p, started)) {
                    let body = serde_json::json!({ "interrupted": true, "error": why });
                    if let Err(e) =
                        streamrecon::io_util::write_bytes_atomic(&p, body.to_string().as_bytes())
                    {
                        eprintln!("and {} could not be written: {e}", p.display());
                    }
                }
                exit_now(130);
            });
    })
    .context("cannot install the signal handler")?;
    Ok(stop)
}

/// Ends the process at once with `code`, while other threads still run. `std::process::exit`
/// would run the C and C++ exit handlers (OpenCV's and others' static destructors) under those
/// threads' feet: about one forced exit in ten ended in a segmentation fault.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    #[allow(unsafe_code)] // `_exit` has no preconditions; libc marks every foreign call unsafe
    // SAFETY: `_exit` only ends the process; nothing in this process runs after it.
    unsafe {
        libc::_exit(code)
    }
}

/// Whether `path` was written after `t`.
fn written_since(path: &Path, t: std::time::SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|m| m >= t)
}

fn print_summary(outcome: &RunOutcome, out: &Path) {
    let s = &outcome.summary;
    println!(
        "{} frames processed ({} read, {} dropped, {} skipped) in {:.1} s: {:.1} fps, peak RSS {:.0} MiB",
        s.frames_processed, s.frames_read, s.frames_dropped, s.frames_skipped, s.wall_s, s.fps, s.peak_rss_mib
    );
    if s.frames_processed == 0 {
        println!("no frame was processed");
    } else if s.frames_tracked == 0 {
        // The engine counts the segments it started; none of them made a map.
        println!(
            "tracked 0 / {} frames: no map was initialised; {} points",
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
    if s.frames_untracked > 0 {
        let why: Vec<String> = s
            .untracked
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        println!(
            "{} frames untracked: {}{}",
            s.frames_untracked,
            why.join("; "),
            match s.frames_orientation_only {
                0 => "; left out of the trajectory files".to_string(),
                n if n == s.frames_untracked => {
                    "; written with an orientation only (the camera turned in place)".into()
                }
                n => format!(
                    "; {n} of them written with an orientation only (the camera turned in \
                     place), the others left out of the trajectory files"
                ),
            }
        );
    }
    match &s.outputs {
        Some(o) => println!("{}", o.describe()),
        None => println!("outputs: {}", out.display()),
    }
}

fn cmd_run(a: &RunArgs) -> Result<ExitCode> {
    // Options first: a bad flag is refused before the source is opened.
    let config = a.engines.pipeline_config(
        Some(&a.source_flags),
        Some(a.out.clone()),
        a.rerun.target(),
        true,
    )?;
    let spec = SourceSpec::parse(&a.source)?;
    let source = Source::open(&spec, a.source_flags.options())?;
    let stop = install_stop_flag(Some(&a.out), a.stop_grace)?;
    let outcome = pipeline::run(source, &config, &stop)?;
    print_summary(&outcome, &a.out);
    failed_run(outcome, "the run failed")
}

/// The run's error, if any, with what was written named (the summary's last line already says
/// it; the error's line is the one a script sees last).
fn failed_run(outcome: RunOutcome, what: &str) -> Result<ExitCode> {
    let Some(e) = outcome.error else {
        return Ok(ExitCode::SUCCESS);
    };
    let context = match &outcome.summary.outputs {
        Some(o) => format!("{what}; {}", o.describe()),
        None => what.to_string(),
    };
    Err(anyhow::Error::new(e).context(context))
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
    if let Some(yaml) = world.calibration_yaml() {
        std::fs::write(out.join("calibration.yml"), yaml)?;
    }
    let sampler = render_into(&world, |f| Ok(writer.write_frame(f)?))?;
    let meta = SequenceMeta {
        generator: format!("streamrecon {}", env!("CARGO_PKG_VERSION")),
        frames: config.frames,
        fps: config.fps,
        jump_frames: world.jump_frames(),
        config: serde_json::to_value(config)?,
    };
    writer.finish(&sampler.cloud(), &meta)?;
    Ok(())
}

fn cmd_synth(a: &SynthArgs) -> Result<()> {
    let frames = match a.laps {
        Some(n) if a.trajectory == TrajectoryKind::Loop && n > 0 => {
            n * streamrecon::datasets::synth::trajectory::LOOP_FRAMES
        }
        Some(n) => bail!("--laps {n}: laps are of --trajectory loop, at least one"),
        None => a.frames,
    };
    let config = SynthConfig {
        scene: a.scene,
        trajectory: a.trajectory,
        frames,
        width: a.size.0,
        height: a.size.1,
        seed: a.seed,
        degrade: a.degrade.unwrap_or_default(),
        flow: !a.no_flow && matches!(a.format, Layout::Native | Layout::Sintel | Layout::Kitti),
        photos: a.photos.clone(),
        speed: a.speed,
        ..SynthConfig::default()
    };
    // A photo that does not read is refused before anything is rendered.
    streamrecon::datasets::synth::read_photos(&a.photos).map_err(anyhow::Error::msg)?;
    if a.no_flow && a.format == Layout::Kitti {
        bail!("the kitti layout is made of flow pairs; --no-flow leaves nothing to write");
    }
    let t = std::time::Instant::now();
    write_layout(&config, &a.out, a.format)?;
    println!(
        "wrote {} frames to {} in {:.1} s",
        frames,
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
    let stop = install_stop_flag(Some(&run_dir), DEFAULT_STOP_GRACE_S)?;
    let outcome = pipeline::run(source, &config, &stop)?;
    print_summary(&outcome, &run_dir);
    println!("3/3 accuracy against the ground truth");
    let report = streamrecon::eval::report::accuracy_report(&seq, &run_dir, &outcome)?;
    println!("{report}");
    if let Some(p) = &rerun.save {
        println!(
            "view the recording in a browser: streamrecon view {0}\n\
             or in rerun's native viewer: pip install rerun-sdk==0.36.3 && rerun {0}",
            p.display()
        );
    }
    failed_run(outcome, "the demo run failed")
}

fn cmd_flow(a: &FlowArgs) -> Result<ExitCode> {
    let mut options = RunOptions {
        flow: a.engine,
        preset: a.preset,
        ..RunOptions::default()
    };
    a.dis.apply(&mut options);
    a.videoflow.apply(&mut options);
    a.source_flags.apply(&mut options);
    options.validate()?;
    let spec = SourceSpec::parse(&a.source)?;
    let mut source = Source::open(&spec, a.source_flags.options())?;
    let mut engine = options.flow_choice()?.engine()?;
    streamrecon::io_util::create_dir(&a.out)?;
    if a.backward {
        streamrecon::io_util::create_dir(&a.out.join("bwd"))?;
    }
    let stop = install_stop_flag(None, DEFAULT_STOP_GRACE_S)?;
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
