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
    if w < 2 || h < 2 || (bwd.width, bwd.height) != (w, h) {
        // Degenerate or mismatched fields: nothing can be checked, everything stays occluded.
        return FbCheck { conf, occ, fused };
    }
    let (xmax, ymax) = ((w - 1) as f32, (h - 1) as f32);
    let stride = 2 * w;
    let back = &bwd.data;
    // Images are far smaller than 2³¹ pixels a side.
    let (last_cell_x, last_cell_y) = ((w - 2) as i32, (h - 2) as i32);
    // One row; the bilinear sample of `bwd` is written out here (not `FlowField::sample`) so
    // the row loop has no calls, one division per pixel, a float column counter and i32
    // casts (usize ↔ float conversions are instruction sequences on baseline x86-64): this
    // pass costs about as much as DIS itself.
    let work = |y: usize, cr: &mut [f32], or: &mut [bool], mut fr: Option<&mut [f32]>| {
        let row = &fwd.data[y * stride..(y + 1) * stride];
        let yf = y as f32;
        let mut xf = -1.0f32;
        for (x, ((f, c), o)) in row
            .chunks_exact(2)
            .zip(cr.iter_mut())
            .zip(or.iter_mut())
            .enumerate()
        {
            xf += 1.0;
            let (u, v) = (f[0], f[1]);
            let (tx, ty) = (xf + u, yf + v);
            if !(tx >= 0.0 && ty >= 0.0 && tx <= xmax && ty <= ymax) {
                continue;
            }
            // tx, ty ≥ 0: truncation is floor; the last column/row samples its left/top cell.
            let x0 = (tx as i32).min(last_cell_x);
            let y0 = (ty as i32).min(last_cell_y);
            let (fx, fy) = (tx - x0 as f32, ty - y0 as f32);
            let (x0, y0) = (x0 as usize, y0 as usize);
            let i = y0 * stride + 2 * x0;
            let (top, bottom) = (&back[i..i + 4], &back[i + stride..i + stride + 4]);
            let (w00, w10) = ((1.0 - fx) * (1.0 - fy), fx * (1.0 - fy));
            let (w01, w11) = ((1.0 - fx) * fy, fx * fy);
            let bu = top[0] * w00 + top[2] * w10 + bottom[0] * w01 + bottom[2] * w11;
            let bv = top[1] * w00 + top[3] * w10 + bottom[1] * w01 + bottom[3] * w11;
            let (eu, ev) = (u + bu, v + bv);
            let e2 = eu * eu + ev * ev;
            let f2 = u * u + v * v;
            let occluded = e2 > 0.01 * (f2 + bu * bu + bv * bv) + 0.5;
            *o = occluded;
            let sigma = 0.5 + 0.05 * f2.sqrt();
            let two_s2 = 2.0 * sigma * sigma;
            *c = two_s2 / (two_s2 + e2);
            if let (false, Some(out)) = (occluded, fr.as_deref_mut()) {
                out[2 * x] = u - 0.5 * eu;
                out[2 * x + 1] = v - 0.5 * ev;
            }
        }
    };
    let fused_rows: Vec<&mut [f32]> = match &mut fused {
        Some(f) => f.data.chunks_mut(stride).collect(),
        None => Vec::new(),
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
