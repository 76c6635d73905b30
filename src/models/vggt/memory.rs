//! The stream's memory: per-layer K/V caches of the aggregator's global blocks and of the camera
//! head's trunk, with InfiniteVGGT's rolling-memory pruning (frame-0 tokens are a permanent
//! anchor; over budget, the most redundant keys are evicted) and a bounded window for the camera
//! head's cache.
//!
//! Storage is preallocated per layer (`[1, H, capacity, D]`, grown geometrically) and written in
//! place: appending a frame copies only that frame, eviction copies only the kept tokens, and
//! attention reads a view of the first `len` entries. Stored K is post-qk-norm, post-RoPE, as in
//! the reference. Token ids (`frame · P + token`) are kept per head so tests can compare which
//! tokens survive. The whole state can be written to a snapshot and restored bit for bit.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use streamrecon_core::error::{Error, Result};

/// The reference's default total token budget for the full model.
pub const DEFAULT_TOTAL_BUDGET: usize = 1_200_000;

/// Default bound of the camera head's cache: frame 0 plus this many recent frames.
pub const DEFAULT_CAMERA_WINDOW: usize = 32;

/// Softmax temperature of the per-layer budget split.
const BUDGET_TEMPERATURE: f32 = 0.5;

/// Smallest allocation, in tokens.
const MIN_CAPACITY: usize = 64;

/// One attention layer's K/V cache.
#[derive(Default)]
pub struct LayerKv {
    /// `[1, H, capacity, D]`, the first `len` entries valid.
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Token id of every cached entry, per head.
    ids: Vec<Vec<i64>>,
    /// Entries of the first call (frame 0), never evicted.
    anchor: usize,
    /// Ids of the entries the next `append` brings.
    incoming_first_id: i64,
    /// Token budget for the next `append`; `None` = no pruning.
    budget: Option<usize>,
    /// Most non-anchor entries kept, oldest dropped first (`None` = unbounded).
    window: Option<usize>,
    /// Mean redundancy score of this frame's eviction, if one happened.
    evicted_score: Option<f32>,
    /// Appends still belong to frame 0 (the camera head appends once per iteration).
    grow_anchor: bool,
    /// Whether the next `append` stays in the cache (a frame not admitted is attended to by its
    /// own queries, then dropped).
    admit: bool,
    /// Per head, per entry: how much the entry's eviction score is lowered (γ·w of its frame).
    priority: Vec<Vec<f32>>,
    /// Priority of the entries the next `append` brings.
    incoming_priority: f32,
}

impl LayerKv {
    /// Cached entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries of frame 0 (never evicted).
    pub fn anchor(&self) -> usize {
        self.anchor
    }

    /// Which token ids the cache holds, per head, in cache order.
    pub fn ids(&self) -> &[Vec<i64>] {
        &self.ids
    }

    /// Views of the cached K and V, `[1, H, len, D]`.
    pub fn kv(&self) -> Option<(Tensor, Tensor)> {
        let (k, v) = (self.k.as_ref()?, self.v.as_ref()?);
        Some((
            k.narrow(2, 0, self.len).ok()?,
            v.narrow(2, 0, self.len).ok()?,
        ))
    }

    /// Bytes of the valid entries of K and V.
    pub fn bytes(&self) -> usize {
        self.k.as_ref().map_or(0, |k| {
            let (_, h, _, d) = k.dims4().unwrap_or((0, 0, 0, 0));
            2 * h * self.len * d * k.dtype().size_in_bytes()
        })
    }

    /// Bytes allocated (capacity), K and V.
    pub fn allocated_bytes(&self) -> usize {
        self.k
            .as_ref()
            .map_or(0, |k| 2 * k.elem_count() * k.dtype().size_in_bytes())
    }

    fn prepare(&mut self, first_id: i64, budget: Option<usize>) {
        self.incoming_first_id = first_id;
        self.budget = budget;
        self.evicted_score = None;
        self.admit = true;
        self.incoming_priority = 0.0;
    }

