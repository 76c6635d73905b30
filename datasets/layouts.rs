//! Benchmark layouts besides the native one, each with a writer (from the synthetic world) and a
//! reader (which also reads the real datasets laid out that way):
//!
//! | layout | files |
//! |---|---|
//! | MPI-Sintel | `training/final/<scene>/frame_0001.png`, `training/flow/<scene>/frame_0001.flo` (1→2), `training/occlusions/<scene>/frame_0001.png`, `training/depth/<scene>/frame_0001.dpt` |
//! | KITTI-2015 flow | `training/image_2/000000_10.png` + `_11.png`, `training/flow_occ/000000_10.png` (all pixels), `training/flow_noc/000000_10.png` (visible pixels) |
//! | TUM RGB-D | `rgb/<t>.png`, `depth/<t>.png` (16-bit, 5000 per metre), `rgb.txt`, `depth.txt`, `groundtruth.txt` |
//! | Long3D | `images/000000.png` at 10 Hz, `dense_cloud_map.pcd` |
//! | 7-Scenes (read only) | `seq-01/frame-000000.color.png`, `.depth.png` (mm), `.pose.txt` (4×4 world_from_cam) |

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use nalgebra::{Matrix3, Matrix4, Rotation3, Translation3, UnitQuaternion};

use super::formats::{depth, flo, kitti_flow, pcd, tum};
use super::native::{mask_png_bytes, rgb_png_bytes};
use super::synth::SynthFrame;
use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::{Intrinsics, Pose};
use streamrecon_core::io_util::{create_dir, read_file, write_atomic, write_bytes_atomic};

/// Dataset layouts `streamrecon synth --format` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Layout {
    Native,
    Sintel,
    Kitti,
    Tum,
    Long3d,
}

