//! `streamrecon eval flow|pose|depth|long3d|run`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use streamrecon::datasets::formats::{flo, tum};
use streamrecon::eval::depth::{depth_metrics_of_folders, DepthScale};
use streamrecon::eval::long3d;
use streamrecon::eval::pose::{associate, pose_metrics};
use streamrecon::eval::run::eval_run;
use streamrecon::flow::metrics::FlowMetricsAcc;

use super::flags::EngineFlags;

#[derive(Subcommand)]
pub(super) enum EvalCommand {
    /// Flow metrics (EPE all/noc/occ, Fl-all, 1/3/5 px) of predicted .flo files against ground truth.
    Flow {
        #[arg(long)]
        gt: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        /// Occlusion masks (PNG, 255 = occluded) named like the flows; default GT/../occ_fwd if present.
        #[arg(long)]
        occ: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The Long3D protocol (as the official InfiniteVGGT script): Acc, Comp, NC of a predicted cloud.
    Long3d {
        /// Predicted cloud (.ply or .pcd), in the run's camera/world frame.
        #[arg(long)]
        pred: PathBuf,
        /// Ground-truth map (.pcd or .ply), e.g. dense_cloud_map.pcd.
        #[arg(long)]
        gt: PathBuf,
        /// Camera→LiDAR extrinsic: official, identity, or a file of 16 numbers (row-major 4×4).
        #[arg(long, default_value = "official")]
        extrinsic: String,
        #[arg(long, default_value_t = 0.015)]
        voxel: f64,
        /// Factor on rms_gt/rms_pred in the initial scale (the official 0.75; 1.0 for some scenes).
        #[arg(long, default_value_t = 0.75)]
        scale_init: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Depth metrics (AbsRel, RMSE, δ<1.25) of predicted depth PNGs (mm) against ground truth
    /// (.npy metres or 16-bit PNG mm), matched by file name.
    Depth {
        #[arg(long)]
        gt: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        /// Median scaling per frame, or one scale for the whole sequence.
        #[arg(long, value_enum, default_value = "frame")]
        scale: DepthScale,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the pipeline over a dataset folder (or every dataset inside it) and evaluate poses,
    /// depth and the reconstruction: metrics.json, metrics.md and plots; finished sequences are skipped.
    Run {
        #[arg(long)]
        dataset: PathBuf,
        #[command(flatten)]
        engines: Box<EngineFlags>,
        #[arg(long)]
        out: PathBuf,
        /// The predicted cloud is built from every N-th frame's depth map (the official protocol: 10).
        #[arg(long, default_value_t = 10)]
        stride: u64,
    },
    /// ATE / RPE of a TUM trajectory against a TUM ground truth (matched by timestamp as evo
    /// does).
    Pose {
        #[arg(long)]
        gt: PathBuf,
        #[arg(long)]
        pred: PathBuf,
        #[arg(long, default_value_t = 1)]
        delta: usize,
        /// Poses further apart in time than this are not matched, seconds (evo's `--t_max_diff`).
        #[arg(long, default_value_t = streamrecon::eval::pose::MAX_TIME_DIFF)]
        max_time_diff: f64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub(super) fn read_cloud(path: &Path) -> Result<streamrecon::cloud::PointCloud> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("ply") => Ok(streamrecon::datasets::formats::ply::read_ply(path)?),
        Some("pcd") => Ok(streamrecon::datasets::formats::pcd::read_pcd(path)?),
        _ => bail!("point clouds must be .ply or .pcd: {}", path.display()),
    }
}

pub(super) fn parse_extrinsic(s: &str) -> Result<[[f64; 4]; 4]> {
    match s {
        "official" => Ok(long3d::OFFICIAL_CAM_TO_LIDAR),
        "identity" => Ok(long3d::IDENTITY_CAM_TO_LIDAR),
        file => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the extrinsic: {file}"))?;
            let v: Vec<f64> = text
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .filter(|t| !t.is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("the extrinsic must be 16 numbers: {file}"))?;
            if v.len() != 16 || v.iter().any(|x| !x.is_finite()) {
                bail!("the extrinsic must be 16 finite numbers (row-major 4×4): {file}");
            }
            Ok(std::array::from_fn(|r| {
                std::array::from_fn(|c| v[r * 4 + c])
            }))
        }
    }
}

pub(super) fn write_json(value: &impl serde::Serialize, out: Option<&Path>) -> Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    println!("{json}");
    if let Some(o) = out {
        streamrecon::io_util::write_bytes_atomic(o, json.as_bytes())?;
    }
    Ok(())
}

/// Depth maps of a folder by file stem: `.npy` in metres or 16-bit `.png` in millimetres.
pub(super) fn cmd_eval(e: &EvalCommand) -> Result<()> {
    match e {
        EvalCommand::Long3d {
            pred,
            gt,
            extrinsic,
            voxel,
            scale_init,
            seed,
            out,
        } => {
            let cfg = long3d::Long3dConfig {
                cam_to_lidar: parse_extrinsic(extrinsic)?,
                voxel: *voxel,
                scale_init: *scale_init,
                seed: *seed,
                ..long3d::Long3dConfig::default()
            };
            let (p, g) = (read_cloud(pred)?, read_cloud(gt)?);
            let t = std::time::Instant::now();
            let report = long3d::evaluate(&p, &g, &cfg)?;
            log::info!("Long3D evaluation in {:.1} s", t.elapsed().as_secs_f64());
            write_json(&report.metrics, out.as_deref())?;
        }
        EvalCommand::Depth {
            gt,
            pred,
            scale,
            out,
        } => {
            let m = depth_metrics_of_folders(gt, pred, *scale)?;
            write_json(
                &serde_json::json!({"scale": format!("{scale:?}").to_lowercase(), "metrics": m}),
                out.as_deref(),
            )?;
        }
        EvalCommand::Run {
            dataset,
            engines,
            out,
            stride,
        } => {
            let md = eval_run(dataset, &engines.options(), out, *stride, |line| {
                println!("{line}");
            })?;
            print!("{md}");
        }
        EvalCommand::Flow { gt, pred, occ, out } => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(gt)
                .with_context(|| format!("cannot list {}", gt.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "flo"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("no .flo files in {}", gt.display());
            }
            let occ_dir = occ.clone().or_else(|| {
                gt.parent()
                    .map(|p| p.join("occ_fwd"))
                    .filter(|p| p.is_dir())
            });
            let mut acc = FlowMetricsAcc::default();
            let mut n = 0;
            for g in &files {
                let name = g.file_name().context("file name")?;
                let p = pred.join(name);
                if !p.exists() {
                    continue;
                }
                let gf = flo::read_flo(g)?;
                let pf = flo::read_flo(&p)?;
                let occ_mask = match &occ_dir {
                    Some(d) => {
                        let op = d.join(Path::new(name).with_extension("png"));
                        image::open(&op).ok().map(|i| {
                            i.to_luma8()
                                .as_raw()
                                .iter()
                                .map(|&v| v > 127)
                                .collect::<Vec<bool>>()
                        })
                    }
                    None => None,
                };
                acc.add(&gf, &pf, None, occ_mask.as_deref())
                    .with_context(|| format!("comparing {}", p.display()))?;
                n += 1;
            }
            if n == 0 {
                bail!(
                    "no predicted flow in {} matches a ground-truth file name",
                    pred.display()
                );
            }
            let json = serde_json::to_string_pretty(
                &serde_json::json!({"frames": n, "metrics": acc.finish()}),
            )?;
            println!("{json}");
            if let Some(o) = out {
                streamrecon::io_util::write_bytes_atomic(o, json.as_bytes())?;
            }
        }
        EvalCommand::Pose {
            gt,
            pred,
            delta,
            max_time_diff,
            out,
        } => {
            let g = tum::read_tum(gt)?;
            let p = tum::read_tum(pred)?;
            let (gts, ests) = associate(&g, &p, *max_time_diff)
                .with_context(|| format!("matching {} to {}", pred.display(), gt.display()))?;
            let m = pose_metrics(&gts, &ests, *delta)?;
            let json = serde_json::to_string_pretty(&m)?;
            println!("{json}");
            if let Some(o) = out {
                streamrecon::io_util::write_bytes_atomic(o, json.as_bytes())?;
            }
        }
    }
    Ok(())
}
