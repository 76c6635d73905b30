//! The learned geometry engine `vggt`: StreamVGGT/InfiniteVGGT one frame at a time, its outputs
//! mapped back to the frame's own resolution for the rest of the pipeline.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;

use super::novelty::{NoveltyConfig, NoveltyMeter};
use super::{FrameGeometry, GeometryEngine, GeometryStats, MemoryReadout};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{Frame, Intrinsics};
use streamrecon_flow::PairFlow;
use streamrecon_models::vggt::memory::{CameraCache, MemoryUpdate};
use streamrecon_models::vggt::{pose, preprocess, StreamMemory, StreamVggt, VggtConfig};
use streamrecon_models::weights::save_tensors_atomic;

/// How to build the engine.
#[derive(Debug, Clone, Serialize)]
pub struct VggtEngineConfig {
    pub weights: PathBuf,
    /// Model sizes; the official VGGT-1B/StreamVGGT preset when `None`.
    pub model_config: Option<PathBuf>,
    /// Total KV-cache token budget over the global layers (`None`: no pruning).
    pub total_budget: Option<usize>,
    /// Camera-head cache bound.
    pub camera_cache: CameraCache,
    /// Compute precision.
    pub dtype: ModelDtype,
    /// How frames enter the memory (uniform = the reference).
    pub update: MemoryUpdate,
}

/// Compute precision of a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum ModelDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl ModelDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

pub struct VggtEngine {
    model: StreamVggt,
    memory: StreamMemory,
    total_budget: Option<usize>,
    camera_cache: CameraCache,
    update: MemoryUpdate,
    novelty: NoveltyMeter,
    next_index: usize,
}

/// The engine's part of a snapshot.
#[derive(Serialize, serde::Deserialize)]
struct EngineState {
    next_index: usize,
    next_source_index: u64,
    /// Model sizes, to refuse a snapshot of another model.
    tokens_per_frame: Option<usize>,
    embed_dim: usize,
}

/// Where the model's image sits in the frame: scale per axis and the rows cropped away.
struct Placement {
    sx: f64,
    sy: f64,
    top: f64,
}

impl VggtEngine {
    /// Loads the model.
    ///
    /// # Errors
    /// Unreadable config or weights, or weights that do not fit the config.
    pub fn new(cfg: &VggtEngineConfig) -> Result<Self> {
        let config = match &cfg.model_config {
            Some(p) => VggtConfig::from_json_file(p)?,
            None => VggtConfig::vggt_1b(),
        };
        let model = StreamVggt::load_as(&cfg.weights, config, cfg.dtype.dtype())?;
        let mut engine = Self::from_model(model, cfg.total_budget, cfg.camera_cache);
        engine.set_update(cfg.update);
        Ok(engine)
    }

    /// Switches between uniform (reference) and pose-adaptive memory updates.
    pub fn set_update(&mut self, update: MemoryUpdate) {
        self.update = update;
        self.memory.update = update;
    }

    pub fn from_model(
        model: StreamVggt,
        total_budget: Option<usize>,
        camera_cache: CameraCache,
    ) -> Self {
        let mut memory = model.new_stream(total_budget);
        memory.camera_cache = camera_cache;
        Self {
            model,
            memory,
            total_budget,
            camera_cache,
            update: MemoryUpdate::Uniform,
            novelty: NoveltyMeter::new(NoveltyConfig::default()),
            next_index: 0,
        }
    }

    /// Starts a new stream (all caches and pruning state cleared).
    pub fn reset(&mut self) {
        self.memory = self.model.new_stream(self.total_budget);
        self.memory.camera_cache = self.camera_cache;
        self.memory.update = self.update;
        self.novelty.reset();
        self.next_index = 0;
    }

    pub fn memory(&self) -> &StreamMemory {
        &self.memory
    }
}