/// Sintel `.dpt` depth: float tag 202021.25, i32 width, i32 height, f32 depth row-major.
pub fn dpt_to_bytes(width: usize, height: usize, data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + data.len() * 4);
    out.extend_from_slice(&flo::FLO_MAGIC.to_le_bytes());
    out.extend_from_slice(&(width as i32).to_le_bytes());
    out.extend_from_slice(&(height as i32).to_le_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a Sintel `.dpt` depth map.
///
/// # Errors
/// Wrong tag, bad size, truncated data.
pub fn read_dpt(path: &Path) -> Result<depth::DepthMap> {
    let b = read_file(path)?;
    if b.len() < 12
        || f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits() != flo::FLO_MAGIC.to_bits()
    {
        return Err(Error::format(path, "not a .dpt file (tag)"));
    }
    let w = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let h = i32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if w <= 0 || h <= 0 || (w as usize) * (h as usize) * 4 + 12 != b.len() {
        return Err(Error::format(path, ".dpt size disagrees with its header"));
    }
    let data = b[12..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(depth::DepthMap {
        width: w as usize,
        height: h as usize,
        data,
    })
}

/// Writes a synthetic sequence in a benchmark layout, one frame at a time.
pub struct LayoutWriter {
    layout: Layout,
    dir: PathBuf,
    intrinsics: Intrinsics,
    poses: Vec<tum::StampedPose>,
    scene: String,
    /// KITTI: the first frame of the pending pair.
    pending_kitti: Option<(usize, Vec<u8>)>,
    kitti_pairs: usize,
}

impl LayoutWriter {
    /// Creates the folders of `layout` under `dir`.
    ///
    /// # Errors
    /// Folders that cannot be created.
    pub fn create(layout: Layout, dir: &Path, intrinsics: Intrinsics, scene: &str) -> Result<Self> {
        let subdirs: Vec<PathBuf> = match layout {
            Layout::Native => Vec::new(),
            Layout::Sintel => ["final", "flow", "occlusions", "depth"]
                .iter()
                .map(|s| dir.join("training").join(s).join(scene))
                .collect(),
            Layout::Kitti => ["image_2", "flow_occ", "flow_noc"]
                .iter()
                .map(|s| dir.join("training").join(s))
                .collect(),
            Layout::Tum => vec![dir.join("rgb"), dir.join("depth")],
            Layout::Long3d => vec![dir.join("images")],
        };
        for d in subdirs {
            create_dir(&d)?;
        }
        Ok(Self {
            layout,
            dir: dir.to_path_buf(),
            intrinsics,
            poses: Vec::new(),
            scene: scene.to_string(),
            pending_kitti: None,
            kitti_pairs: 0,
        })
    }

    fn tum_stamp(t: f64) -> String {
        format!("{t:.6}")
    }

    /// Writes one frame's files.
    ///
    /// # Errors
    /// Any write failure, naming the file.
    pub fn write_frame(&mut self, f: &SynthFrame) -> Result<()> {
        let (w, h) = (
            self.intrinsics.width as usize,
            self.intrinsics.height as usize,
        );
        let i = f.index;
        let t = &self.dir.join("training");
        match self.layout {
            Layout::Native => {
                return Err(Error::Invalid(
                    "the native layout has its own writer".into(),
                ))
            }
            Layout::Sintel => {
                let name = format!("frame_{:04}", i + 1);
                write_bytes_atomic(
                    &t.join("final")
                        .join(&self.scene)
                        .join(format!("{name}.png")),
                    &rgb_png_bytes(&f.image),
                )?;
                write_bytes_atomic(
                    &t.join("depth")
                        .join(&self.scene)
                        .join(format!("{name}.dpt")),
                    &dpt_to_bytes(w, h, &f.view.depth),
                )?;
                if let Some((flow, occ)) = &f.flow_fwd {
                    flo::write_flo(
                        &t.join("flow").join(&self.scene).join(format!("{name}.flo")),
                        flow,
                    )?;
                    write_bytes_atomic(
                        &t.join("occlusions")
                            .join(&self.scene)
                            .join(format!("{name}.png")),
                        &mask_png_bytes(w as u32, h as u32, occ),
                    )?;
                }
            }
            Layout::Kitti => {
                let png = rgb_png_bytes(&f.image);
                if let Some((prev, prev_png)) = self.pending_kitti.take() {
                    let _ = prev;
                    let k = self.kitti_pairs;
                    write_bytes_atomic(
                        &t.join("image_2").join(format!("{k:06}_10.png")),
                        &prev_png,
                    )?;
                    write_bytes_atomic(&t.join("image_2").join(format!("{k:06}_11.png")), &png)?;
                    self.kitti_pairs += 1;
                }
                // Each frame starts a pair with the next one; its forward flow is that pair's GT.
                if let Some((flow, occ)) = &f.flow_fwd {
                    let k = self.kitti_pairs;
                    let valid_all: Vec<bool> = f.view.depth.iter().map(|&d| d > 0.0).collect();
                    let valid_noc: Vec<bool> =
                        valid_all.iter().zip(occ).map(|(v, o)| *v && !o).collect();
                    kitti_flow::write_kitti_flow(
                        &t.join("flow_occ").join(format!("{k:06}_10.png")),
                        flow,
                        Some(&valid_all),
                    )?;
                    kitti_flow::write_kitti_flow(
                        &t.join("flow_noc").join(format!("{k:06}_10.png")),
                        flow,
                        Some(&valid_noc),
                    )?;
                    self.pending_kitti = Some((i, png));
                }
            }
            Layout::Tum => {
                let s = Self::tum_stamp(f.timestamp);
                write_bytes_atomic(
                    &self.dir.join("rgb").join(format!("{s}.png")),
                    &rgb_png_bytes(&f.image),
                )?;
                let scaled: Vec<f32> = f.view.depth.iter().map(|d| d * 5.0).collect();
                // write_depth_png stores millimetres (×1000); ×5 more gives TUM's 5000 per metre.
                depth::write_depth_png(
                    &self.dir.join("depth").join(format!("{s}.png")),
                    w,
                    h,
                    &scaled,
                )?;
            }
            Layout::Long3d => {
                // 10 Hz from a 30 fps stream: every third frame.
                if i.is_multiple_of(3) {
                    write_bytes_atomic(
                        &self.dir.join("images").join(format!("{:06}.png", i / 3)),
                        &rgb_png_bytes(&f.image),
                    )?;
                }
            }
        }
        self.poses.push(tum::StampedPose {
            timestamp: f.timestamp,
            world_from_cam: f.view.world_from_cam,
        });
        Ok(())
    }

    /// Writes the per-sequence files (pose lists, calibration, ground-truth cloud).
    ///
    /// # Errors
    /// Any write failure, naming the file.
    pub fn finish(self, gt_cloud: &PointCloud) -> Result<()> {
        let k = self.intrinsics;
        match self.layout {
            Layout::Native | Layout::Sintel | Layout::Kitti => {}
            Layout::Tum => {
                let mut rgb = String::from("# color images\n# timestamp filename\n");
                let mut dep = String::from("# depth maps\n# timestamp filename\n");
                for p in &self.poses {
                    let s = Self::tum_stamp(p.timestamp);
                    let _ = writeln!(rgb, "{s} rgb/{s}.png");
                    let _ = writeln!(dep, "{s} depth/{s}.png");
                }
                write_bytes_atomic(&self.dir.join("rgb.txt"), rgb.as_bytes())?;
                write_bytes_atomic(&self.dir.join("depth.txt"), dep.as_bytes())?;
                tum::write_tum(&self.dir.join("groundtruth.txt"), &self.poses)?;
            }
            Layout::Long3d => {
                pcd::write_pcd(
                    &self.dir.join("dense_cloud_map.pcd"),
                    gt_cloud,
                    pcd::PcdData::BinaryCompressed,
                )?;
                let tenhz: Vec<_> = self.poses.iter().step_by(3).copied().collect();
                tum::write_tum(&self.dir.join("poses.txt"), &tenhz)?;
            }
        }
        let json = serde_json::to_vec_pretty(&k).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&self.dir.join("intrinsics.json"), |w| w.write_all(&json))
    }
}

/// One frame read from a benchmark layout.
#[derive(Debug, Clone)]
pub struct LayoutFrame {
    pub rgb: PathBuf,
    pub timestamp: f64,
    pub world_from_cam: Option<Pose>,
    /// Depth file and its units per metre.
    pub depth: Option<(PathBuf, f32)>,
    /// Ground-truth forward flow (to the next frame) when the layout has it.
    pub flow_fwd: Option<PathBuf>,
}

fn sorted_files(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads `timestamp filename` lists (TUM `rgb.txt`/`depth.txt`).
fn read_list(path: &Path) -> Result<Vec<(f64, String)>> {
    let text = String::from_utf8(read_file(path)?).map_err(|_| Error::format(path, "not UTF-8"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(t), Some(f)) = (it.next(), it.next()) else {
            return Err(Error::format(
                path,
                format!("line {}: expected 'timestamp filename'", n + 1),
            ));
        };
        let t: f64 = t
            .parse()
            .map_err(|_| Error::format(path, format!("line {}: bad timestamp", n + 1)))?;
        out.push((t, f.to_string()));
    }
    Ok(out)
}

fn nearest<T: Copy>(items: &[(f64, T)], t: f64, max_dt: f64) -> Option<T> {
    items
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
        .filter(|x| (x.0 - t).abs() <= max_dt)
        .map(|x| x.1)
}

/// Detects a benchmark layout in `dir`.
pub fn detect(dir: &Path) -> Option<Layout> {
    if dir.join("rgb.txt").is_file() && dir.join("rgb").is_dir() {
        return Some(Layout::Tum);
    }
    if dir.join("dense_cloud_map.pcd").is_file() {
        return Some(Layout::Long3d);
    }
    if dir.join("training/final").is_dir() || dir.join("training/clean").is_dir() {
        return Some(Layout::Sintel);
    }
    if dir.join("training/image_2").is_dir() {
        return Some(Layout::Kitti);
    }
    None
}

/// Reads a TUM RGB-D sequence: images with the nearest depth (≤ 20 ms) and ground-truth pose (≤ 20 ms).
///
/// # Errors
/// Missing or malformed lists.
pub fn read_tum_rgbd(dir: &Path) -> Result<Vec<LayoutFrame>> {
    let rgb = read_list(&dir.join("rgb.txt"))?;
    let depth_list = read_list(&dir.join("depth.txt")).unwrap_or_default();
    let gt = tum::read_tum(&dir.join("groundtruth.txt")).unwrap_or_default();
    let depth_idx: Vec<(f64, usize)> = depth_list
        .iter()
        .enumerate()
        .map(|(i, d)| (d.0, i))
        .collect();
    let gt_idx: Vec<(f64, usize)> = gt
        .iter()
        .enumerate()
        .map(|(i, g)| (g.timestamp, i))
        .collect();
    Ok(rgb
        .iter()
        .map(|(t, f)| LayoutFrame {
            rgb: dir.join(f),
            timestamp: *t,
            world_from_cam: nearest(&gt_idx, *t, 0.02).map(|i| gt[i].world_from_cam),
            depth: nearest(&depth_idx, *t, 0.02).map(|i| (dir.join(&depth_list[i].1), 5000.0)),
            flow_fwd: None,
        })
        .collect())
}

/// Reads a Sintel scene (`final` pass, or `clean` if there is no `final`).
///
/// # Errors
/// Missing folders.
pub fn read_sintel(dir: &Path, scene: &str) -> Result<Vec<LayoutFrame>> {
    let t = dir.join("training");
    let pass = if t.join("final").join(scene).is_dir() {
        "final"
    } else {
        "clean"
    };
    let frames = sorted_files(&t.join(pass).join(scene), ".png")?;
    Ok(frames
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let flow = t.join("flow").join(scene).join(format!("{stem}.flo"));
            let dpt = t.join("depth").join(scene).join(format!("{stem}.dpt"));
            LayoutFrame {
                rgb: p.clone(),
                timestamp: i as f64 / 24.0,
                world_from_cam: None,
                depth: dpt.is_file().then_some((dpt, 1.0)),
                flow_fwd: flow.is_file().then_some(flow),
            }
        })
        .collect())
}

