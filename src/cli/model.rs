//! `streamrecon model run|flow`: the parity tools.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;

use streamrecon::pipeline::options::DtypeName;

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
pub(super) fn save_tensors(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    out: &Path,
) -> Result<()> {
    streamrecon::models::weights::save_tensors_atomic(tensors, out)?;
    println!("{} tensors → {}", tensors.len(), out.display());
    Ok(())
}

pub(super) fn cmd_model(cmd: &ModelCommand) -> Result<()> {
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

pub(super) fn cmd_model_flow(
    config: Option<&Path>,
    weights: &Path,
    frames: &str,
    out: &Path,
) -> Result<()> {
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
