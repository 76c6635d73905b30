//! The stream's memory: per-layer K/V caches of the aggregator's global blocks and of the camera
//! head's trunk, with InfiniteVGGT's rolling-memory pruning (frame-0 tokens are a permanent
//! anchor; over budget, the most redundant keys are evicted).
//!
//! Stored K is post-qk-norm, post-RoPE, as in the reference. Token ids (`frame · P + token`) are
//! kept per head so tests can compare which tokens survive.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// The reference's default total token budget for the full model.
pub const DEFAULT_TOTAL_BUDGET: usize = 1_200_000;

/// Softmax temperature of the per-layer budget split.
const BUDGET_TEMPERATURE: f32 = 0.5;

/// One attention layer's K/V cache `[1, H, N, D]`.
#[derive(Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Token id of every cached entry, per head.
    ids: Vec<Vec<i64>>,
    /// Tokens of the first call (frame 0), never evicted.
    anchor: usize,
    /// Ids of the tokens the next `append` brings.
    incoming_first_id: i64,
    /// Budget for the next `append`; `None` = grow without bound.
    budget: Option<usize>,
    /// Mean redundancy score of the last eviction in this frame, if one happened.
    evicted_score: Option<f32>,
}

impl LayerKv {
    /// Cached tokens.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which token ids the cache holds, per head, in cache order.
    pub fn ids(&self) -> &[Vec<i64>] {
        &self.ids
    }

    /// The cached K and V, if any.
    pub fn kv(&self) -> Option<(&Tensor, &Tensor)> {
        self.k.as_ref().zip(self.v.as_ref())
    }

    /// Bytes held by K and V.
    pub fn bytes(&self) -> usize {
        self.kv().map_or(0, |(k, v)| {
            (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
        })
    }

    fn prepare(&mut self, first_id: i64, budget: Option<usize>) {
        self.incoming_first_id = first_id;
        self.budget = budget;
        self.evicted_score = None;
    }

    /// Appends this call's `k, v [1, H, n, D]`, prunes to the budget, and returns everything the
    /// queries of this call attend to.
    ///
    /// # Errors
    /// Shape mismatch with the cache.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, heads, n, _) = k.dims4()?;
        if self.ids.is_empty() {
            self.ids = vec![Vec::new(); heads];
            self.anchor = n;
        }
        for h in &mut self.ids {
            h.extend((0..n as i64).map(|t| self.incoming_first_id + t));
        }
        let (k, v) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
            _ => (k.clone(), v.clone()),
        };
        let (k, v) = match self.budget {
            Some(budget) if k.dim(2)? > budget => self.evict(&k, &v, budget)?,
            _ => (k, v),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    /// Keeps the anchors and the `budget − anchor` candidates per head whose normalised keys
    /// are least similar to the candidates' mean key, in their original order.
    fn evict(&mut self, k: &Tensor, v: &Tensor, budget: usize) -> Result<(Tensor, Tensor)> {
        let (_, heads, n, d) = k.dims4()?;
        let anchor = self.anchor.min(n);
        let cand = n - anchor;
        let keep = budget.saturating_sub(anchor).min(cand);
        let ck: Vec<Vec<f32>> = k
            .narrow(2, anchor, cand)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((heads, cand * d))?
            .to_vec2()?;
        let mut kept_k = Vec::with_capacity(heads);
        let mut kept_v = Vec::with_capacity(heads);
        let mut score_sum = 0f32;
        for (h, keys) in ck.iter().enumerate() {
            let normed: Vec<f32> = keys
                .chunks_exact(d)
                .flat_map(|row| {
                    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    row.iter().map(move |x| x / norm)
                })
                .collect();
            let mut mean = vec![0f32; d];
            for row in normed.chunks_exact(d) {
                for (m, x) in mean.iter_mut().zip(row) {
                    *m += x;
                }
            }
            mean.iter_mut().for_each(|m| *m /= cand as f32);
            let scores: Vec<f32> = normed
                .chunks_exact(d)
                .map(|row| row.iter().zip(&mean).map(|(a, b)| a * b).sum())
                .collect();
            score_sum += scores.iter().sum::<f32>();
            let mut order: Vec<usize> = (0..cand).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
            let mut chosen: Vec<usize> = order[..keep].to_vec();
            chosen.sort_unstable();
            let index: Vec<u32> = (0..anchor as u32)
                .chain(chosen.iter().map(|&c| (c + anchor) as u32))
                .collect();
            let idx = Tensor::from_slice(&index, index.len(), k.device())?;
            kept_k.push(k.get(0)?.get(h)?.index_select(&idx, 0)?);
            kept_v.push(v.get(0)?.get(h)?.index_select(&idx, 0)?);
            let old = std::mem::take(&mut self.ids[h]);
            self.ids[h] = index.iter().map(|&i| old[i as usize]).collect();
        }
        self.evicted_score = Some(score_sum / (heads * cand).max(1) as f32);
        Ok((
            Tensor::stack(&kept_k, 0)?.unsqueeze(0)?,
            Tensor::stack(&kept_v, 0)?.unsqueeze(0)?,
        ))
    }
}

/// All caches of one stream, and the pruning state.
pub struct StreamMemory {
    /// Aggregator global blocks.
    pub global: Vec<LayerKv>,
    /// Camera-head trunk blocks (shared by the refinement iterations, as in the reference).
    pub camera: Vec<LayerKv>,
    /// Per global layer: the mean redundancy score of its last eviction.
    pub last_scores: Vec<f32>,
    /// Total token budget split over the global layers; `None` disables pruning.
    pub total_budget: Option<usize>,
    /// Budgets used for the current frame.
    pub budgets: Vec<i64>,
    /// Tokens per frame of this stream (set by its first frame).
    pub tokens_per_frame: Option<usize>,
}

impl StreamMemory {
    pub fn new(global_layers: usize, camera_layers: usize, total_budget: Option<usize>) -> Self {
        Self {
            global: (0..global_layers).map(|_| LayerKv::default()).collect(),
            camera: (0..camera_layers).map(|_| LayerKv::default()).collect(),
            last_scores: vec![0.0; global_layers],
            total_budget,
            budgets: vec![0; global_layers],
            tokens_per_frame: None,
        }
    }