    /// Makes room for `extra` more entries, reallocating geometrically.
    fn reserve(&mut self, like: &Tensor, extra: usize) -> Result<()> {
        let (_, h, _, d) = like.dims4()?;
        let cap = self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0));
        if self.len + extra <= cap {
            return Ok(());
        }
        let new_cap = (cap * 2).max(self.len + extra).max(MIN_CAPACITY);
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            let t = Tensor::zeros((1, h, new_cap, d), like.dtype(), like.device())?;
            if let Some(old) = old.filter(|_| self.len > 0) {
                t.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(t)
        };
        let k = grow(self.k.as_ref())?;
        let v = grow(self.v.as_ref())?;
        self.k = Some(k);
        self.v = Some(v);
        Ok(())
    }

    /// Appends this call's `k, v [1, H, n, D]`, prunes to the budget (or window), and returns
    /// views of everything the queries of this call attend to.
    ///
    /// # Errors
    /// Shape mismatch with the cache.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, heads, n, _) = k.dims4()?;
        let first_call = self.ids.is_empty();
        self.reserve(k, n)?;
        let (ks, vs) = self.stores()?;
        ks.slice_set(&k.contiguous()?, 2, self.len)?;
        vs.slice_set(&v.contiguous()?, 2, self.len)?;
        if !self.admit && !first_call {
            // Attended to now, kept out of the memory: the next append overwrites it.
            let (kn, vn) = (
                ks.narrow(2, 0, self.len + n)?,
                vs.narrow(2, 0, self.len + n)?,
            );
            return Ok((kn, vn));
        }
        if first_call {
            self.ids = vec![Vec::new(); heads];
            self.priority = vec![Vec::new(); heads];
            self.anchor = n;
        } else if self.grow_anchor {
            self.anchor += n;
        }
        self.len += n;
        for h in &mut self.ids {
            h.extend((0..n as i64).map(|t| self.incoming_first_id + t));
        }
        for p in &mut self.priority {
            p.extend(std::iter::repeat_n(self.incoming_priority, n));
        }
        match (self.budget, self.window) {
            (Some(budget), _) if self.len > budget => self.evict(budget)?,
            (None, Some(window)) if self.len > self.anchor + window => self.drop_oldest(window)?,
            _ => {}
        }
        self.kv()
            .ok_or_else(|| Error::Model("empty cache after append".into()))
    }

    fn stores(&self) -> Result<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
            _ => Err(Error::Model("cache storage missing".into())),
        }
    }

    /// Keeps the anchors and the `budget − anchor` candidates per head whose normalised keys
    /// are least similar to the candidates' mean key, in their original order.
    ///
    /// The keys are scored where they lie (f32; other dtypes through one f32 copy) and the kept
    /// entries are moved down in place: no copy of the cache is made.
    fn evict(&mut self, budget: usize) -> Result<()> {
        let (ks, vs) = self.stores()?;
        let (_, heads, cap, d) = ks.dims4()?;
        let n = self.len;
        let anchor = self.anchor.min(n);
        let cand = n - anchor;
        let keep = budget.saturating_sub(anchor).min(cand);
        // A clone of the handle when the cache is already f32.
        let keys = ks.to_dtype(DType::F32)?;
        let priority = &self.priority;
        // Heads choose independently: score and select them in parallel, with a linear-time
        // selection (the same set as a full sort by (score, position)).
        let chosen: Vec<(Vec<u32>, f32)> = crate::gemm::with_f32(&keys, |all| {
            (0..heads)
                .into_par_iter()
                .map(|h| {
                    let rows = &all[(h * cap + anchor) * d..][..cand * d];
                    let mut scores = redundancy_scores(rows, d);
                    let sum = scores.iter().sum::<f32>();
                    // Pose-adaptive priority: novel frames' entries look less redundant (0 = reference).
                    for (s, p) in scores.iter_mut().zip(&priority[h][anchor..]) {
                        *s -= p;
                    }
                    (kept_candidates(&scores, keep), sum)
                })
                .collect()
        })?;
        let mut score_sum = 0f32;
        for (h, (order, sum)) in chosen.iter().enumerate() {
            score_sum += sum;
            self.ids[h] = keep_entries(&self.ids[h], anchor, order);
            self.priority[h] = keep_entries(&self.priority[h], anchor, order);
        }
        let compact = Compact {
            orders: chosen.iter().map(|(o, _)| o.as_slice()).collect(),
            cap,
            d,
            anchor,
        };
        ks.inplace_op1(&compact)?;
        vs.inplace_op1(&compact)?;
        self.len = anchor + keep;
        self.evicted_score = Some(score_sum / (heads * cand).max(1) as f32);
        Ok(())
    }

    /// Drops the oldest non-anchor entries beyond `window`.
    fn drop_oldest(&mut self, window: usize) -> Result<()> {
        let (ks, vs) = self.stores()?;
        let start = self.len - window;
        for s in [&ks, &vs] {
            let view = s.narrow(2, start, window)?;
            // A copy of its own: slice_set refuses to read and write one storage.
            let recent = if view.is_contiguous() {
                view.copy()?
            } else {
                view.contiguous()?
            };
            s.slice_set(&recent, 2, self.anchor)?;
        }
        for h in &mut self.ids {
            h.drain(self.anchor..start);
        }
        for p in &mut self.priority {
            p.drain(self.anchor..start);
        }
        self.len = self.anchor + window;
        Ok(())
    }
}

