//! `streamrecon model run|flow`: the parity tools; `model bench`: speed and memory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use streamrecon::pipeline::options::{DeviceName, DtypeName};

#[derive(Args)]
pub(super) struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
    /// Where the model computes: cpu, cuda or cuda:N (a build with `--features cuda` and an
    /// NVIDIA GPU).
    #[arg(
        long,
        global = true,
        default_value = "cpu",
        value_name = "cpu|cuda[:N]"
    )]
    device: DeviceName,
}

#[derive(Subcommand)]
pub(super) enum ModelCommand {
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
    /// Run a learned flow model on the frames of a safetensors tensor `[N, 3, H, W]` (0..255, any
    /// dtype) and write `flow`: VideoFlow-MOF gives `[2(N−2), 2, H, W]` (forward flows of the
    /// middle frames, then their backward flows), StreamFlow `[T−1, 2, H, W]` (frame t to t+1).
    Flow {
        /// The model [default: streamflow when --model-config describes StreamFlow, else
        /// videoflow].
        #[arg(long, value_enum)]
        arch: Option<FlowArch>,
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
    /// Speed and peak memory of a learned engine on synthetic frames (random weights unless
    /// `--weights`): frames/s and ms at frames 1–5 / 25–30 / 55–60 for vggt, seconds per window
    /// for videoflow. Size your hardware with it.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
pub(super) enum BenchCommand {
    /// One stream through StreamVGGT / InfiniteVGGT.
    Vggt {
        /// `small` (issue 28's comparison config), `vggt-1b` (the official model) or a config JSON.
        #[arg(long, default_value = "small", value_name = "small|vggt-1b|PATH.json")]
        config: String,
        /// Weights for that config (default: random, seed 0).
        #[arg(long, value_name = "PATH")]
        weights: Option<PathBuf>,
        /// Frame size, multiples of the patch size (14).
        #[arg(long, default_value = "224x224", value_name = "WxH")]
        size: String,
        #[arg(long, default_value_t = 60)]
        frames: usize,
        /// Total KV-cache token budget (0 = no pruning).
        #[arg(long, default_value_t = streamrecon::models::vggt::DEFAULT_TOTAL_BUDGET)]
        total_budget: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One window of T frames through StreamFlow (forward flows only, as the reference runs).
    Streamflow {
        /// `full` (the released config: T = 4, 15 iterations) or a config JSON.
        #[arg(long, default_value = "full", value_name = "full|PATH.json")]
        config: String,
        #[arg(long, value_name = "PATH")]
        weights: Option<PathBuf>,
        #[arg(long, default_value = "448x256", value_name = "WxH")]
        size: String,
        /// Refinement iterations (default: the config's).
        #[arg(long)]
        iters: Option<usize>,
        /// Windows to run; with more than one, the first is a warm-up and not timed.
        #[arg(long, default_value_t = 1)]
        windows: usize,
        #[arg(long)]
        json: bool,
    },
    /// Windows of frames through VideoFlow-MOF.
    Videoflow {
        /// `full` (the released config) or a config JSON.
        #[arg(long, default_value = "full", value_name = "full|PATH.json")]
        config: String,
        #[arg(long, value_name = "PATH")]
        weights: Option<PathBuf>,
        #[arg(long, default_value = "448x256", value_name = "WxH")]
        size: String,
        /// Frames per window (≥ 3).
        #[arg(long, default_value_t = 5)]
        window: usize,
        /// Refinement iterations (default: the config's).
        #[arg(long)]
        iters: Option<usize>,
        /// Windows to run; with more than one, the first is a warm-up and not timed.
        #[arg(long, default_value_t = 1)]
        windows: usize,
        #[arg(long)]
        json: bool,
    },
}

/// The learned flow models `model flow` runs.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum FlowArch {
    Videoflow,
    Streamflow,
}

/// Writes named tensors atomically.
pub(super) fn save_tensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    out: &Path,
) -> Result<()> {
    streamrecon::models::weights::save_tensors_atomic(tensors, out)?;
    println!("{} tensors → {}", tensors.len(), out.display());
    Ok(())
}

pub(super) fn cmd_model(args: &ModelArgs) -> Result<()> {
    use streamrecon::models::parity::{load_tensor_spec, vggt_config, vggt_outputs};
    use streamrecon::models::vggt::StreamVggt;
    args.device.check()?;
    let cmd = &args.command;
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
            arch,
            model_config,
            weights,
            frames,
            out,
        } => return cmd_model_flow(*arch, model_config.as_deref(), weights, frames, out),
        ModelCommand::Bench(b) => return cmd_model_bench(b),
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

pub(super) fn cmd_model_flow(
    arch: Option<FlowArch>,
    config: Option<&Path>,
    weights: &Path,
    frames: &str,
    out: &Path,
) -> Result<()> {
    use streamrecon::models::streamflow::{StreamFlow, StreamFlowConfig};
    use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
    let arch = arch.unwrap_or(match config {
        Some(p) if StreamFlowConfig::describes(p) => FlowArch::Streamflow,
        _ => FlowArch::Videoflow,
    });
    let images = streamrecon::models::parity::load_tensor_spec(frames, "input.images_u8")?;
    let t0 = std::time::Instant::now();
    let flow = match arch {
        FlowArch::Videoflow => {
            let config = match config {
                Some(p) => VideoFlowConfig::from_json_file(p)?,
                None => VideoFlowConfig::mof_released(),
            };
            MofNet::load(weights, config)?.forward(&images, None)
        }
        FlowArch::Streamflow => {
            let config = match config {
                Some(p) => StreamFlowConfig::from_json_file(p)?,
                None => StreamFlowConfig::released(),
            };
            StreamFlow::load(weights, config)?.forward(&images, None)
        }
    }
    .with_context(|| format!("the frames {frames}"))?;
    println!(
        "{} frames {:?}: {:.1} ms with loading",
        images.dim(0)?,
        images.dims(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut outputs = std::collections::HashMap::new();
    outputs.insert("flow".to_string(), flow);
    save_tensors(&outputs, out)
}

/// `WxH` → `(w, h)`.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(['x', '×'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some((w, h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => anyhow::bail!("--size {s:?}: expected WxH, e.g. 224x224"),
    }
}

fn cmd_model_bench(cmd: &BenchCommand) -> Result<()> {
    use streamrecon::models::bench;
    use streamrecon::models::streamflow::{StreamFlow, StreamFlowConfig};
    use streamrecon::models::vggt::{StreamVggt, VggtConfig};
    use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
    use streamrecon::models::weights::Weights;
    let weights = |path: &Option<PathBuf>| -> Result<Weights> {
        Ok(match path {
            Some(p) => Weights::load(p, candle_core::DType::F32)?,
            None => Weights::random(0, candle_core::DType::F32),
        })
    };
    let threads = rayon::current_num_threads();
    match cmd {
        BenchCommand::Vggt {
            config,
            weights: path,
            size,
            frames,
            total_budget,
            json,
        } => {
            let cfg = match config.as_str() {
                "small" => VggtConfig::small(),
                "vggt-1b" => VggtConfig::vggt_1b(),
                p => VggtConfig::from_json_file(Path::new(p))?,
            };
            let (w, h) = parse_size(size)?;
            let model = StreamVggt::new(&weights(path)?, cfg)?;
            let budget = (*total_budget > 0).then_some(*total_budget);
            if !json {
                println!(
                    "vggt {config}, {w}×{h}, {} tokens/frame, {frames} frames, budget {}, {threads} threads",
                    model.config.tokens_per_frame(h, w),
                    budget.map_or("none".to_string(), |b| b.to_string())
                );
            }
            let r = bench::bench_vggt(&model, (w, h), *frames, budget, &mut |i, ms| {
                if !json {
                    println!("frame {}: {ms:.1} ms", i + 1);
                }
            })?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                println!(
                    "{:.3} frames/s; ms at frames 1–5 / 25–30 / 55–60: {} / {} / {}; \
                     stages (aggregator, camera, depth, points) {:.1} / {:.1} / {:.1} / {:.1} ms; \
                     cache {} tokens/layer; peak RSS {:.0} MiB",
                    r.fps,
                    f(r.ms_first),
                    f(r.ms_mid),
                    f(r.ms_last),
                    r.stage_ms[0],
                    r.stage_ms[1],
                    r.stage_ms[2],
                    r.stage_ms[3],
                    r.kv_len_last,
                    r.peak_rss_mib
                );
            }
        }
        BenchCommand::Videoflow {
            config,
            weights: path,
            size,
            window,
            iters,
            windows,
            json,
        } => {
            let mut cfg = match config.as_str() {
                "full" => VideoFlowConfig::mof_released(),
                p => VideoFlowConfig::from_json_file(Path::new(p))?,
            };
            if let Some(n) = iters {
                cfg.mof.decoder_depth = *n;
            }
            anyhow::ensure!(
                *window >= 3,
                "--window {window}: VideoFlow-MOF needs at least 3 frames"
            );
            let (w, h) = parse_size(size)?;
            let net = MofNet::new(&weights(path)?, cfg)?;
            if !json {
                println!(
                    "videoflow {config}, {window}×{w}×{h}, {} iterations, {threads} threads",
                    net.config.mof.decoder_depth
                );
            }
            bench_flow(
                &|x| net.forward(x, None),
                &bench::videoflow_window(*window, h, w)?,
                net.config.mof.decoder_depth,
                window.saturating_sub(3).max(1),
                *windows,
                *json,
            )?;
        }
        BenchCommand::Streamflow {
            config,
            weights: path,
            size,
            iters,
            windows,
            json,
        } => {
            let mut cfg = match config.as_str() {
                "full" => StreamFlowConfig::released(),
                p => StreamFlowConfig::from_json_file(Path::new(p))?,
            };
            if let Some(n) = iters {
                anyhow::ensure!(*n >= 1, "--iters {n}: at least 1");
                cfg.args.iters = *n;
            }
            let (w, h) = parse_size(size)?;
            let net = StreamFlow::new(&weights(path)?, cfg)?;
            let t = net.frames();
            net.check_input(&[t, 3, h, w])
                .with_context(|| format!("--size {size}"))?;
            if !json {
                println!(
                    "streamflow {config}, {t}×{w}×{h}, {} iterations, {threads} threads",
                    net.config.args.iters
                );
            }
            bench_flow(
                &|x| net.forward(x, None),
                &bench::videoflow_window(t, h, w)?,
                net.config.args.iters,
                t - 1,
                *windows,
                *json,
            )?;
        }
    }
    Ok(())
}

/// Times `windows` passes of a flow model over `frames` and prints what `model bench` prints
/// (one JSON object with `json`).
fn bench_flow(
    forward: &dyn Fn(&candle_core::Tensor) -> streamrecon::error::Result<candle_core::Tensor>,
    frames: &candle_core::Tensor,
    iters: usize,
    new_pairs: usize,
    windows: usize,
    json: bool,
) -> Result<()> {
    let r = streamrecon::models::bench::bench_flow_window(
        forward,
        frames,
        iters,
        new_pairs,
        windows,
        &mut |k, s| {
            if !json {
                println!("window {}: {s:.2} s", k + 1);
            }
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:.2} s per window ({} timed), {:.2} s per new pair; peak RSS {:.0} MiB",
            r.s_per_window, r.windows, r.s_per_pair, r.peak_rss_mib
        );
    }
    Ok(())
}
