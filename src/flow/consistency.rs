//! Forward–backward consistency: confidence and occlusion from a pair of opposite flows.

use rayon::prelude::*;

use super::FlowField;

/// Per-pixel confidence and occlusion of `fwd`, checked against `bwd` sampled at the target.
///
/// Occluded where |f + b|² > 0.01 (|f|² + |b|²) + 0.5 (Sundaram et al. 2010), or where the target
/// leaves the image; confidence = 1 / (1 + |f + b|² / (2σ²)) with σ = 0.5 + 0.05 |f| (a Cauchy
/// kernel: as selective as a Gaussian near zero, no `exp` per pixel).
pub fn fb_consistency(fwd: &FlowField, bwd: &FlowField) -> (Vec<f32>, Vec<bool>) {
    let (w, h) = (fwd.width, fwd.height);
    let mut conf = vec![0.0f32; w * h];
    let mut occ = vec![true; w * h];
    conf.par_chunks_mut(w)
        .zip(occ.par_chunks_mut(w))
        .enumerate()
        .for_each(|(y, (cr, or))| {
            for x in 0..w {
                let (u, v) = fwd.get(x, y);
                let Some((bu, bv)) = bwd.sample(x as f32 + u, y as f32 + v) else {
                    continue;
                };
                let (eu, ev) = (u + bu, v + bv);
                let e2 = eu * eu + ev * ev;
                let m2 = u * u + v * v + bu * bu + bv * bv;
                or[x] = e2 > 0.01 * m2 + 0.5;
                let sigma = 0.5 + 0.05 * (u * u + v * v).sqrt();
                cr[x] = 1.0 / (1.0 + e2 / (2.0 * sigma * sigma));
            }
        });
    (conf, occ)
}