/// Moves each head's kept candidates (`orders[h]`, ascending positions after the anchors) down
/// to follow the anchors, in place, in a `[1, H, cap, D]` cache.
struct Compact<'a> {
    orders: Vec<&'a [u32]>,
    cap: usize,
    d: usize,
    anchor: usize,
}

impl Compact<'_> {
    fn apply<T: Copy + Send>(&self, data: &mut [T]) {
        let (cap, d, anchor) = (self.cap, self.d, self.anchor);
        data.par_chunks_mut(cap * d)
            .zip(&self.orders)
            .for_each(|(head, order)| {
                // Ascending sources, each at or after its destination: moving in order never
                // overwrites an entry still to be moved.
                for (dst, &src) in order.iter().enumerate() {
                    let (from, to) = ((anchor + src as usize) * d, (anchor + dst) * d);
                    if from != to {
                        head.copy_within(from..from + d, to);
                    }
                }
            });
    }
}

impl candle_core::InplaceOp1 for Compact<'_> {
    fn name(&self) -> &'static str {
        "kv-compact"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        let (start, len) = (layout.start_offset(), layout.shape().elem_count());
        if !layout.is_contiguous() || len != self.orders.len() * self.cap * self.d {
            candle_core::bail!("kv-compact: the cache is not a contiguous [1, H, cap, D] tensor")
        }
        match storage {
            S::F32(v) => self.apply(&mut v[start..start + len]),
            S::F16(v) => self.apply(&mut v[start..start + len]),
            S::BF16(v) => self.apply(&mut v[start..start + len]),
            _ => candle_core::bail!("kv-compact: unsupported dtype"),
        }
        Ok(())
    }
}

/// The anchors, then the kept candidates (`order`: positions after the anchors).
fn keep_entries<T: Copy>(old: &[T], anchor: usize, order: &[u32]) -> Vec<T> {
    old[..anchor]
        .iter()
        .copied()
        .chain(order.iter().map(|&c| old[anchor + c as usize]))
        .collect()
}

/// The `keep` candidates with the lowest scores (ties to the earlier position), in ascending
/// position: a linear-time selection, the same set as a full sort by (score, position).
pub fn kept_candidates(scores: &[f32], keep: usize) -> Vec<u32> {
    let cand = scores.len();
    let mut order: Vec<u32> = (0..cand as u32).collect();
    let by_score = |a: &u32, b: &u32| {
        scores[*a as usize]
            .total_cmp(&scores[*b as usize])
            .then(a.cmp(b))
    };
    if keep < cand {
        order.select_nth_unstable_by(keep, by_score);
        order.truncate(keep);
    }
    order.sort_unstable();
    order
}

