//! Flow accuracy: EPE (all / non-occluded / occluded), Fl-all and n-pixel accuracies.

use serde::{Deserialize, Serialize};

use super::FlowField;
use streamrecon_core::error::{Error, Result};

/// Error statistics of a predicted flow against ground truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowMetrics {
    /// Mean end-point error over valid pixels.
    pub epe: f64,
    /// Mean EPE over valid, non-occluded pixels (NaN when there are none).
    pub epe_noc: f64,
    /// Mean EPE over valid, occluded pixels (NaN when there are none).
    pub epe_occ: f64,
    /// Fraction of outliers: error > 3 px and > 5 % of the true magnitude (KITTI Fl-all).
    pub fl_all: f64,
    /// Fractions of pixels with error below 1, 3 and 5 px.
    pub acc_1px: f64,
    pub acc_3px: f64,
    pub acc_5px: f64,
    /// Pixels counted.
    pub pixels: u64,
}

/// Running sums so metrics can be accumulated over many frames.
#[derive(Debug, Clone, Default)]
pub struct FlowMetricsAcc {
    n: u64,
    sum: f64,
    n_noc: u64,
    sum_noc: f64,
    n_occ: u64,
    sum_occ: f64,
    outliers: u64,
    within: [u64; 3],
}

impl FlowMetricsAcc {
    /// Adds one frame. `valid` (None = all valid) and `occluded` (None = none occluded) are per pixel.
    ///
    /// # Errors
    /// Mismatched sizes.
    pub fn add(
        &mut self,
        gt: &FlowField,
        pred: &FlowField,
        valid: Option<&[bool]>,
        occluded: Option<&[bool]>,
    ) -> Result<()> {
        if gt.width != pred.width || gt.height != pred.height {
            return Err(Error::Invalid(format!(
                "flow sizes differ: ground truth {}x{}, prediction {}x{}",
                gt.width, gt.height, pred.width, pred.height
            )));
        }
        let n = gt.width * gt.height;
        if valid.is_some_and(|v| v.len() != n) || occluded.is_some_and(|o| o.len() != n) {
            return Err(Error::Invalid(
                "mask size differs from the flow size".into(),
            ));
        }
        for i in 0..n {
            if valid.is_some_and(|v| !v[i]) {
                continue;
            }
            let (gu, gv) = (gt.data[2 * i], gt.data[2 * i + 1]);
            let (pu, pv) = (pred.data[2 * i], pred.data[2 * i + 1]);
            if !(gu.is_finite() && gv.is_finite()) {
                continue;
            }
            let e = f64::from(((pu - gu).powi(2) + (pv - gv).powi(2)).sqrt());
            let e = if e.is_finite() { e } else { f64::MAX.sqrt() };
            let mag = f64::from((gu * gu + gv * gv).sqrt());
            self.n += 1;
            self.sum += e;
            if occluded.is_some_and(|o| o[i]) {
                self.n_occ += 1;
                self.sum_occ += e;
            } else {
                self.n_noc += 1;
                self.sum_noc += e;
            }
            if e > 3.0 && e > 0.05 * mag {
                self.outliers += 1;
            }
            for (k, t) in [1.0, 3.0, 5.0].iter().enumerate() {
                if e < *t {
                    self.within[k] += 1;
                }
            }
        }
        Ok(())
    }

    pub fn finish(&self) -> FlowMetrics {
        let div = |a: f64, b: u64| if b == 0 { f64::NAN } else { a / b as f64 };
        FlowMetrics {
            epe: div(self.sum, self.n),
            epe_noc: div(self.sum_noc, self.n_noc),
            epe_occ: div(self.sum_occ, self.n_occ),
            fl_all: div(self.outliers as f64, self.n),
            acc_1px: div(self.within[0] as f64, self.n),
            acc_3px: div(self.within[1] as f64, self.n),
            acc_5px: div(self.within[2] as f64, self.n),
            pixels: self.n,
        }
    }
}

/// Metrics of one flow field.
///
/// # Errors
/// Mismatched sizes.
pub fn flow_metrics(
    gt: &FlowField,
    pred: &FlowField,
    valid: Option<&[bool]>,
    occluded: Option<&[bool]>,
) -> Result<FlowMetrics> {
    let mut acc = FlowMetricsAcc::default();
    acc.add(gt, pred, valid, occluded)?;
    Ok(acc.finish())
}
