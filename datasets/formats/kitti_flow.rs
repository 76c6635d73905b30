//! KITTI 2015 flow PNG: 16-bit RGB, u = (R − 2^15)/64, v = (G − 2^15)/64, B = valid.

use std::path::Path;

use image::{ImageBuffer, Rgb};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::io_util::{read_file, write_atomic};

const OFFSET: f32 = 32768.0;
const SCALE: f32 = 64.0;

/// Flow plus the validity mask KITTI stores in the blue channel.
#[derive(Debug, Clone, PartialEq)]
pub struct KittiFlow {
    pub flow: FlowField,
    pub valid: Vec<bool>,
}

/// Decodes KITTI flow PNG bytes; `path` names the input in errors.
///
/// # Errors
/// Not a PNG, not 16-bit RGB, or truncated.
pub fn kitti_flow_from_bytes(bytes: &[u8], path: &Path) -> Result<KittiFlow> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| Error::format(path, format!("KITTI flow PNG: {e}")))?;
    let image::DynamicImage::ImageRgb16(img) = img else {
        return Err(Error::format(path, "KITTI flow PNG must be 16-bit RGB"));
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut flow = FlowField::zeros(w, h);
    let mut valid = vec![false; w * h];
    for (i, p) in img.pixels().enumerate() {
        let ok = p[2] > 0;
        valid[i] = ok;
        if ok {
            flow.data[2 * i] = (f32::from(p[0]) - OFFSET) / SCALE;
            flow.data[2 * i + 1] = (f32::from(p[1]) - OFFSET) / SCALE;
        }
    }
    Ok(KittiFlow { flow, valid })
}

/// Reads a KITTI flow PNG.
///
/// # Errors
/// See [`kitti_flow_from_bytes`], plus I/O errors.
pub fn read_kitti_flow(path: &Path) -> Result<KittiFlow> {
    kitti_flow_from_bytes(&read_file(path)?, path)
}

/// Encodes flow as KITTI PNG bytes (values clamped to the format's ±512 px range).
///
/// # Panics
/// Only if the flow's buffer does not match its size (a bug).
pub fn kitti_flow_to_bytes(flow: &FlowField, valid: Option<&[bool]>) -> Vec<u8> {
    let enc = |v: f32| (v * SCALE + OFFSET).round().clamp(0.0, 65535.0) as u16;
    let img: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_fn(flow.width as u32, flow.height as u32, |x, y| {
            let i = y as usize * flow.width + x as usize;
            let ok = valid.is_none_or(|m| m[i])
                && flow.data[2 * i].is_finite()
                && flow.data[2 * i + 1].is_finite();
            if ok {
                Rgb([enc(flow.data[2 * i]), enc(flow.data[2 * i + 1]), 1])
            } else {
                Rgb([0, 0, 0])
            }
        });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encoding into memory cannot fail");
    out
}

/// Writes a KITTI flow PNG atomically.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_kitti_flow(path: &Path, flow: &FlowField, valid: Option<&[bool]>) -> Result<()> {
    let bytes = kitti_flow_to_bytes(flow, valid);
    write_atomic(path, |w| w.write_all(&bytes))
}
