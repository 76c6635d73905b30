//! The project's native dataset layout (see `datasets/README.md`): writer and reader.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::formats::{depth, flo, ply, tum};
use super::synth::SynthFrame;
use streamrecon_core::cloud::PointCloud;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::{Frame, GroundTruth, Intrinsics};
use streamrecon_core::io_util::{create_dir, read_file, write_atomic, write_bytes_atomic};

const SUBDIRS: [&str; 6] = ["rgb", "depth", "flow_fwd", "flow_bwd", "occ_fwd", "occ_bwd"];

/// File name of frame `i` with an extension.
pub fn frame_name(i: usize, ext: &str) -> String {
    format!("{i:06}.{ext}")
}

/// Encodes an image as PNG with fast compression (speed matters more than size for datasets).
///
/// # Panics
/// Never for in-memory output.
pub fn png_bytes<P, C>(img: &image::ImageBuffer<P, C>) -> Vec<u8>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Sub,
    );
    img.write_with_encoder(enc)
        .expect("PNG encoding into memory cannot fail");
    out
}

/// Encodes an RGB image as PNG with fast compression.
pub fn rgb_png_bytes(img: &image::RgbImage) -> Vec<u8> {
    png_bytes(img)
}

/// Encodes a boolean mask as an 8-bit PNG (255 = true).
///
/// # Panics
/// Only if `mask` does not match the size (a bug).
pub fn mask_png_bytes(width: u32, height: u32, mask: &[bool]) -> Vec<u8> {
    let img = image::GrayImage::from_raw(
        width,
        height,
        mask.iter().map(|&m| if m { 255 } else { 0 }).collect(),
    )
    .expect("mask matches its size");
    png_bytes(&img)
}

/// Extra facts about a synthetic sequence.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SequenceMeta {
    pub generator: String,
    pub frames: usize,
    pub fps: f64,
    /// Frames right after an abrupt viewpoint change.
    pub jump_frames: Vec<usize>,
    pub config: serde_json::Value,
}

/// Writes a sequence in the native layout, one frame at a time.
pub struct NativeWriter {
    dir: PathBuf,
    intrinsics: Intrinsics,
    poses: Vec<tum::StampedPose>,
}

impl NativeWriter {
    /// Creates the folder tree and writes `intrinsics.json`.
    ///
    /// # Errors
    /// The folder cannot be created or written.
    pub fn create(dir: &Path, intrinsics: Intrinsics) -> Result<Self> {
        for sub in SUBDIRS {
            create_dir(&dir.join(sub))?;
        }
        let json =
            serde_json::to_vec_pretty(&intrinsics).map_err(|e| Error::Invalid(e.to_string()))?;
        write_bytes_atomic(&dir.join("intrinsics.json"), &json)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            intrinsics,
            poses: Vec::new(),
        })
    }

    /// Writes one frame's files.
    ///
    /// # Errors
    /// Any write failure, naming the file.
    pub fn write_frame(&mut self, f: &SynthFrame) -> Result<()> {
        let (w, h) = (self.intrinsics.width, self.intrinsics.height);
        let d = &self.dir;
        let i = f.index;
        let jobs: Vec<Box<dyn FnOnce() -> Result<()> + Send + '_>> = vec![
            Box::new(|| {
                write_bytes_atomic(
                    &d.join("rgb").join(frame_name(i, "png")),
                    &rgb_png_bytes(&f.image),
                )
            }),
            Box::new(|| {
                depth::write_depth_npy(
                    &d.join("depth").join(frame_name(i, "npy")),
                    w as usize,
                    h as usize,
                    &f.view.depth,
                )
            }),
            Box::new(|| {
                depth::write_depth_png(
                    &d.join("depth").join(frame_name(i, "png")),
                    w as usize,
                    h as usize,
                    &f.view.depth,
                )
            }),
            Box::new(|| {
                if let Some((flow, occ)) = &f.flow_fwd {
                    flo::write_flo(&d.join("flow_fwd").join(frame_name(i, "flo")), flow)?;
                    write_bytes_atomic(
                        &d.join("occ_fwd").join(frame_name(i, "png")),
                        &mask_png_bytes(w, h, occ),
                    )?;
                }
                Ok(())
            }),
            Box::new(|| {
                if let Some((flow, occ)) = &f.flow_bwd {
                    flo::write_flo(&d.join("flow_bwd").join(frame_name(i, "flo")), flow)?;
                    write_bytes_atomic(
                        &d.join("occ_bwd").join(frame_name(i, "png")),
                        &mask_png_bytes(w, h, occ),
                    )?;
                }
                Ok(())
            }),
        ];
        jobs.into_par_iter()
            .map(|j| j())
            .collect::<Result<Vec<()>>>()?;
        self.poses.push(tum::StampedPose {
            timestamp: f.timestamp,
            world_from_cam: f.view.world_from_cam,
        });
        Ok(())
    }

    /// Writes `poses.txt`, the ground-truth cloud (PLY and PCD) and `meta.json`.
    ///
    /// # Errors
    /// Any write failure, naming the file.
    pub fn finish(self, gt_cloud: &PointCloud, meta: &SequenceMeta) -> Result<()> {
        tum::write_tum(&self.dir.join("poses.txt"), &self.poses)?;
        ply::write_ply(&self.dir.join("gt_points.ply"), gt_cloud)?;
        super::formats::pcd::write_pcd(
            &self.dir.join("gt_points.pcd"),
            gt_cloud,
            super::formats::pcd::PcdData::Binary,
        )?;
        let json = serde_json::to_vec_pretty(meta).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&self.dir.join("meta.json"), |w| w.write_all(&json))
    }
}

