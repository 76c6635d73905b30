//! The reference's `load_and_preprocess_images(mode="crop")`, bit-exact to PIL: RGBA composited
//! on white, width to 518, height rounded (half to even) to a multiple of 14, PIL's 8-bit bicubic
//! resize (fixed-point taps, horizontal pass first, rounding between passes), centre crop of rows
//! beyond 518.

use candle_core::{Device, Tensor};
use image::{RgbImage, RgbaImage};

use crate::ops::bicubic_aa_taps;
use streamrecon_core::error::{Error, Result};

/// The reference's target width.
pub const TARGET_WIDTH: usize = 518;

/// PIL's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// `Image.alpha_composite(white, img).convert("RGB")` with PIL's integer arithmetic.
pub fn composite_on_white(img: &RgbaImage) -> RgbImage {
    const SHIFT: u32 = 7;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let a = u32::from(p[3]);
        // With an opaque white destination PIL's coefficients reduce to a·2⁷ and (255−a)·2⁷.
        let coef1 = a << SHIFT;
        let coef2 = (255 << SHIFT) - coef1;
        let blend = |c: u8| -> u8 {
            let t = u32::from(c) * coef1 + 255 * coef2 + (0x80 << SHIFT);
            let div255 = ((t >> 8) + t) >> 8;
            (div255 >> SHIFT) as u8
        };
        image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])])
    })
}

/// Fixed-point taps as PIL's `normalize_coeffs_8bpc` rounds them.
fn fixed_taps(input: usize, output: usize) -> Vec<(usize, Vec<i64>)> {
    bicubic_aa_taps(input, output)
        .into_iter()
        .map(|(first, w)| {
            let k = w
                .iter()
                .map(|&v| {
                    let s = v * f64::from(1u32 << PRECISION_BITS);
                    if v < 0.0 {
                        (-0.5 + s) as i64
                    } else {
                        (0.5 + s) as i64
                    }
                })
                .collect();
            (first, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL `Image.resize((w, h), BICUBIC)` for RGB images.
pub fn resize_bicubic_pil(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let half = 1i64 << (PRECISION_BITS - 1);
    let horizontal = if out_w == in_w {
        img.clone()
    } else {
        let taps = fixed_taps(in_w, out_w);
        RgbImage::from_fn(out_w as u32, in_h as u32, |x, y| {
            let (first, k) = &taps[x as usize];
            let mut acc = [half; 3];
            for (j, kk) in k.iter().enumerate() {
                let p = img.get_pixel((first + j) as u32, y).0;
                for c in 0..3 {
                    acc[c] += i64::from(p[c]) * kk;
                }
            }
            image::Rgb([clip8(acc[0]), clip8(acc[1]), clip8(acc[2])])
        })
    };
    if out_h == in_h {
        return horizontal;
    }
    let taps = fixed_taps(in_h, out_h);
    RgbImage::from_fn(out_w as u32, out_h as u32, |x, y| {
        let (first, k) = &taps[y as usize];
        let mut acc = [half; 3];
        for (j, kk) in k.iter().enumerate() {
            let p = horizontal.get_pixel(x, (first + j) as u32).0;
            for c in 0..3 {
                acc[c] += i64::from(p[c]) * kk;
            }
        }
        image::Rgb([clip8(acc[0]), clip8(acc[1]), clip8(acc[2])])
    })
}

/// Python's `round` (half to even) of a non-negative value.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() < f64::EPSILON * x.abs().max(1.0) && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// Output height of crop mode for a `w × h` image, before the centre crop.
pub fn crop_mode_height(w: usize, h: usize, target_width: usize, patch: usize) -> usize {
    let hf = h as f64 * (target_width as f64 / w as f64) / patch as f64;
    round_half_even(hf) as usize * patch
}

/// Crop-mode preprocessing of one RGB image to u8 `[3, H', W']` (channel-major), H' ≤ width.
///
/// # Errors
/// An image so small or so wide that its height rounds to zero.
pub fn preprocess_crop_u8(
    img: &RgbImage,
    target_width: usize,
    patch: usize,
) -> Result<(Vec<u8>, usize, usize)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let new_h = crop_mode_height(w, h, target_width, patch);
    if w == 0 || new_h == 0 {
        return Err(Error::Invalid(format!(
            "image {w}×{h} is too flat for the model: its height rounds to 0 patches"
        )));
    }
    let resized = resize_bicubic_pil(img, target_width, new_h);
    let (top, out_h) = if new_h > target_width {
        ((new_h - target_width) / 2, target_width)
    } else {
        (0, new_h)
    };
    let mut out = vec![0u8; 3 * out_h * target_width];
    for y in 0..out_h {
        for x in 0..target_width {
            let p = resized.get_pixel(x as u32, (y + top) as u32).0;
            for c in 0..3 {
                out[(c * out_h + y) * target_width + x] = p[c];
            }
        }
    }
    Ok((out, out_h, target_width))
}

/// Crop-mode preprocessing to the model input `[1, 3, H', W']` in [0, 1].
///
/// # Errors
/// As [`preprocess_crop_u8`].
pub fn preprocess_crop(img: &RgbImage, target_width: usize, patch: usize) -> Result<Tensor> {
    let (u8s, h, w) = preprocess_crop_u8(img, target_width, patch)?;
    let f: Vec<f32> = u8s.iter().map(|&v| f32::from(v) / 255.0).collect();
    Ok(Tensor::from_vec(f, (1, 3, h, w), &Device::Cpu)?)
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values are the point
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(2.4999), 2.0);
        assert_eq!(crop_mode_height(74, 6, 518, 14), 42);
        assert_eq!(crop_mode_height(518, 35, 518, 14), 28);
    }
}