    /// Per-layer budgets `trunc(softmax((1 − last_score)/0.5) · total)` in f32, as the reference
    /// computes them at the start of every frame.
    pub fn layer_budgets(&self) -> Vec<i64> {
        let total = self.total_budget.unwrap_or(0) as f32;
        let logits: Vec<f32> = self
            .last_scores
            .iter()
            .map(|s| (1.0 - s) / BUDGET_TEMPERATURE)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.iter().map(|e| ((e / sum) * total) as i64).collect()
    }

    /// Prepares the caches for frame `frame` of `tokens` tokens.
    pub fn begin_frame(&mut self, frame: usize, tokens: usize) {
        self.budgets = self.layer_budgets();
        self.tokens_per_frame.get_or_insert(tokens);
        let first = (frame * tokens) as i64;
        let pruning = self.total_budget.is_some();
        for (layer, b) in self.global.iter_mut().zip(&self.budgets) {
            layer.prepare(first, pruning.then_some((*b).max(0) as usize));
        }
    }

    /// Prepares the camera caches for refinement iteration `iter` of frame `frame`.
    pub fn begin_camera_iteration(&mut self, frame: usize, iter: usize, iterations: usize) {
        let id = (frame * iterations + iter) as i64;
        for layer in &mut self.camera {
            layer.prepare(id, None);
        }
    }

    /// Records the layers that evicted this frame.
    pub fn end_frame(&mut self) {
        for (s, layer) in self.last_scores.iter_mut().zip(&self.global) {
            if let Some(e) = layer.evicted_score {
                *s = e;
            }
        }
    }

    /// Bytes held by all caches.
    pub fn bytes(&self) -> usize {
        self.global.iter().chain(&self.camera).map(LayerKv::bytes).sum()
    }

    /// # Errors
    /// A layer index beyond the model.
    pub fn global_layer(&self, l: usize) -> Result<&LayerKv> {
        self.global
            .get(l)
            .ok_or_else(|| Error::Model(format!("no global layer {l}")))
    }

    /// Last-dim width of the cached keys (for diagnostics).
    pub fn head_dim(&self) -> Option<usize> {
        self.global
            .first()
            .and_then(|l| l.k.as_ref())
            .and_then(|k| k.dim(D::Minus1).ok())
    }
}