/// One KITTI-2015 flow pair with its ground truth (all pixels and visible pixels).
#[derive(Debug, Clone)]
pub struct KittiPair {
    pub first: PathBuf,
    pub second: PathBuf,
    pub flow_occ: Option<PathBuf>,
    pub flow_noc: Option<PathBuf>,
}

/// Lists the KITTI-2015 flow pairs of `dir`.
///
/// # Errors
/// A missing `training/image_2` folder.
pub fn read_kitti_pairs(dir: &Path) -> Result<Vec<KittiPair>> {
    let t = dir.join("training");
    let firsts = sorted_files(&t.join("image_2"), "_10.png")?;
    Ok(firsts
        .into_iter()
        .map(|first| {
            let name = first
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let second = first.with_file_name(name.replace("_10.png", "_11.png"));
            let occ = t.join("flow_occ").join(&name);
            let noc = t.join("flow_noc").join(&name);
            KittiPair {
                first,
                second,
                flow_occ: occ.is_file().then_some(occ),
                flow_noc: noc.is_file().then_some(noc),
            }
        })
        .collect())
}

/// Reads a Long3D-style sequence: the image stream (10 Hz) and the ground-truth cloud.
///
/// # Errors
/// Missing images folder or a malformed cloud.
pub fn read_long3d(dir: &Path) -> Result<(Vec<LayoutFrame>, PointCloud)> {
    let img_dir = ["images", "image", "rgb", "imgs"]
        .iter()
        .map(|s| dir.join(s))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| dir.to_path_buf());
    let mut frames = sorted_files(&img_dir, ".png")?;
    frames.extend(sorted_files(&img_dir, ".jpg")?);
    frames.sort();
    let cloud = pcd::read_pcd(&dir.join("dense_cloud_map.pcd"))?;
    Ok((
        frames
            .into_iter()
            .enumerate()
            .map(|(i, p)| LayoutFrame {
                rgb: p,
                timestamp: i as f64 / 10.0,
                world_from_cam: None,
                depth: None,
                flow_fwd: None,
            })
            .collect(),
        cloud,
    ))
}

