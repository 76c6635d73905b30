//! Depth accuracy: AbsRel, RMSE and δ < 1.25 after median scaling (per frame or per sequence).

use serde::Serialize;

/// Depth errors over valid pixels.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DepthMetrics {
    pub abs_rel: f64,
    pub rmse: f64,
    pub delta_1_25: f64,
    pub pixels: u64,
}

/// Accumulates depth errors over frames.
#[derive(Debug, Clone, Default)]
pub struct DepthMetricsAcc {
    abs_rel: f64,
    sq: f64,
    within: u64,
    n: u64,
}

/// Median of gt/pred over pixels valid in both (and `mask`), the scale that aligns `pred` to `gt`.
pub fn median_scale(gt: &[f32], pred: &[f32], mask: Option<&[bool]>) -> Option<f64> {
    let mut r: Vec<f64> = gt
        .iter()
        .zip(pred)
        .enumerate()
        .filter(|(i, (g, p))| {
            **g > 0.0 && **p > 0.0 && g.is_finite() && p.is_finite() && mask.is_none_or(|m| m[*i])
        })
        .map(|(_, (g, p))| f64::from(*g) / f64::from(*p))
        .collect();
    if r.is_empty() {
        return None;
    }
    let mid = r.len() / 2;
    let (_, m, _) = r.select_nth_unstable_by(mid, f64::total_cmp);
    Some(*m)
}

impl DepthMetricsAcc {
    /// Adds a frame; `pred` is multiplied by `scale` first; `mask` limits the pixels.
    pub fn add(&mut self, gt: &[f32], pred: &[f32], scale: f64, mask: Option<&[bool]>) {
        for (i, (&g, &p)) in gt.iter().zip(pred).enumerate() {
            if !(g > 0.0 && p > 0.0 && g.is_finite() && p.is_finite())
                || mask.is_some_and(|m| !m[i])
            {
                continue;
            }
            let (g, p) = (f64::from(g), f64::from(p) * scale);
            self.abs_rel += (p - g).abs() / g;
            self.sq += (p - g).powi(2);
            if (p / g).max(g / p) < 1.25 {
                self.within += 1;
            }
            self.n += 1;
        }
    }

    pub fn finish(&self) -> DepthMetrics {
        if self.n == 0 {
            return DepthMetrics::default();
        }
        let n = self.n as f64;
        DepthMetrics {
            abs_rel: self.abs_rel / n,
            rmse: (self.sq / n).sqrt(),
            delta_1_25: self.within as f64 / n,
            pixels: self.n,
        }
    }
}