/// Reads a native-layout folder.
#[derive(Debug, Clone)]
pub struct NativeDataset {
    pub dir: PathBuf,
    pub intrinsics: Intrinsics,
    pub poses: Vec<tum::StampedPose>,
    pub rgb: Vec<PathBuf>,
    pub meta: Option<SequenceMeta>,
}

impl NativeDataset {
    /// Whether `dir` looks like a native-layout dataset.
    pub fn detect(dir: &Path) -> bool {
        dir.join("intrinsics.json").is_file()
            && dir.join("rgb").is_dir()
            && dir.join("poses.txt").is_file()
    }

    /// Opens a dataset folder.
    ///
    /// # Errors
    /// Missing or malformed `intrinsics.json`, `poses.txt` or `rgb/`.
    pub fn open(dir: &Path) -> Result<Self> {
        let ipath = dir.join("intrinsics.json");
        let intrinsics: Intrinsics = serde_json::from_slice(&read_file(&ipath)?)
            .map_err(|e| Error::format(&ipath, format!("intrinsics.json: {e}")))?;
        if intrinsics.width == 0
            || intrinsics.height == 0
            || !(intrinsics.fx > 0.0 && intrinsics.fy > 0.0)
        {
            return Err(Error::format(
                &ipath,
                "intrinsics must have positive size and focal lengths",
            ));
        }
        let poses = tum::read_tum(&dir.join("poses.txt"))?;
        let rgb_dir = dir.join("rgb");
        let mut rgb: Vec<PathBuf> = std::fs::read_dir(&rgb_dir)
            .map_err(|e| Error::io(&rgb_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        rgb.sort();
        if rgb.len() != poses.len() {
            return Err(Error::format(
                dir,
                format!(
                    "{} images in rgb/ but {} poses in poses.txt",
                    rgb.len(),
                    poses.len()
                ),
            ));
        }
        let meta = std::fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self {
            dir: dir.to_path_buf(),
            intrinsics,
            poses,
            rgb,
            meta,
        })
    }

    pub fn len(&self) -> usize {
        self.rgb.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rgb.is_empty()
    }

    /// Ground-truth depth of frame `i` (metres), from the `.npy` file.
    ///
    /// # Errors
    /// Missing or malformed file, or a size that disagrees with the intrinsics.
    pub fn depth(&self, i: usize) -> Result<Vec<f32>> {
        let p = self.dir.join("depth").join(frame_name(i, "npy"));
        let d = depth::read_depth_npy(&p)?;
        if d.width != self.intrinsics.width as usize || d.height != self.intrinsics.height as usize
        {
            return Err(Error::format(&p, "depth size differs from intrinsics"));
        }
        Ok(d.data)
    }

    /// Ground-truth forward flow of frame `i` (to `i + 1`).
    ///
    /// # Errors
    /// Missing or malformed file.
    pub fn flow_fwd(&self, i: usize) -> Result<FlowField> {
        flo::read_flo(&self.dir.join("flow_fwd").join(frame_name(i, "flo")))
    }

    /// Forward occlusion mask of frame `i` (true = occluded or leaving the image).
    ///
    /// # Errors
    /// Missing or malformed file.
    pub fn occ_fwd(&self, i: usize) -> Result<Vec<bool>> {
        let p = self.dir.join("occ_fwd").join(frame_name(i, "png"));
        let img = image::open(&p)
            .map_err(|e| Error::format(&p, e.to_string()))?
            .to_luma8();
        Ok(img.as_raw().iter().map(|&v| v > 127).collect())
    }

    /// Frame `i` with its image, intrinsics, pose and depth.
    ///
    /// # Errors
    /// Missing or corrupt files.
    pub fn frame(&self, i: usize, with_depth: bool) -> Result<Frame> {
        let p = &self.rgb[i];
        let image = crate::formats::rgb::read_rgb(p)?;
        let pose = self.poses[i];
        Ok(Frame {
            index: i as u64,
            source_index: i as u64,
            timestamp: pose.timestamp,
            image,
            intrinsics: Some(self.intrinsics),
            gt: Some(GroundTruth {
                world_from_cam: Some(pose.world_from_cam),
                depth: if with_depth {
                    Some(self.depth(i)?)
                } else {
                    None
                },
                flow_fwd: None,
            }),
        })
    }
}
