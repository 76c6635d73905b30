//! Forward–backward consistency: confidence and occlusion from a pair of opposite flows.

use rayon::prelude::*;

use super::FlowField;

/// Per-pixel confidence and occlusion of `fwd`, checked against `bwd` sampled at the target.
///
/// Occluded where |f + b|² > 0.01 (|f|² + |b|²) + 0.5 (Sundaram et al. 2010), or where the target
/// leaves the image; confidence = 1 / (1 + |f + b|² / (2σ²)) with σ = 0.5 + 0.05 |f| (a Cauchy
/// kernel: as selective as a Gaussian near zero, no `exp` per pixel).
pub fn fb_consistency(fwd: &FlowField, bwd: &FlowField) -> (Vec<f32>, Vec<bool>) {
    let c = fb_check(fwd, bwd, false);
    (c.conf, c.occ)
}

/// What [`fb_check`] finds for one direction.
pub struct FbCheck {
    pub conf: Vec<f32>,
    pub occ: Vec<bool>,
    /// `fwd` refined by `bwd`, when asked for.
    pub fused: Option<FlowField>,
}

/// [`fb_consistency`] and, with `fuse`, `fwd` refined by `bwd` in the same pass: where the two
/// flows agree (not occluded), the average of `fwd` and `bwd` negated at the target, else `fwd`
/// unchanged. DIS's errors in the two directions are partly independent, so on visible pixels
/// the average is closer to the true motion than either; occluded pixels keep their own
/// estimate. Confidence and occlusion are judged on the flows as given.
pub fn fb_check(fwd: &FlowField, bwd: &FlowField, fuse: bool) -> FbCheck {
    let (w, h) = (fwd.width, fwd.height);
    let mut conf = vec![0.0f32; w * h];
    let mut occ = vec![true; w * h];
    let mut fused = fuse.then(|| fwd.clone());
    let fused_rows: Vec<&mut [f32]> = match &mut fused {
        Some(f) => f.data.chunks_mut(2 * w).collect(),
        None => Vec::new(),
    };
    let work = |y: usize, cr: &mut [f32], or: &mut [bool], mut fr: Option<&mut [f32]>| {
        for x in 0..w {
            let (u, v) = fwd.get(x, y);
            let Some((bu, bv)) = bwd.sample(x as f32 + u, y as f32 + v) else {
                continue;
            };
            let (eu, ev) = (u + bu, v + bv);
            let e2 = eu * eu + ev * ev;
            let m2 = u * u + v * v + bu * bu + bv * bv;
            let occluded = e2 > 0.01 * m2 + 0.5;
            or[x] = occluded;
            let sigma = 0.5 + 0.05 * (u * u + v * v).sqrt();
            cr[x] = 1.0 / (1.0 + e2 / (2.0 * sigma * sigma));
            if let (false, Some(row)) = (occluded, fr.as_deref_mut()) {
                row[2 * x] = u - 0.5 * eu;
                row[2 * x + 1] = v - 0.5 * ev;
            }
        }
    };
    if fuse {
        conf.par_chunks_mut(w)
            .zip(occ.par_chunks_mut(w))
            .zip(fused_rows.into_par_iter())
            .enumerate()
            .for_each(|(y, ((cr, or), fr))| work(y, cr, or, Some(fr)));
    } else {
        conf.par_chunks_mut(w)
            .zip(occ.par_chunks_mut(w))
            .enumerate()
            .for_each(|(y, (cr, or))| work(y, cr, or, None));
    }
    FbCheck { conf, occ, fused }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(w: usize, h: usize, u: f32, v: f32) -> FlowField {
        let mut f = FlowField::zeros(w, h);
        for p in f.data.chunks_exact_mut(2) {
            p[0] = u;
            p[1] = v;
        }
        f
    }

    #[test]
    fn fusion_averages_agreeing_flows_and_keeps_disagreeing_ones() {
        // True motion (2, 1); the forward estimate is 0.2 px off in u, the backward one 0.1 px
        // off in v: the fused forward flow is the average, (2.1, 1.05) → error halved in u.
        let fwd = uniform(32, 24, 2.2, 1.0);
        let bwd = uniform(32, 24, -2.0, -1.1);
        let fuse = |f, b| fb_check(f, b, true).fused.expect("asked for");
        let fused = fuse(&fwd, &bwd);
        let (u, v) = fused.get(5, 5);
        assert!((u - 2.1).abs() < 1e-5 && (v - 1.05).abs() < 1e-5, "{u} {v}");
        // A target leaving the image keeps its own estimate.
        assert_eq!(fused.get(31, 5), (2.2, 1.0));
        // Flows that disagree by more than the occlusion test allows are left alone.
        let far = uniform(32, 24, -5.0, 3.0);
        assert_eq!(fuse(&fwd, &far).get(5, 5), (2.2, 1.0));
    }
}
