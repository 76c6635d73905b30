//! Depth maps: float32 `.npy` (metres) and 16-bit PNG (millimetres, 0 = no surface).

use std::path::Path;

use npyz::WriterBuilder;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::io_util::{read_file, write_atomic};

/// A depth map in metres, row-major, 0 = no surface.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// `metres` in whole millimetres, rounded half up and saturated to 0..=65535 (NaN: 0): the same
/// as `(metres * 1000).round().clamp(0, 65535)`, without `round`, a libm call per pixel on
/// baseline x86-64. The half is added in f64, where the sum is exact.
#[inline]
pub fn millimetres(metres: f32) -> u16 {
    (f64::from(metres * 1000.0) + 0.5) as u16
}

/// `metres` in 16-bit millimetres ([`millimetres`]), 0 where there is no surface (not finite,
/// or not positive): what the PNG files and the viewer store.
#[inline]
pub fn surface_millimetres(metres: f32) -> u16 {
    if metres.is_finite() && metres > 0.0 {
        millimetres(metres)
    } else {
        0
    }
}

/// A depth map (metres) in 16-bit millimetres ([`surface_millimetres`]).
pub fn depth_millimetres(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&d| surface_millimetres(d)).collect()
}

/// Encodes a depth map in millimetres ([`depth_millimetres`]) as 16-bit PNG bytes (saturated
/// at 65.535 m).
///
/// # Panics
/// Only if `mm` does not match `width`×`height` (a bug).
pub fn millimetre_png_bytes(width: usize, height: usize, mm: &[u16]) -> Vec<u8> {
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(width as u32, height as u32, mm)
        .expect("depth buffer matches its size");
    crate::native::png_bytes(&img)
}

/// Writes a 16-bit millimetre depth PNG atomically.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_depth_png(path: &Path, width: usize, height: usize, data: &[f32]) -> Result<()> {
    write_millimetre_png(path, width, height, &depth_millimetres(data))
}

/// [`write_depth_png`] of a depth map already in millimetres.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_millimetre_png(path: &Path, width: usize, height: usize, mm: &[u16]) -> Result<()> {
    let bytes = millimetre_png_bytes(width, height, mm);
    write_atomic(path, |w| w.write_all(&bytes))
}

/// Reads a 16-bit depth PNG with `scale` units per metre (1000 here, 5000 for TUM RGB-D).
///
/// # Errors
/// Not a 16-bit grey PNG, or I/O errors.
pub fn read_depth_png(path: &Path, scale: f32) -> Result<DepthMap> {
    let bytes = read_file(path)?;
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .map_err(|e| Error::format(path, format!("depth PNG: {e}")))?;
    let image::DynamicImage::ImageLuma16(img) = img else {
        return Err(Error::format(path, "depth PNG must be 16-bit grey"));
    };
    Ok(DepthMap {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.as_raw().iter().map(|&v| f32::from(v) / scale).collect(),
    })
}

/// Writes float32 depth as `.npy` (shape [H, W]) atomically.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_depth_npy(path: &Path, width: usize, height: usize, data: &[f32]) -> Result<()> {
    write_atomic(path, |w| {
        let mut npy = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[height as u64, width as u64])
            .writer(w)
            .begin_nd()?;
        npy.extend(data.iter().copied())?;
        npy.finish()
    })
}

/// Reads a float32 `.npy` depth map of shape [H, W].
///
/// # Errors
/// Not a 2-D float32 array, truncated, or I/O errors.
pub fn read_depth_npy(path: &Path) -> Result<DepthMap> {
    let bytes = read_file(path)?;
    let npy =
        npyz::NpyFile::new(&bytes[..]).map_err(|e| Error::format(path, format!("npy: {e}")))?;
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        return Err(Error::format(path, "depth .npy must be 2-D"));
    }
    let data: Vec<f32> = npy
        .into_vec()
        .map_err(|e| Error::format(path, format!("npy: {e}")))?;
    let (h, w) = (shape[0] as usize, shape[1] as usize);
    if data.len() != w * h {
        return Err(Error::format(path, "depth .npy truncated"));
    }
    Ok(DepthMap {
        width: w,
        height: h,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::{depth_millimetres, millimetres};

    #[test]
    fn millimetres_equal_rounding_and_clamping() {
        let reference = |m: f32| (m * 1000.0).round().clamp(0.0, 65535.0) as u16;
        // Every half-millimetre boundary and its float neighbours up to 70 m, and the edges.
        let mut checked = 0;
        for k in 0..140_000u32 {
            let half = (k as f32 + 0.5) / 1000.0;
            for m in [half, half.next_down(), half.next_up(), k as f32 / 1000.0] {
                assert_eq!(millimetres(m), reference(m), "{m} m");
                checked += 1;
            }
        }
        for m in [
            -1.0,
            -0.0004,
            0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e9,
        ] {
            assert_eq!(millimetres(m), reference(m), "{m} m");
        }
        assert!(checked > 500_000);
    }

    #[test]
    fn depth_maps_convert_as_millimetres_with_no_surface_as_zero() {
        // Every half-millimetre boundary to 70 m with its float neighbours, and the values
        // that are no surface.
        let mut depth: Vec<f32> = (0..140_000u32)
            .flat_map(|k| {
                let half = (k as f32 + 0.5) / 1000.0;
                [half, half.next_down(), half.next_up()]
            })
            .collect();
        depth.extend([
            -1.0,
            -0.0,
            0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e9,
            f32::MAX,
            1e-9,
        ]);
        let got = depth_millimetres(&depth);
        assert_eq!(got.len(), depth.len());
        for (&d, &g) in depth.iter().zip(&got) {
            let want = if d.is_finite() && d > 0.0 {
                millimetres(d)
            } else {
                0
            };
            assert_eq!(g, want, "{d} m");
        }
        assert_eq!(got[got.len() - 5..], [0, 0, 65_535, 65_535, 0]);
    }
}
