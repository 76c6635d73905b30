//! The demo's accuracy report: a run on a native-layout sequence against its ground truth.

use std::path::Path;

use streamrecon_core::error::Result;
use streamrecon_datasets::formats::depth as depth_fmt;
use streamrecon_datasets::native::NativeDataset;
use streamrecon_pipeline::RunOutcome;

use crate::depth::{median_scale, DepthMetricsAcc};
use crate::pose::pose_metrics;

/// ATE against the dataset's poses and depth AbsRel on the depth maps the run wrote into
/// `run_dir`, as two indented lines.
///
/// # Errors
/// The sequence or a depth map cannot be read, or the trajectory cannot be aligned.
pub fn accuracy_report(seq: &Path, run_dir: &Path, outcome: &RunOutcome) -> Result<String> {
    let ds = NativeDataset::open(seq)?;
    let gt: Vec<_> = outcome
        .trajectory
        .iter()
        .map(|t| ds.poses[t.source_index as usize].world_from_cam)
        .collect();
    let est: Vec<_> = outcome
        .trajectory
        .iter()
        .map(|t| t.world_from_cam)
        .collect();
    let pm = pose_metrics(&gt, &est, 1)?;
    let mut acc = DepthMetricsAcc::default();
    let mut acc_frame = DepthMetricsAcc::default();
    for t in &outcome.trajectory {
        let p = run_dir.join("depth").join(format!("{:06}.png", t.index));
        if !p.exists() {
            continue;
        }
        let pred = depth_fmt::read_depth_png(&p, 1000.0)?;
        let gtd = ds.depth(t.source_index as usize)?;
        acc.add(&gtd, &pred.data, pm.scale, None);
        if let Some(s) = median_scale(&gtd, &pred.data, None) {
            acc_frame.add(&gtd, &pred.data, s, None);
        }
    }
    let dm = acc.finish();
    let fm = acc_frame.finish();
    Ok(format!(
        "  ATE RMSE {:.4} m over a {:.2} m path ({:.2} % of its length), RPE {:.4} m / {:.3}° per frame\n  depth AbsRel {:.4}, δ<1.25 {:.3} with one scale per sequence; AbsRel {:.4}, δ<1.25 {:.3} with per-frame median scaling ({} confident pixels)",
        pm.ate_rmse,
        pm.gt_length,
        100.0 * pm.ate_rmse_over_length,
        pm.rpe_trans_rmse,
        pm.rpe_rot_deg,
        dm.abs_rel,
        dm.delta_1_25,
        fm.abs_rel,
        fm.delta_1_25,
        dm.pixels
    ))
}
