//! Dense flow chains: each frame's pixels mapped back to a keyframe's, advanced by one
//! backward flow a frame (vectorised rows), with chained confidence.

use rayon::prelude::*;

use streamrecon_core::simd::{vectorized, Kernel};
use streamrecon_flow::{FlowField, TargetCells};

/// One row of [`Chain::advance_all`]: where the row's pixels land under the backward flow
/// (vectorised), then each chain sampled there.
struct AdvanceRow<'a, 'b> {
    /// The row of the backward flow (interleaved) and of its confidence.
    flow: &'a [f32],
    conf: &'a [f32],
    y: usize,
    size: (usize, usize),
    /// The chains' previous states, and this row of their new ones.
    olds: &'a [&'a [f32]],
    outs: &'a mut [&'b mut [f32]],
    targets: &'a mut TargetCells,
}

impl Kernel for AdvanceRow<'_, '_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let AdvanceRow {
            flow,
            conf,
            y,
            size,
            olds,
            outs,
            targets,
        } = self;
        let w = size.0;
        targets.fill(flow, y, size, 3);
        let TargetCells {
            cell,
            fx,
            fy,
            inside,
        } = targets;
        let (cell, fx, fy, inside) = (&cell[..w], &fx[..w], &fy[..w], &inside[..w]);
        let (flow, conf) = (&flow[..2 * w], &conf[..w]);
        let row = 3 * w;
        for (old, out) in olds.iter().zip(outs.iter_mut()) {
            let out = &mut out[..3 * w];
            for x in 0..w {
                let o = &mut out[3 * x..3 * x + 3];
                // Outside, the cell is 0 (a valid read) and the values are masked to 0.
                let [ou, ov, oc] = sample_cell(old, row, cell[x] as usize, fx[x], fy[x]);
                let keep = inside[x] != 0;
                o[0] = if keep { flow[2 * x] + ou } else { 0.0 };
                o[1] = if keep { flow[2 * x + 1] + ov } else { 0.0 };
                o[2] = if keep { conf[x] * oc } else { 0.0 };
            }
        }
    }
}

/// Bilinear sample of (Δx, Δy, confidence) of a chain's `data` in the cell whose top-left
/// value is at `i00` (`row` values a row).
#[allow(clippy::inline_always)] // inlined into dispatched kernels (`streamrecon_core::simd`)
#[inline(always)]
fn sample_cell(data: &[f32], row: usize, i00: usize, fx: f32, fy: f32) -> [f32; 3] {
    let (top, bottom) = (&data[i00..i00 + 6], &data[i00 + row..i00 + row + 6]);
    let mut out = [0.0f32; 3];
    for k in 0..3 {
        let t = top[k] + (top[k + 3] - top[k]) * fx;
        let b = bottom[k] + (bottom[k + 3] - bottom[k]) * fx;
        out[k] = t + (b - t) * fy;
    }
    out
}

/// Dense map from the current frame's pixels to a keyframe's pixels, with chained confidence,
/// stored interleaved per pixel as (Δx, Δy, confidence) so one bilinear lookup reads all three.
pub(super) struct Chain {
    pub(super) key: u64,
    /// Row-major at the frames' size (the flow's, when it advances).
    pub(super) data: Vec<f32>,
    /// The next state is written here, then swapped in (no allocation per frame).
    scratch: Vec<f32>,
}

impl Chain {
    /// A chain to `key` with its data as they were (a snapshot's).
    pub(super) fn from_data(key: u64, data: Vec<f32>) -> Self {
        Self {
            key,
            scratch: vec![0.0; data.len()],
            data,
        }
    }

    pub(super) fn new(key: u64, w: usize, h: usize) -> Self {
        let mut data = vec![0.0f32; w * h * 3];
        for px in data.chunks_exact_mut(3) {
            px[2] = 1.0;
        }
        Self {
            key,
            scratch: vec![0.0; data.len()],
            data,
        }
    }

    /// Extends chains by one frame with the backward flow (t → t−1) and its confidence, in one
    /// pass over the flow for all of them.
    pub(super) fn advance_all(chains: &mut [&mut Chain], bwd: &FlowField, bwd_conf: &[f32]) {
        let (w, h) = (bwd.width, bwd.height);
        for c in chains.iter_mut() {
            std::mem::swap(&mut c.data, &mut c.scratch);
        }
        // `scratch` now holds the previous state; `data` receives the new one.
        let olds: Vec<Vec<f32>> = chains
            .iter_mut()
            .map(|c| std::mem::take(&mut c.scratch))
            .collect();
        if w < 2 || h < 2 {
            // No cell to sample: every pixel's target is outside.
            for c in chains.iter_mut() {
                c.data.fill(0.0);
            }
        } else {
            let old_data: Vec<&[f32]> = olds.iter().map(Vec::as_slice).collect();
            let mut outs: Vec<&mut [f32]> =
                chains.iter_mut().map(|c| c.data.as_mut_slice()).collect();
            let rows: Vec<Vec<&mut [f32]>> = {
                let mut per_chain: Vec<std::slice::ChunksMut<'_, f32>> =
                    outs.iter_mut().map(|o| o.chunks_mut(3 * w)).collect();
                (0..h)
                    .map(|_| per_chain.iter_mut().filter_map(Iterator::next).collect())
                    .collect()
            };
            rows.into_par_iter().enumerate().for_each_init(
                || TargetCells::new(w),
                |targets, (y, mut row_outs)| {
                    vectorized(AdvanceRow {
                        flow: &bwd.data[2 * w * y..2 * w * (y + 1)],
                        conf: &bwd_conf[w * y..w * (y + 1)],
                        y,
                        size: (w, h),
                        olds: &old_data,
                        outs: &mut row_outs,
                        targets,
                    });
                },
            );
        }
        for (c, old) in chains.iter_mut().zip(olds) {
            c.scratch = old;
        }
    }

    pub(super) fn median_displacement(&self) -> f64 {
        let mut m: Vec<f32> = self
            .data
            .chunks_exact(3)
            .filter(|d| d[2] > 0.3)
            .step_by(7)
            .map(|d| (d[0] * d[0] + d[1] * d[1]).sqrt())
            .collect();
        if m.is_empty() {
            return 0.0;
        }
        let mid = m.len() / 2;
        let (_, v, _) = m.select_nth_unstable_by(mid, f32::total_cmp);
        f64::from(*v)
    }
}