impl GeometryEngine for VggtEngine {
    fn name(&self) -> &'static str {
        "vggt"
    }

    fn push(&mut self, frame: &Frame, flow: Option<&PairFlow>) -> Result<Vec<FrameGeometry>> {
        let (fw, fh) = (frame.image.width() as usize, frame.image.height() as usize);
        // Novelty from what is known before inference: flow parallax, appearance, sharpness.
        let novelty = if matches!(self.update, MemoryUpdate::Adaptive { .. }) {
            let parallax = flow.and_then(median_confident_flow);
            Some(self.novelty.weigh(&frame.image, None, parallax)?)
        } else {
            None
        };
        self.memory.novelty = novelty.as_ref().map(|(n, _)| n.weight as f32);
        let cfg = &self.model.config;
        let input = preprocess::preprocess_crop(&frame.image, cfg.img_size, cfg.patch_size)
            .map_err(|e| Error::Geometry(format!("frame {}: {e}", frame.index)))?;
        let out = self
            .model
            .step(&input, self.next_index, &mut self.memory, &mut |_, _| {})
            .map_err(|e| Error::Geometry(format!("frame {}: {e}", frame.index)))?;
        self.next_index += 1;
        let admitted = self.memory.last_admitted;
        if let Some((n, thumb)) = novelty.clone() {
            if admitted {
                self.novelty.admit(None, thumb, n.hf_ratio);
            }
        }
        let (mh, mw) = (out.height, out.width);
        let resized_h = preprocess::crop_mode_height(fw, fh, cfg.img_size, cfg.patch_size);
        let place = Placement {
            sx: fw as f64 / mw as f64,
            sy: fh as f64 / resized_h as f64,
            top: ((resized_h.saturating_sub(mh)) / 2) as f64,
        };
        let k_model = pose::intrinsics_from_pose_enc(&out.pose_enc, mh, mw);
        let intrinsics = Intrinsics {
            fx: k_model.fx * place.sx,
            fy: k_model.fy * place.sy,
            cx: (k_model.cx + 0.5) * place.sx - 0.5,
            cy: (k_model.cy + place.top + 0.5) * place.sy - 0.5,
            width: fw as u32,
            height: fh as u32,
        };
        let depth = to_frame_grid(&out.depth, mh, mw, fh, fw, &place, |d| d)?;
        // 1 + exp(x) ∈ (1, ∞) → (0, 1).
        let confidence = to_frame_grid(&out.depth_conf, mh, mw, fh, fw, &place, |c| {
            if c > 0.0 {
                1.0 - 1.0 / c
            } else {
                0.0
            }
        })?;
        let cam_from_world = pose::cam_from_world(&out.pose_enc);
        let memory = MemoryReadout {
            tokens_per_layer: out.kv_len.clone(),
            camera_entries: out.camera_kv_len.first().copied().unwrap_or(0),
            bytes: self.memory.bytes(),
            allocated_bytes: self.memory.allocated_bytes(),
            budgets: if self.total_budget.is_some() {
                out.budgets.clone()
            } else {
                Vec::new()
            },
            model_ms: out.ms,
            novelty: novelty.map(|(n, _)| n.weight),
            admitted,
        };
        Ok(vec![FrameGeometry {
            index: frame.index,
            timestamp: frame.timestamp,
            world_from_cam: cam_from_world.inverse(),
            intrinsics,
            depth: Some(depth),
            confidence: Some(confidence),
            stats: GeometryStats {
                tracked: true,
                keyframe: true,
                segment: 0,
                tracked_points: out.kv_len.first().copied().unwrap_or(0),
                reprojection_median_px: None,
                ..GeometryStats::default()
            },
            memory: Some(memory),
        }])
    }

    fn flush(&mut self) -> Result<Vec<FrameGeometry>> {
        Ok(Vec::new())
    }

    fn segments(&self) -> u32 {
        1
    }

    fn snapshot(
        &self,
        path: &Path,
        next_source_index: u64,
        _last_frame: Option<&Frame>,
    ) -> Result<bool> {
        let state = EngineState {
            next_index: self.next_index,
            next_source_index,
            tokens_per_frame: self.memory.tokens_per_frame,
            embed_dim: self.model.config.aggregator.embed_dim,
        };
        let owner = serde_json::to_value(&state).map_err(|e| Error::Geometry(e.to_string()))?;
        let tensors = self.memory.to_tensors(owner)?;
        save_tensors_atomic(&tensors, path)?;
        Ok(true)
    }

    fn restore(&mut self, path: &Path) -> Result<u64> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|e| Error::format(path, format!("snapshot: {e}")))?;
        let (memory, owner) = StreamMemory::from_tensors(
            &tensors,
            self.model.config.aggregator.depth,
            self.model.config.camera_head.trunk_depth,
        )
        .map_err(|e| Error::format(path, e.to_string()))?;
        let state: EngineState = serde_json::from_value(owner)
            .map_err(|e| Error::format(path, format!("snapshot engine state: {e}")))?;
        if state.embed_dim != self.model.config.aggregator.embed_dim {
            return Err(Error::format(path, "snapshot of a model of another size"));
        }
        self.memory = memory;
        self.total_budget = self.memory.total_budget;
        self.camera_cache = self.memory.camera_cache;
        self.next_index = state.next_index;
        Ok(state.next_source_index)
    }
}

/// Nearest-neighbour resampling of a model-resolution map to the frame's pixels (rows the crop
/// removed get 0 = unknown).
fn to_frame_grid(
    t: &Tensor,
    mh: usize,
    mw: usize,
    fh: usize,
    fw: usize,
    place: &Placement,
    map: impl Fn(f32) -> f32,
) -> Result<Vec<f32>> {
    let v: Vec<f32> = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let mut out = vec![0f32; fh * fw];
    let cols: Vec<Option<usize>> = (0..fw)
        .map(|x| {
            let u = ((x as f64 + 0.5) / place.sx - 0.5).round();
            (u >= 0.0 && u < mw as f64).then_some(u as usize)
        })
        .collect();
    for y in 0..fh {
        let r = ((y as f64 + 0.5) / place.sy - 0.5 - place.top).round();
        if r < 0.0 || r >= mh as f64 {
            continue;
        }
        let row = r as usize * mw;
        for (x, c) in cols.iter().enumerate() {
            if let Some(c) = c {
                let d = v[row + c];
                out[y * fw + x] = if d.is_finite() { map(d) } else { 0.0 };
            }
        }
    }
    Ok(out)
}

/// Median flow magnitude over confident pixels (> 0.5) of the pair's forward flow.
fn median_confident_flow(p: &PairFlow) -> Option<f64> {
    let mut mags: Vec<f32> = p
        .fwd
        .data
        .chunks_exact(2)
        .zip(&p.fwd_conf)
        .filter(|(_, c)| **c > 0.5)
        .map(|(uv, _)| (uv[0] * uv[0] + uv[1] * uv[1]).sqrt())
        .collect();
    if mags.is_empty() {
        return None;
    }
    let mid = mags.len() / 2;
    let (_, m, _) = mags.select_nth_unstable_by(mid, f32::total_cmp);
    Some(f64::from(*m))
}
