//! The learned streaming flow engine `streamflow` (StreamFlow, `SKFlow_MF8`).
//!
//! The model takes T frames (4 for the released checkpoints) and gives the T − 1 forward flows
//! between them in one pass. Windows of T frames slide by T − 1, sharing one frame, as the
//! reference's long-video evaluation does; at the end of the stream the last window is aligned
//! to the last frame and only its pairs not yet given are returned. A stream shorter than T
//! frames is completed with repeats of its last frame (the pairs between repeats are dropped).
//!
//! Backward flows come from the same model on the reversed window, run beside the forward pass:
//! the model is trained on forward flows only, and its own reversed answer is what the other
//! engines' forward–backward confidence and occlusion expect. So a window costs two passes, and
//! a pair's flow arrives up to T − 1 frames after its later frame. Memory holds one window.

use std::collections::VecDeque;
use std::path::PathBuf;

use candle_core::Tensor;
use serde::Serialize;

use super::learned::{check_stream_size, flow_field, frame_tensor};
use super::{FlowEngine, PairFlow};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Frame;
use streamrecon_models::streamflow::{StreamFlow, StreamFlowConfig};

/// How to build the engine.
#[derive(Debug, Clone, Serialize)]
pub struct StreamFlowEngineConfig {
    pub weights: PathBuf,
    /// Model sizes; the released StreamFlow (T = 4, 15 iterations) when `None`.
    pub model_config: Option<PathBuf>,
}

pub struct StreamFlowEngine {
    net: StreamFlow,
    /// The last T frames: (stream index, `[3, H, W]` 0..255).
    frames: VecDeque<(u64, Tensor)>,
    /// Frames among them whose pair with their predecessor has not been given yet.
    pending: usize,
    size: Option<(u32, u32)>,
}

impl StreamFlowEngine {
    /// # Errors
    /// Unreadable config or weights, or weights that do not fit the config.
    pub fn new(cfg: &StreamFlowEngineConfig) -> Result<Self> {
        let config = match &cfg.model_config {
            Some(p) => StreamFlowConfig::from_json_file(p)?,
            None => StreamFlowConfig::released(),
        };
        Ok(Self::from_model(StreamFlow::load(&cfg.weights, config)?))
    }

    pub fn from_model(net: StreamFlow) -> Self {
        Self {
            net,
            frames: VecDeque::new(),
            pending: 0,
            size: None,
        }
    }

    /// Frames per model pass (T).
    pub fn window(&self) -> usize {
        self.net.frames()
    }

    /// Runs the model on `window` (T frames, oldest first) and its reverse; returns the last
    /// `wanted` pairs whose frames differ.
    fn run_window(&self, window: &[(u64, Tensor)], wanted: usize) -> Result<Vec<PairFlow>> {
        let idx: Vec<u64> = window.iter().map(|f| f.0).collect();
        let forward: Vec<&Tensor> = window.iter().map(|f| &f.1).collect();
        let backward: Vec<&Tensor> = forward.iter().rev().copied().collect();
        let run = |frames: &[&Tensor]| -> Result<Tensor> {
            self.net
                .forward(&Tensor::stack(frames, 0)?, None)
                .map_err(|e| {
                    Error::Flow(format!(
                        "streamflow, frames {}..={}: {e}",
                        idx[0],
                        idx[idx.len() - 1]
                    ))
                })
        };
        // The two passes on rayon's two halves: most of a pass is single-threaded candle ops.
        let (fwd, bwd) = rayon::join(|| run(&forward), || run(&backward));
        let (fwd, bwd) = (fwd?, bwd?);
        let pairs = window.len() - 1;
        let mut out = Vec::new();
        for i in pairs - wanted.min(pairs)..pairs {
            let (from, to) = (idx[i], idx[i + 1]);
            if from == to {
                continue; // a repeated last frame
            }
            // The reversed window's pair T − 2 − i runs from frame i + 1 back to frame i.
            out.push(PairFlow::from_flows(
                from,
                to,
                flow_field(&fwd, i)?,
                flow_field(&bwd, pairs - 1 - i)?,
            ));
        }
        Ok(out)
    }
}

impl FlowEngine for StreamFlowEngine {
    fn name(&self) -> &'static str {
        "streamflow"
    }

    fn push(&mut self, frame: &Frame) -> Result<Vec<PairFlow>> {
        let (net, t) = (&self.net, self.window());
        check_stream_size(&mut self.size, frame, |(w, h)| {
            net.check_input(&[t, 3, h as usize, w as usize])
                .map_err(|e| Error::Flow(format!("streamflow: {e}")))
        })?;
        if self.frames.len() == t {
            self.frames.pop_front();
        }
        if !self.frames.is_empty() {
            self.pending += 1;
        }
        self.frames.push_back((frame.index, frame_tensor(frame)?));
        if self.pending == t - 1 {
            self.pending = 0;
            let window: Vec<(u64, Tensor)> = self.frames.iter().cloned().collect();
            self.run_window(&window, t - 1)
        } else {
            Ok(Vec::new())
        }
    }

    fn flush(&mut self) -> Result<Vec<PairFlow>> {
        let mut out = Vec::new();
        if self.pending > 0 {
            let mut window: Vec<(u64, Tensor)> = self.frames.iter().cloned().collect();
            if let Some(last) = window.last().cloned() {
                // Only a stream shorter than T lacks frames: repeats of its last complete it
                // (their pairs are dropped).
                let real_pairs = window.len() - 1;
                let first = real_pairs - self.pending.min(real_pairs);
                window.resize(self.window(), last);
                out = self.run_window(&window, window.len() - 1 - first)?;
            }
        }
        self.frames.clear();
        self.pending = 0;
        Ok(out)
    }

    fn reset(&mut self) {
        self.frames.clear();
        self.pending = 0;
        self.size = None;
    }
}
