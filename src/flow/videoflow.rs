//! The learned multi-frame flow engine `videoflow` (VideoFlow-MOF).
//!
//! Windows of N frames (5 by default) slide by N − 3: each window's middle frames give the
//! forward and backward flows of N − 3 neighbouring pairs, so every pair is estimated once with
//! a frame of context on each side. The stream's first and last frames are repeated to complete
//! the first and last windows. Memory holds one window, however long the video.

use std::collections::VecDeque;
use std::path::PathBuf;

use candle_core::Tensor;
use serde::Serialize;

use super::learned::{check_stream_size, flow_field, frame_tensor};
use super::{FlowEngine, PairFlow};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Frame;
use streamrecon_models::videoflow::{MofNet, VideoFlowConfig};

/// How to build the engine.
#[derive(Debug, Clone, Serialize)]
pub struct VideoFlowEngineConfig {
    pub weights: PathBuf,
    /// Model sizes; the released VideoFlow-MOF when `None`.
    pub model_config: Option<PathBuf>,
    /// Frames per window (≥ 4).
    pub window: usize,
}

pub const DEFAULT_WINDOW: usize = 5;

pub struct VideoFlowEngine {
    net: MofNet,
    window: usize,
    /// Frames of the current window: (stream index, `[3, H, W]` 0..255); the first entry may
    /// be a repeat of frame 0.
    frames: VecDeque<(u64, Tensor)>,
    size: Option<(u32, u32)>,
}

impl VideoFlowEngine {
    /// # Errors
    /// Unreadable config or weights, weights that do not fit the config, or a window below 4.
    pub fn new(cfg: &VideoFlowEngineConfig) -> Result<Self> {
        let config = match &cfg.model_config {
            Some(p) => VideoFlowConfig::from_json_file(p)?,
            None => VideoFlowConfig::mof_released(),
        };
        let net = MofNet::load(&cfg.weights, config)?;
        Self::from_model(net, cfg.window)
    }

    /// # Errors
    /// A window below 4 frames (no pair would have context on both sides).
    pub fn from_model(net: MofNet, window: usize) -> Result<Self> {
        if window < 4 {
            return Err(Error::Flow(format!(
                "videoflow windows need at least 4 frames, got {window}"
            )));
        }
        Ok(Self {
            net,
            window,
            frames: VecDeque::new(),
            size: None,
        })
    }

    /// Runs the full window; returns its pairs whose frames are both real.
    fn run_window(&mut self) -> Result<Vec<PairFlow>> {
        let idx: Vec<u64> = self.frames.iter().map(|f| f.0).collect();
        let tensors: Vec<&Tensor> = self.frames.iter().map(|f| &f.1).collect();
        let batch = Tensor::stack(&tensors, 0)?;
        let flows = self.net.forward(&batch, None).map_err(|e| {
            Error::Flow(format!(
                "videoflow, frames {}..={}: {e}",
                idx[0],
                idx[idx.len() - 1]
            ))
        })?;
        let m = self.window - 2;
        let field = |i: usize| flow_field(&flows, i);
        let mut out = Vec::new();
        // Middle frame j (window position j + 1) pairs with the next middle frame.
        for j in 0..m - 1 {
            let (from, to) = (idx[j + 1], idx[j + 2]);
            if from == to {
                continue; // a repeated boundary frame
            }
            out.push(PairFlow::from_flows(from, to, field(j)?, field(m + j + 1)?));
        }
        // Slide: the last three frames start the next window.
        while self.frames.len() > 3 {
            self.frames.pop_front();
        }
        Ok(out)
    }
}

impl FlowEngine for VideoFlowEngine {
    fn name(&self) -> &'static str {
        "videoflow"
    }

    fn push(&mut self, frame: &Frame) -> Result<Vec<PairFlow>> {
        check_stream_size(&mut self.size, frame, |(w, h)| {
            if w < 16 || h < 16 {
                return Err(Error::Flow(format!(
                    "frames of {w}x{h} are too small for videoflow (16x16 at least)"
                )));
            }
            Ok(())
        })?;
        let t = frame_tensor(frame)?;
        if self.frames.is_empty() {
            // Frame 0 gets a repeat before it, so its pair with frame 1 has context.
            self.frames.push_back((frame.index, t.clone()));
        }
        self.frames.push_back((frame.index, t));
        if self.frames.len() == self.window {
            self.run_window()
        } else {
            Ok(Vec::new())
        }
    }

    fn flush(&mut self) -> Result<Vec<PairFlow>> {
        // The deque holds the frames whose pairs from position 1 on are still missing; one
        // window padded with repeats of the last frame produces all of them.
        let mut out = Vec::new();
        if self.frames.len() >= 3 {
            if let Some(last) = self.frames.back().cloned() {
                while self.frames.len() < self.window {
                    self.frames.push_back(last.clone());
                }
                out = self.run_window()?;
            }
        }
        self.frames.clear();
        Ok(out)
    }

    fn reset(&mut self) {
        self.frames.clear();
        self.size = None;
    }
}
