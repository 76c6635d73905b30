//! The parity tools behind `streamrecon model run` and `model flow`: a model's raw outputs for
//! frames given as a tensor, under the names the reference fixtures use, to compare with the
//! reference code's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use streamrecon_core::error::{Error, Result};

use crate::vggt::StreamVggt;

/// A tensor named by `FILE.safetensors[:TENSOR]` (`default_name` without `:TENSOR`), as f32.
///
/// # Errors
/// The file cannot be read, is not safetensors, or has no such tensor.
pub fn load_tensor_spec(spec: &str, default_name: &str) -> Result<Tensor> {
    // The last ':' separates the tensor name unless what follows looks like a path.
    let (file, name) = match spec.rsplit_once(':') {
        Some((f, n)) if !n.contains(['/', '\\']) && !f.is_empty() => (PathBuf::from(f), n),
        _ => (PathBuf::from(spec), default_name),
    };
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::format(&file, format!("not a safetensors file ({e})")))?;
    let t = tensors
        .get(name)
        .ok_or_else(|| Error::format(&file, format!("no tensor `{name}`")))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// What one frame of [`vggt_outputs`] cost and left in memory.
pub struct VggtFrameReport {
    pub index: usize,
    pub ms: f64,
    /// Cached tokens per global layer.
    pub kv_len: Vec<usize>,
    /// Bytes of the stream's memory.
    pub memory_bytes: usize,
}

/// Streams `images` `[S, 3, H, W]` (RGB in [0, 1]) through `model` and returns every per-frame
/// output as the fixtures name it (`frame{i}.depth`, `frame{i}.kv_len.layer{l}`, …), as f32
/// (counts and ids as i64). `on_frame` hears each frame's cost.
///
/// # Errors
/// Frames that are not `[S, 3, H, W]`, or a model failure.
pub fn vggt_outputs(
    model: &StreamVggt,
    images: &Tensor,
    total_budget: Option<usize>,
    mut on_frame: impl FnMut(&VggtFrameReport),
) -> Result<HashMap<String, Tensor>> {
    let dims = images.dims().to_vec();
    if dims.len() != 4 || dims[1] != 3 {
        return Err(Error::Invalid(format!(
            "the frames must be [S, 3, H, W], got {dims:?}"
        )));
    }
    let mut memory = model.new_stream(total_budget);
    let mut outputs = HashMap::new();
    let dev = Device::Cpu;
    let ints = |v: Vec<i64>| Tensor::new(v.as_slice(), &dev);
    let f32s = |t: Tensor| t.to_dtype(DType::F32);
    for i in 0..dims[0] {
        let t0 = std::time::Instant::now();
        let frame = images.get(i)?.unsqueeze(0)?;
        let o = model.step(&frame, i, &mut memory, &mut |_, _| {})?;
        let p = format!("frame{i}");
        outputs.insert(
            format!("{p}.pose_enc"),
            Tensor::new(o.pose_enc.as_slice(), &dev)?.unsqueeze(0)?,
        );
        outputs.insert(format!("{p}.pose_enc_iters"), f32s(o.pose_enc_iters)?);
        outputs.insert(format!("{p}.depth"), f32s(o.depth)?);
        outputs.insert(format!("{p}.depth_conf"), f32s(o.depth_conf)?);
        outputs.insert(format!("{p}.world_points"), f32s(o.world_points)?);
        outputs.insert(format!("{p}.world_points_conf"), f32s(o.world_points_conf)?);
        outputs.insert(format!("{p}.budget"), ints(o.budgets.clone())?);
        outputs.insert(
            format!("{p}.last_scores"),
            Tensor::new(memory.last_scores.as_slice(), &dev)?,
        );
        for (l, len) in o.kv_len.iter().enumerate() {
            outputs.insert(format!("{p}.kv_len.layer{l}"), ints(vec![*len as i64])?);
            let ids = memory.global_layer(l)?.ids();
            let (heads, n) = (ids.len(), ids.first().map_or(0, Vec::len));
            outputs.insert(
                format!("{p}.kept_ids.layer{l}"),
                Tensor::from_vec(ids.concat(), (1, heads, n), &dev)?,
            );
        }
        for (l, len) in o.camera_kv_len.iter().enumerate() {
            outputs.insert(
                format!("{p}.camera_kv_len.layer{l}"),
                ints(vec![*len as i64])?,
            );
        }
        on_frame(&VggtFrameReport {
            index: i,
            ms: t0.elapsed().as_secs_f64() * 1e3,
            kv_len: o.kv_len.clone(),
            memory_bytes: memory.bytes(),
        });
    }
    Ok(outputs)
}

/// The vggt model config from a JSON file (fixture-style `model_config`, or bare), or the
/// official VGGT-1B sizes.
///
/// # Errors
/// The file cannot be read or parsed.
pub fn vggt_config(path: Option<&Path>) -> Result<crate::vggt::VggtConfig> {
    match path {
        Some(p) => crate::vggt::VggtConfig::from_json_file(p),
        None => Ok(crate::vggt::VggtConfig::vggt_1b()),
    }
}