/// Per candidate (rows of `d` values): dot product of its L2-normalised key with the mean
/// normalised key. The normalised keys are recomputed rather than stored (the same arithmetic,
/// so the same scores).
pub fn redundancy_scores(keys: &[f32], d: usize) -> Vec<f32> {
    let cand = keys.len() / d;
    let norms: Vec<f32> = keys
        .chunks_exact(d)
        .map(|row| row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12))
        .collect();
    let mut mean = vec![0f32; d];
    for (row, &norm) in keys.chunks_exact(d).zip(&norms) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x / norm;
        }
    }
    for m in &mut mean {
        *m /= cand as f32;
    }
    keys.chunks_exact(d)
        .zip(&norms)
        .map(|(row, &norm)| row.iter().zip(&mean).map(|(a, b)| (a / norm) * b).sum())
        .collect()
}

/// How the camera head's cache is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CameraCache {
    /// As the reference: every refinement iteration of every frame, forever.
    Reference,
    /// Frame 0 plus the most recent `n` frames.
    Window(usize),
}

/// How frames enter the global memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MemoryUpdate {
    /// Every frame, equal footing: the reference behaviour.
    Uniform,
    /// Frames with novelty below `threshold` are predicted but not stored; stored entries'
    /// eviction scores are lowered by `gamma · w` so novel frames survive longer.
    Adaptive { threshold: f32, gamma: f32 },
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
    pub camera_cache: CameraCache,
    pub update: MemoryUpdate,
    /// Novelty weight of the coming frame (adaptive updates), set by the owner.
    pub novelty: Option<f32>,
    /// Whether the last frame entered the global memory.
    pub last_admitted: bool,
}

/// What a snapshot stores besides the tensors.
#[derive(Serialize, Deserialize)]
struct SnapshotMeta {
    format: u32,
    total_budget: Option<usize>,
    tokens_per_frame: Option<usize>,
    camera_cache: CameraCache,
    #[serde(default = "uniform")]
    update: MemoryUpdate,
    budgets: Vec<i64>,
    global_anchor: Vec<usize>,
    camera_anchor: Vec<usize>,
    /// Free-form state of the owner (frame counter and such).
    owner: serde_json::Value,
}

const SNAPSHOT_FORMAT: u32 = 1;

