//! `streamrecon eval run`: the pipeline over every sequence of a dataset folder, each scored
//! against its ground truth (poses, depth, the Long3D reconstruction metrics), with plots, a
//! `metrics.json` per sequence (a rerun skips the sequences that have one) and a Markdown table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nalgebra::Point3;
use serde::{Deserialize, Serialize};

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Intrinsics;
use streamrecon_core::io_util::{create_dir, write_bytes_atomic};
use streamrecon_datasets::formats::{depth as depth_fmt, pcd, ply, tum};
use streamrecon_datasets::layouts::{self, Layout};
use streamrecon_datasets::native::{rgb_png_bytes, NativeDataset};
use streamrecon_pipeline::source::{BenchmarkKind, Source, SourceOptions, SourceSpec};
use streamrecon_pipeline::{self as pipeline, PipelineConfig, RunOptions, RunOutcome};

use crate::depth::{depth_metrics_of_folders, DepthScale};
use crate::long3d::{self, Long3dConfig};
use crate::plot::{plot, Series};
use crate::pose::{pose_metrics, umeyama};

/// One sequence's results (`<out>/<sequence>/metrics.json`).
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct SequenceMetrics {
    pub sequence: String,
    pub frames: u64,
    pub fps: f64,
    pub frames_tracked: u64,
    pub map_segments: u32,
    pub pose: Option<serde_json::Value>,
    pub depth: Option<serde_json::Value>,
    pub long3d: Option<serde_json::Value>,
}

fn json_error(path: &Path, e: &serde_json::Error) -> Error {
    Error::format(path, e.to_string())
}

fn to_json(v: impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Invalid(e.to_string()))
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    write_bytes_atomic(path, &rgb_png_bytes(img))
}

/// Whether `dir` is a sequence `eval run` can score: the native layout or the Long3D layout.
fn is_scorable(dir: &Path) -> bool {
    NativeDataset::detect(dir) || layouts::detect(dir) == Some(Layout::Long3d)
}

/// The sequences under `dir`: itself if it is one, else its subfolders that are.
///
/// # Errors
/// `dir` cannot be listed, or holds no sequence.
pub fn sequences(dir: &Path) -> Result<Vec<PathBuf>> {
    if is_scorable(dir) {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_scorable(p))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(Error::Invalid(format!(
            "no sequence (native layout, or Long3D layout with dense_cloud_map.pcd) in or under {}",
            dir.display()
        )));
    }
    Ok(v)
}

