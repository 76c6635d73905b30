//! The StreamVGGT / InfiniteVGGT geometry model (`models/streamvggt.py`), one frame at a time.
//!
//! Module tree and weight names follow the official checkpoint: `aggregator.*`
//! ([`aggregator::Aggregator`] with its DINOv2 `patch_embed`), `camera_head.*`, `depth_head.*`,
//! `point_head.*` (the track head is skipped). Per-stream state lives in [`memory::StreamMemory`];
//! the model itself is immutable and can serve several streams.

pub mod aggregator;
pub mod camera_head;
pub mod config;
pub mod dino;
pub mod dpt_head;
pub mod layers;
pub mod memory;
pub mod pose;
pub mod preprocess;

use std::path::Path;

use candle_core::{DType, Tensor};

pub use config::VggtConfig;
pub use memory::{StreamMemory, DEFAULT_TOTAL_BUDGET};

use crate::weights::Weights;
use streamrecon_core::error::{Error, Result};

/// The full model.
pub struct StreamVggt {
    pub aggregator: aggregator::Aggregator,
    pub camera_head: camera_head::CameraHead,
    pub depth_head: dpt_head::DptHead,
    pub point_head: dpt_head::DptHead,
    pub config: VggtConfig,
    /// Compute dtype (f32 by default; f16/bf16 halve the memory, meant for GPUs).
    pub dtype: DType,
}

/// Everything the model says about one frame, at model resolution.
pub struct FrameOutput {
    pub frame_index: usize,
    /// `[9]`: T, quaternion XYZW, FoV h, FoV w (last refinement iteration).
    pub pose_enc: Vec<f32>,
    /// `[iterations, 1, 1, 9]`.
    pub pose_enc_iters: Tensor,
    /// `[1, H, W, 1]`.
    pub depth: Tensor,
    /// `[1, H, W]`.
    pub depth_conf: Tensor,
    /// `[1, H, W, 3]`.
    pub world_points: Tensor,
    /// `[1, H, W]`.
    pub world_points_conf: Tensor,
    /// `[1, 1, P, 2E]`: the last block's tokens (camera-head input).
    pub tokens_last: Tensor,
    /// Global-attention cache length per aggregator layer after this frame.
    pub kv_len: Vec<usize>,
    /// Camera-trunk cache length per block after this frame.
    pub camera_kv_len: Vec<usize>,
    /// Per-layer budgets used for this frame.
    pub budgets: Vec<i64>,
    pub height: usize,
    pub width: usize,
    /// Milliseconds spent in the aggregator, camera head, depth head and point head (the two
    /// heads run side by side, so their times overlap).
    pub stage_ms: [f64; 4],
    /// Milliseconds the whole step took.
    pub ms: f64,
}

impl StreamVggt {
    /// Builds the model from a checkpoint, accounting for every tensor (the track head may be
    /// skipped, with a warning).
    ///
    /// # Errors
    /// Missing, misshapen or unexpected tensors, naming the first ones.
    pub fn new(weights: &Weights, config: VggtConfig) -> Result<Self> {
        config.validate().map_err(Error::Model)?;
        if weights.dtype() == DType::BF16 {
            // candle's CPU backend has no bf16 matmul; this build has no GPU backend.
            return Err(Error::Model(
                "bf16 needs a GPU backend, which this build does not have: use f32 (or f16)".into(),
            ));
        }
        let model = Self {
            aggregator: aggregator::Aggregator::new(&weights.pp("aggregator"), &config)?,
            camera_head: camera_head::CameraHead::new(&weights.pp("camera_head"), &config)?,
            depth_head: dpt_head::DptHead::new(
                &weights.pp("depth_head"),
                &config.depth_head,
                config.patch_size,
            )?,
            point_head: dpt_head::DptHead::new(
                &weights.pp("point_head"),
                &config.point_head,
                config.patch_size,
            )?,
            config,
            dtype: weights.dtype(),
        };
        weights.finish(&["track_head."])?;
        Ok(model)
    }

    /// Loads `.safetensors` or `.pth` weights for `config` (f32 on the CPU).
    ///
    /// # Errors
    /// As [`Weights::load`] and [`Self::new`].
    pub fn load(path: &Path, config: VggtConfig) -> Result<Self> {
        Self::load_as(path, config, DType::F32)
    }

