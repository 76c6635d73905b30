//! Depth accuracy: AbsRel, RMSE and δ < 1.25 after median scaling (per frame or per sequence).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use streamrecon_core::error::{Error, Result};
use streamrecon_datasets::formats::depth;

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

/// How predicted depth is scaled to the ground truth before scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DepthScale {
    /// Each frame by its own median ratio.
    Frame,
    /// Every frame by the median of the frames' median ratios.
    Sequence,
}

/// Depth maps in a folder by file stem: `.npy` (metres) wins over `.png` (millimetres).
fn depth_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if ext == "npy" || (ext == "png" && !m.contains_key(&stem(&p))) {
            m.insert(stem(&p), p);
        }
    }
    Ok(m)
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn read_depth_any(p: &Path) -> Result<Vec<f32>> {
    Ok(if p.extension().is_some_and(|e| e == "npy") {
        depth::read_depth_npy(p)?.data
    } else {
        depth::read_depth_png(p, 1000.0)?.data
    })
}

/// Depth metrics of the predicted maps in `pred` against the ground truth in `gt`, matched by
/// file name (`.npy` metres or 16-bit PNG millimetres).
///
/// # Errors
/// A folder that cannot be listed, a map that cannot be read, maps of different sizes, or no
/// predicted map whose name is in `gt`.
pub fn depth_metrics_of_folders(gt: &Path, pred: &Path, scale: DepthScale) -> Result<DepthMetrics> {
    let g = depth_files(gt)?;
    let p = depth_files(pred)?;
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = p
        .iter()
        .filter_map(|(k, pp)| g.get(k).map(|gp| (gp.clone(), pp.clone())))
        .map(|(gp, pp)| {
            let (a, b) = (read_depth_any(&gp)?, read_depth_any(&pp)?);
            if a.len() != b.len() {
                return Err(Error::format(
                    &pp,
                    format!(
                        "{} depth values, the ground truth {} has {}",
                        b.len(),
                        gp.display(),
                        a.len()
                    ),
                ));
            }
            Ok((a, b))
        })
        .collect::<Result<_>>()?;
    if pairs.is_empty() {
        return Err(Error::Invalid(format!(
            "no predicted depth in {} matches a ground-truth name in {}",
            pred.display(),
            gt.display()
        )));
    }
    let seq_scale = {
        let mut s: Vec<f64> = pairs
            .iter()
            .filter_map(|(a, b)| median_scale(a, b, None))
            .collect();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(1.0)
    };
    let mut acc = DepthMetricsAcc::default();
    for (a, b) in &pairs {
        let k = match scale {
            DepthScale::Frame => median_scale(a, b, None).unwrap_or(1.0),
            DepthScale::Sequence => seq_scale,
        };
        acc.add(a, b, k, None);
    }
    Ok(acc.finish())
}