/// The predicted cloud as the official protocol builds it: every `stride`-th frame's depth map
/// (confident pixels, as written by the run) lifted to the world with that frame's pose.
fn cloud_from_depth_maps(run_dir: &Path, outcome: &RunOutcome, stride: u64) -> Result<PointCloud> {
    let path = run_dir.join("intrinsics.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let report: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| json_error(&path, &e))?;
    let k: Intrinsics =
        serde_json::from_value(report["model"].clone()).map_err(|e| json_error(&path, &e))?;
    let mut points = Vec::new();
    for t in outcome
        .trajectory
        .iter()
        .filter(|t| t.index.is_multiple_of(stride.max(1)))
    {
        let p = run_dir.join("depth").join(format!("{:06}.png", t.index));
        let Ok(d) = depth_fmt::read_depth_png(&p, 1000.0) else {
            continue;
        };
        for (i, &z) in d.data.iter().enumerate() {
            if z > 0.0 {
                let (x, y) = ((i % d.width) as f64, (i / d.width) as f64);
                let w = t.world_from_cam * k.unproject(x, y, f64::from(z));
                points.push([w.x as f32, w.y as f32, w.z as f32]);
            }
        }
    }
    Ok(PointCloud::from_points(points))
}

/// Runs the pipeline `config` describes over `seq` (its files in `config.out_dir`) and scores it;
/// the plots go to `out`.
///
/// # Errors
/// The sequence cannot be read, the run stops on an error, or the scores cannot be written.
pub fn eval_sequence(
    seq: &Path,
    config: &PipelineConfig,
    out: &Path,
    stride: u64,
) -> Result<SequenceMetrics> {
    let name = seq
        .file_name()
        .map_or_else(|| "sequence".into(), |n| n.to_string_lossy().to_string());
    let run_dir = config
        .out_dir
        .clone()
        .ok_or_else(|| Error::Invalid("eval needs the run's output folder".into()))?;
    let native = NativeDataset::detect(seq);
    let spec = if native {
        SourceSpec::Dataset(seq.to_path_buf())
    } else {
        SourceSpec::Benchmark(seq.to_path_buf(), BenchmarkKind::Long3d)
    };
    let source = Source::open(&spec, SourceOptions::default())?;
    let stop = Arc::new(AtomicBool::new(false));
    let outcome = pipeline::run(source, config, &stop)?;
    if let Some(e) = outcome.error {
        return Err(Error::Invalid(format!("running {}: {e}", seq.display())));
    }
    // Ground-truth poses when the sequence has them (synthetic and native sequences; the Long3D
    // release has only the LiDAR map).
    let gt_poses = if seq.join("poses.txt").is_file() {
        Some(tum::read_tum(&seq.join("poses.txt"))?)
    } else {
        None
    };
    let est: Vec<_> = outcome
        .trajectory
        .iter()
        .map(|t| t.world_from_cam)
        .collect();
    let mut pose_json = None;
    let mut sim = None;
    let mut top_gt: Vec<(f64, f64)> = Vec::new();
    let mut top_est: Vec<(f64, f64)> = est
        .iter()
        .map(|p| (p.translation.x, p.translation.z))
        .collect();
    if let Some(gt_poses) = &gt_poses {
        let gt: Vec<_> = outcome
            .trajectory
            .iter()
            .map(|t| {
                gt_poses
                    .get(t.source_index as usize)
                    .map(|p| p.world_from_cam)
                    .ok_or_else(|| {
                        Error::format(
                            seq.join("poses.txt"),
                            format!("no pose for frame {}", t.source_index),
                        )
                    })
            })
            .collect::<Result<_>>()?;
        let pm = pose_metrics(&gt, &est, 1)?;
        let cg: Vec<Point3<f64>> = gt.iter().map(|p| p.translation.vector.into()).collect();
        let ce: Vec<Point3<f64>> = est.iter().map(|p| p.translation.vector.into()).collect();
        let s = umeyama(&ce, &cg, true)?;
        let aligned: Vec<Point3<f64>> = ce.iter().map(|p| s.apply(p)).collect();
        top_gt = cg.iter().map(|p| (p.x, p.z)).collect();
        top_est = aligned.iter().map(|p| (p.x, p.z)).collect();
        let err: Vec<(f64, f64)> = aligned
            .iter()
            .zip(&cg)
            .enumerate()
            .map(|(i, (a, g))| (i as f64, (a - g).norm()))
            .collect();
        write_png(
            &out.join("ate_over_time.png"),
            &plot(
                &[Series {
                    points: &err,
                    color: [40, 40, 220],
                }],
                800,
                300,
                false,
            ),
        )?;
        pose_json = Some(to_json(pm)?);
        sim = Some(s);
    }
    // Top view (x, z): ground truth black, the (aligned) estimate red.
    let mut series = Vec::new();
    if !top_gt.is_empty() {
        series.push(Series {
            points: &top_gt,
            color: [0, 0, 0],
        });
    }
    series.push(Series {
        points: &top_est,
        color: [220, 40, 40],
    });
    write_png(
        &out.join("trajectory_top.png"),
        &plot(&series, 640, 640, true),
    )?;
    let depth = native
        .then(|| {
            depth_metrics_of_folders(
                &seq.join("depth"),
                &run_dir.join("depth"),
                DepthScale::Frame,
            )
            .ok()
        })
        .flatten();
    // Reconstruction: the fused cloud moved into the GT world by the trajectory's Sim(3), then the
    // Long3D protocol with an identity extrinsic, starting ICP from that alignment (the official
    // centroid re-centring would undo it where the clouds' coverage differs).
    let gt_cloud = if native {
        ply::read_ply(&seq.join("gt_points.ply")).ok()
    } else {
        pcd::read_pcd(&seq.join("dense_cloud_map.pcd")).ok()
    }
    .filter(|c| !c.is_empty());
    let pred_cloud = cloud_from_depth_maps(&run_dir, &outcome, stride)?;
    let long3d = match gt_cloud {
        Some(gc) if !pred_cloud.is_empty() => {
            let mut pc = pred_cloud;
            let cfg = if let Some(sim) = &sim {
                // With GT poses, their Sim(3) is the initial alignment.
                for p in &mut pc.points {
                    let q = sim.apply(&Point3::new(
                        f64::from(p[0]),
                        f64::from(p[1]),
                        f64::from(p[2]),
                    ));
                    *p = [q.x as f32, q.y as f32, q.z as f32];
                }
                Long3dConfig {
                    cam_to_lidar: long3d::IDENTITY_CAM_TO_LIDAR,
                    centre_init: false,
                    ..Long3dConfig::default()
                }
            } else {
                // Without them: exactly the official protocol (extrinsic, centre + 0.75 scale, ICP).
                Long3dConfig::default()
            };
            long3d::evaluate(&pc, &gc, &cfg)
                .ok()
                .map(|r| to_json(r.metrics))
                .transpose()?
        }
        _ => None,
    };
    Ok(SequenceMetrics {
        sequence: name,
        frames: outcome.summary.frames_processed,
        fps: outcome.summary.fps,
        frames_tracked: outcome.summary.frames_tracked,
        map_segments: outcome.summary.map_segments,
        pose: pose_json,
        depth: depth.map(to_json).transpose()?,
        long3d,
    })
}

/// Runs and scores every sequence in or under `dataset` with `options`, into `out`
/// (`<sequence>/metrics.json`, plots and run files; `metrics.json` and `metrics.md` over all);
/// sequences with a `metrics.json` already are not run again. `say` hears a line per sequence.
/// Returns the Markdown table.
///
/// # Errors
/// No sequence, a sequence that fails, or a file that cannot be written.
pub fn eval_run(
    dataset: &Path,
    options: &RunOptions,
    out: &Path,
    stride: u64,
    mut say: impl FnMut(&str),
) -> Result<String> {
    create_dir(out)?;
    let mut all = Vec::new();
    for seq in sequences(dataset)? {
        let name = seq
            .file_name()
            .map_or_else(|| "sequence".into(), |n| n.to_string_lossy().to_string());
        let dir = out.join(&name);
        let done = dir.join("metrics.json");
        let m: SequenceMetrics = if let Ok(bytes) = std::fs::read(&done) {
            say(&format!("{name}: already evaluated, skipped"));
            serde_json::from_slice(&bytes).map_err(|e| json_error(&done, &e))?
        } else {
            say(&format!("{name}: running"));
            create_dir(&dir)?;
            let config = PipelineConfig {
                out_dir: Some(dir.join("run")),
                progress: true,
                ..options.pipeline_config()?
            };
            let m = eval_sequence(&seq, &config, &dir, stride)?;
            write_bytes_atomic(&done, &to_json_bytes(&m)?)?;
            m
        };
        all.push(m);
    }
    write_bytes_atomic(&out.join("metrics.json"), &to_json_bytes(&all)?)?;
    let md = metrics_table(&all);
    write_bytes_atomic(&out.join("metrics.md"), md.as_bytes())?;
    Ok(md)
}

fn to_json_bytes(v: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(e.to_string()))
}

/// The Markdown table of every sequence's scores.
fn metrics_table(all: &[SequenceMetrics]) -> String {
    let f = |v: &Option<serde_json::Value>, k: &str| {
        v.as_ref()
            .and_then(|v| v[k].as_f64())
            .map_or("–".to_string(), |x| format!("{x:.4}"))
    };
    let mut md = String::from("| sequence | frames | tracked | fps | ATE RMSE | ATE / length | RPE trans | AbsRel | δ<1.25 | Acc | Comp | NC |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for m in all {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.sequence,
            m.frames,
            m.frames_tracked,
            m.fps,
            f(&m.pose, "ate_rmse"),
            f(&m.pose, "ate_rmse_over_length"),
            f(&m.pose, "rpe_trans_rmse"),
            f(&m.depth, "abs_rel"),
            f(&m.depth, "delta_1_25"),
            f(&m.long3d, "Acc"),
            f(&m.long3d, "Comp"),
            f(&m.long3d, "NC_mean"),
        );
    }
    md
}