/// Reads a 7-Scenes sequence folder (`frame-NNNNNN.color.png`, `.depth.png` in mm, `.pose.txt`).
///
/// # Errors
/// A missing folder or a malformed pose file.
pub fn read_seven_scenes(seq: &Path) -> Result<Vec<LayoutFrame>> {
    let colors = sorted_files(seq, ".color.png")?;
    colors
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let base = c
                .to_string_lossy()
                .trim_end_matches(".color.png")
                .to_string();
            let pose_path = PathBuf::from(format!("{base}.pose.txt"));
            let depth_path = PathBuf::from(format!("{base}.depth.png"));
            let pose = if pose_path.is_file() {
                Some(read_pose_matrix(&pose_path)?)
            } else {
                None
            };
            Ok(LayoutFrame {
                rgb: c,
                timestamp: i as f64 / 30.0,
                world_from_cam: pose,
                depth: depth_path.is_file().then_some((depth_path, 1000.0)),
                flow_fwd: None,
            })
        })
        .collect()
}

/// A 4×4 row-major world_from_cam matrix in a text file.
fn read_pose_matrix(path: &Path) -> Result<Pose> {
    let text = String::from_utf8(read_file(path)?).map_err(|_| Error::format(path, "not UTF-8"))?;
    let v: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| Error::format(path, "bad number"))?;
    if v.len() != 16 || v.iter().any(|x| !x.is_finite()) {
        return Err(Error::format(path, "expected 16 finite numbers"));
    }
    let m = Matrix4::from_row_slice(&v);
    let r: Matrix3<f64> = m.fixed_view::<3, 3>(0, 0).into();
    let rot = UnitQuaternion::from_rotation_matrix(&Rotation3::from_matrix(&r));
    Ok(Pose::from_parts(
        Translation3::new(m[(0, 3)], m[(1, 3)], m[(2, 3)]),
        rot,
    ))
}

/// Reads a flow file by extension: `.flo`, or a KITTI `.png` (invalid pixels become NaN).
///
/// # Errors
/// Unreadable or malformed files.
pub fn read_flow_any(path: &Path) -> Result<FlowField> {
    if path.extension().is_some_and(|e| e == "png") {
        let k = kitti_flow::read_kitti_flow(path)?;
        let mut f = k.flow;
        for (i, v) in k.valid.iter().enumerate() {
            if !v {
                f.data[2 * i] = f32::NAN;
                f.data[2 * i + 1] = f32::NAN;
            }
        }
        Ok(f)
    } else {
        flo::read_flo(path)
    }
}