fn uniform() -> MemoryUpdate {
    MemoryUpdate::Uniform
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
            camera_cache: CameraCache::Reference,
            update: MemoryUpdate::Uniform,
            novelty: None,
            last_admitted: true,
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
        let (admit, priority) = match (self.update, self.novelty.take()) {
            (MemoryUpdate::Adaptive { threshold, gamma }, Some(w)) => {
                (frame == 0 || w >= threshold, gamma * w)
            }
            _ => (true, 0.0),
        };
        self.last_admitted = admit;
        for (layer, b) in self.global.iter_mut().zip(&self.budgets) {
            layer.prepare(first, pruning.then_some((*b).max(0) as usize));
            layer.admit = admit;
            layer.incoming_priority = priority;
        }
    }

    /// Prepares the camera caches for refinement iteration `iter` of frame `frame`.
    pub fn begin_camera_iteration(&mut self, frame: usize, iter: usize, iterations: usize) {
        let id = (frame * iterations + iter) as i64;
        let window = match self.camera_cache {
            CameraCache::Reference => None,
            CameraCache::Window(n) => Some(n * iterations),
        };
        for layer in &mut self.camera {
            layer.prepare(id, None);
            layer.window = window;
            layer.grow_anchor = frame == 0;
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

    /// Bytes of valid cache entries.
    pub fn bytes(&self) -> usize {
        self.global
            .iter()
            .chain(&self.camera)
            .map(LayerKv::bytes)
            .sum()
    }

    /// Bytes allocated for the caches.
    pub fn allocated_bytes(&self) -> usize {
        self.global
            .iter()
            .chain(&self.camera)
            .map(LayerKv::allocated_bytes)
            .sum()
    }

    /// # Errors
    /// A layer index beyond the model.
    pub fn global_layer(&self, l: usize) -> Result<&LayerKv> {
        self.global
            .get(l)
            .ok_or_else(|| Error::Model(format!("no global layer {l}")))
    }

    /// Every tensor and fact of the stream, with the owner's state, as named tensors.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn to_tensors(&self, owner: serde_json::Value) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let dev = Device::Cpu;
        for (group, layers) in [("global", &self.global), ("camera", &self.camera)] {
            for (l, layer) in layers.iter().enumerate() {
                if let Some((k, v)) = layer.kv() {
                    out.insert(format!("{group}.{l}.k"), k.contiguous()?);
                    out.insert(format!("{group}.{l}.v"), v.contiguous()?);
                    let (h, n) = (layer.ids.len(), layer.ids.first().map_or(0, Vec::len));
                    out.insert(
                        format!("{group}.{l}.ids"),
                        Tensor::from_vec(layer.ids.concat(), (h, n), &dev)?,
                    );
                    out.insert(
                        format!("{group}.{l}.priority"),
                        Tensor::from_vec(layer.priority.concat(), (h, n), &dev)?,
                    );
                }
            }
        }
        out.insert(
            "last_scores".into(),
            Tensor::from_slice(&self.last_scores, self.last_scores.len(), &dev)?,
        );
        let meta = SnapshotMeta {
            format: SNAPSHOT_FORMAT,
            total_budget: self.total_budget,
            tokens_per_frame: self.tokens_per_frame,
            camera_cache: self.camera_cache,
            update: self.update,
            budgets: self.budgets.clone(),
            global_anchor: self.global.iter().map(|l| l.anchor).collect(),
            camera_anchor: self.camera.iter().map(|l| l.anchor).collect(),
            owner,
        };
        let json = serde_json::to_vec(&meta).map_err(|e| Error::Model(e.to_string()))?;
        let n = json.len();
        out.insert("meta.json".into(), Tensor::from_vec(json, n, &dev)?);
        Ok(out)
    }

    /// Rebuilds a stream from [`Self::to_tensors`]; returns the owner's state.
    ///
    /// # Errors
    /// Missing or inconsistent tensors, or a snapshot of a model with other layer counts.
    pub fn from_tensors(
        t: &HashMap<String, Tensor>,
        global_layers: usize,
        camera_layers: usize,
    ) -> Result<(Self, serde_json::Value)> {
        let bad = |what: String| Error::Model(format!("snapshot: {what}"));
        let meta_bytes: Vec<u8> = t
            .get("meta.json")
            .ok_or_else(|| bad("no meta.json".into()))?
            .to_vec1()?;
        let meta: SnapshotMeta =
            serde_json::from_slice(&meta_bytes).map_err(|e| bad(format!("meta.json: {e}")))?;
        if meta.format != SNAPSHOT_FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {SNAPSHOT_FORMAT})",
                meta.format
            )));
        }
        if meta.global_anchor.len() != global_layers || meta.camera_anchor.len() != camera_layers {
            return Err(bad(format!(
                "made for a model with {} global and {} camera layers, this one has {global_layers} and {camera_layers}",
                meta.global_anchor.len(),
                meta.camera_anchor.len()
            )));
        }
        let mut m = Self::new(global_layers, camera_layers, meta.total_budget);
        m.tokens_per_frame = meta.tokens_per_frame;
        m.camera_cache = meta.camera_cache;
        m.update = meta.update;
        m.budgets = meta.budgets;
        m.last_scores = t
            .get("last_scores")
            .ok_or_else(|| bad("no last_scores".into()))?
            .to_vec1()?;
        if m.last_scores.len() != global_layers {
            return Err(bad("last_scores of the wrong length".into()));
        }
        for (group, layers, anchors) in [
            ("global", &mut m.global, &meta.global_anchor),
            ("camera", &mut m.camera, &meta.camera_anchor),
        ] {
            for (l, layer) in layers.iter_mut().enumerate() {
                let Some(k) = t.get(&format!("{group}.{l}.k")) else {
                    continue;
                };
                let v = t
                    .get(&format!("{group}.{l}.v"))
                    .ok_or_else(|| bad(format!("{group}.{l}.v missing")))?;
                let ids: Vec<Vec<i64>> = t
                    .get(&format!("{group}.{l}.ids"))
                    .ok_or_else(|| bad(format!("{group}.{l}.ids missing")))?
                    .to_vec2()?;
                let (_, h, n, _) = k.dims4()?;
                if v.dims() != k.dims() || ids.len() != h || ids.iter().any(|i| i.len() != n) {
                    return Err(bad(format!("{group}.{l}: K, V and ids disagree")));
                }
                let priority: Vec<Vec<f32>> = match t.get(&format!("{group}.{l}.priority")) {
                    Some(p) => p.to_vec2()?,
                    None => vec![vec![0.0; n]; h],
                };
                if priority.len() != h || priority.iter().any(|p| p.len() != n) {
                    return Err(bad(format!("{group}.{l}: priorities disagree with ids")));
                }
                layer.anchor = anchors[l];
                layer.ids = ids;
                layer.priority = priority;
                layer.reserve(k, n)?;
                let (ks, vs) = layer.stores()?;
                ks.slice_set(&k.contiguous()?, 2, 0)?;
                vs.slice_set(&v.contiguous()?, 2, 0)?;
                layer.len = n;
            }
        }
        Ok((m, meta.owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, H, n, D]` keys whose every token of every head is `rows[t]` (scaled per head).
    fn keys(rows: &[[f32; 4]], heads: usize) -> Tensor {
        let mut v = Vec::new();
        for h in 0..heads {
            for r in rows {
                v.extend(r.iter().map(|x| x * (h + 1) as f32));
            }
        }
        Tensor::from_vec(v, (1, heads, rows.len(), 4), &Device::Cpu).unwrap()
    }

    fn frame(
        layer: &mut LayerKv,
        first_id: i64,
        budget: Option<usize>,
        rows: &[[f32; 4]],
        heads: usize,
    ) {
        layer.prepare(first_id, budget);
        let k = keys(rows, heads);
        layer.append(&k, &k).unwrap();
    }

    #[test]
    fn zero_scores_give_uniform_budgets_and_no_pruning_means_no_budget() {
        let m = StreamMemory::new(4, 2, Some(1000));
        assert_eq!(m.layer_budgets(), vec![250; 4]);
        let mut m = StreamMemory::new(3, 2, None);
        m.begin_frame(0, 10);
        assert!(m.global.iter().all(|l| l.budget.is_none()));
    }

    #[test]
    fn under_budget_nothing_is_evicted() {
        let mut l = LayerKv::default();
        frame(&mut l, 0, Some(10), &[[1.0, 0.0, 0.0, 0.0]; 3], 2);
        frame(&mut l, 3, Some(10), &[[0.0, 1.0, 0.0, 0.0]; 3], 2);
        assert_eq!(l.len(), 6);
        assert!(l.evicted_score.is_none());
        assert_eq!(l.ids()[0], vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn duplicates_go_first_anchors_stay_bit_identical_and_ids_ascend() {
        let mut l = LayerKv::default();
        let anchor = [[0.3, -0.2, 0.9, 0.1], [0.5, 0.5, -0.5, 0.25]];
        frame(&mut l, 0, Some(100), &anchor, 2);
        let (anchor_k, _) = l.kv().unwrap();
        let anchor_before: Vec<f32> = anchor_k.flatten_all().unwrap().to_vec1().unwrap();
        // Three copies of one key and two distinct keys; budget 2 anchors + 2 candidates.
        let dup = [1.0, 0.0, 0.0, 0.0];
        frame(
            &mut l,
            2,
            Some(4),
            &[dup, [0.0, 0.0, 1.0, 0.0], dup, [0.0, -1.0, 0.0, 0.0], dup],
            2,
        );
        assert_eq!(l.len(), 4);
        for ids in l.ids() {
            assert_eq!(
                ids,
                &vec![0, 1, 3, 5],
                "the duplicated key is evicted, the rest kept in order"
            );
        }
        let (k, _) = l.kv().unwrap();
        let anchor_after: Vec<f32> = k
            .narrow(2, 0, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(anchor_before, anchor_after);
        assert!(l.evicted_score.is_some());
    }

    #[test]
    fn heads_choose_independently() {
        let mut l = LayerKv::default();
        frame(&mut l, 0, Some(100), &[[1.0, 1.0, 1.0, 1.0]], 2);
        // Head 0 sees a duplicate at positions 0/1, head 1 at positions 1/2.
        let mut v = Vec::new();
        for row in [
            [1.0f32, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ] {
            v.extend(row);
        }
        for row in [
            [0.0f32, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ] {
            v.extend(row);
        }
        let k = Tensor::from_vec(v, (1, 2, 3, 4), &Device::Cpu).unwrap();
        l.prepare(1, Some(2));
        l.append(&k, &k).unwrap();
        assert_eq!(l.ids()[0], vec![0, 3], "head 0 keeps its distinct key");
        assert_eq!(l.ids()[1], vec![0, 1], "head 1 keeps its distinct key");
    }

    #[test]
    fn camera_window_keeps_frame_zero_and_recent_frames() {
        let mut m = StreamMemory::new(1, 1, None);
        m.camera_cache = CameraCache::Window(1);
        for f in 0..4 {
            for it in 0..2 {
                m.begin_camera_iteration(f, it, 2);
                let k = keys(&[[f as f32, it as f32, 1.0, 0.0]], 1);
                m.camera[0].append(&k, &k).unwrap();
            }
        }
        assert_eq!(m.camera[0].ids()[0], vec![0, 1, 6, 7]);
    }

    #[test]
    fn priority_keeps_the_novel_frame_and_uniform_is_unshifted() {
        let run = |priorities: [f32; 3]| {
            let mut l = LayerKv::default();
            frame(&mut l, 0, Some(100), &[[0.0, 0.0, 0.0, 1.0]], 1);
            for (f, p) in priorities.iter().enumerate() {
                l.prepare(1 + f as i64, Some(2));
                l.incoming_priority = *p;
                // Frames 1–3 carry the same key: only the priority tells them apart.
                let k = keys(&[[1.0, 0.0, 0.0, 0.0]], 1);
                l.append(&k, &k).unwrap();
            }
            l.ids()[0].clone()
        };
        assert_eq!(
            run([0.0, 0.5, 0.0]),
            vec![0, 2],
            "the novel frame 2 survives"
        );
        assert_eq!(
            run([0.0, 0.0, 0.0]),
            vec![0, 1],
            "uniform: no shift, ties keep the oldest"
        );
    }

    #[test]
    fn a_frame_not_admitted_is_attended_to_but_not_stored() {
        let mut l = LayerKv::default();
        frame(&mut l, 0, None, &[[1.0, 0.0, 0.0, 0.0]; 2], 1);
        l.prepare(2, None);
        l.admit = false;
        let k = keys(&[[0.0, 1.0, 0.0, 0.0]; 2], 1);
        let (seen, _) = l.append(&k, &k).unwrap();
        assert_eq!(seen.dim(2).unwrap(), 4, "its own queries see it");
        assert_eq!(l.len(), 2, "but the memory does not keep it");
        assert_eq!(l.ids()[0], vec![0, 1]);
    }
}