    /// As [`Self::load`], computing in `dtype`.
    ///
    /// # Errors
    /// As [`Weights::load`] and [`Self::new`].
    pub fn load_as(path: &Path, config: VggtConfig, dtype: DType) -> Result<Self> {
        Self::new(&Weights::load(path, dtype)?, config)
    }

    /// A fresh stream state for this model.
    pub fn new_stream(&self, total_budget: Option<usize>) -> StreamMemory {
        StreamMemory::new(
            self.aggregator.depth(),
            self.config.camera_head.trunk_depth,
            total_budget,
        )
    }

    /// Runs frame `frame_index` (`image [1, 3, H, W]` in [0, 1]) of the stream whose state is
    /// `memory`. `taps` sees named intermediates (for parity debugging; pass a no-op otherwise).
    ///
    /// # Errors
    /// A frame of the wrong shape, or a tensor op failure.
    pub fn step(
        &self,
        image: &Tensor,
        frame_index: usize,
        memory: &mut StreamMemory,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<FrameOutput> {
        let (b, c, h, w) = image.dims4().map_err(|_| {
            Error::Model(format!(
                "frame must be [1, 3, H, W], got {:?}",
                image.dims()
            ))
        })?;
        if b != 1 || c != 3 {
            return Err(Error::Model(format!(
                "frame must be [1, 3, H, W], got {:?}",
                image.dims()
            )));
        }
        let image = &image.to_dtype(self.dtype)?;
        let p = self.config.tokens_per_frame(h, w);
        if let Some(first) = memory.tokens_per_frame.filter(|&t| t != p) {
            return Err(Error::Model(format!(
                "frame {frame_index} is {w}×{h} ({p} tokens); this stream started with {first} tokens per frame"
            )));
        }
        let clock = std::time::Instant::now();
        let mut lap = {
            let mut last = clock;
            move || {
                let now = std::time::Instant::now();
                let ms = (now - last).as_secs_f64() * 1e3;
                last = now;
                ms
            }
        };
        let tokens = self.aggregator.forward(image, frame_index, memory, taps)?;
        let agg_ms = lap();
        let last = tokens
            .last()
            .ok_or_else(|| Error::Model("aggregator has no blocks".into()))?;
        let iters = self.camera_head.forward(last, frame_index, memory, taps)?;
        let cam_ms = lap();
        let pse = self.aggregator.patch_start_idx();
        // The two DPT heads read the same tokens and nothing of each other: they run side by
        // side (each head alone leaves a core idle in its serial stretches). Their taps are
        // collected and handed on in the order of a serial run.
        let head = |dpt: &dpt_head::DptHead, name: &str| {
            let t0 = std::time::Instant::now();
            let mut seen: Vec<(String, Tensor)> = Vec::new();
            let out = dpt.forward(&tokens, pse, (h, w), name, &mut |n, t| {
                seen.push((n.to_string(), t.clone()));
            });
            (out, seen, t0.elapsed().as_secs_f64() * 1e3)
        };
        let ((depth_out, depth_taps, depth_ms), (point_out, point_taps, point_ms)) = rayon::join(
            || head(&self.depth_head, "depth_head"),
            || head(&self.point_head, "point_head"),
        );
        for (n, t) in depth_taps.iter().chain(&point_taps) {
            taps(n, t);
        }
        let (depth, depth_conf) = depth_out?;
        let (world_points, world_points_conf) = point_out?;
        let last_iter = iters
            .last()
            .ok_or_else(|| Error::Model("camera head has no iterations".into()))?;
        Ok(FrameOutput {
            frame_index,
            pose_enc: last_iter.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            pose_enc_iters: Tensor::stack(&iters, 0)?,
            depth,
            depth_conf,
            world_points,
            world_points_conf,
            tokens_last: last.unsqueeze(0)?,
            kv_len: memory.global.iter().map(memory::LayerKv::len).collect(),
            camera_kv_len: memory.camera.iter().map(memory::LayerKv::len).collect(),
            budgets: memory.budgets.clone(),
            height: h,
            width: w,
            stage_ms: [agg_ms, cam_ms, depth_ms, point_ms],
            ms: clock.elapsed().as_secs_f64() * 1e3,
        })
    }
}
