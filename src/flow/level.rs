//! The grey images DIS runs on: each frame's luma brought to DIS's finest level as OpenCV's
//! pyramid brings it there (an area resize), made once per frame.

use opencv::core::{Mat, Scalar, Size, CV_8UC1};
use opencv::imgproc::{resize, INTER_AREA};
use opencv::prelude::*;

use crate::dis::both;
use streamrecon_core::error::Result;
use streamrecon_core::frame::RgbImage;
use streamrecon_core::simd::{vectorized, Kernel};

/// `grey` at DIS's finest level, made as OpenCV's pyramid makes it: an area resize to
/// ⌊w / 2^shift⌋ × ⌊h / 2^shift⌋.
pub(crate) fn level_grey(grey: Mat, shift: u32) -> Result<Mat> {
    if shift == 0 {
        return Ok(grey);
    }
    let size = Size::new(grey.cols() >> shift, grey.rows() >> shift);
    if size.width < 1 || size.height < 1 {
        // Left to `DisEngine::calc`, which names the frames.
        return Ok(Mat::default());
    }
    let mut out = Mat::default();
    resize(&grey, &mut out, size, 0.0, 0.0, INTER_AREA)?;
    Ok(out)
}

/// Luma of an RGB image as an 8-bit OpenCV matrix.
///
/// # Errors
/// OpenCV allocation failure.
pub fn grey_mat(img: &RgbImage) -> Result<Mat> {
    let (w, h) = (img.width() as i32, img.height() as i32);
    let mut m = Mat::new_rows_cols_with_default(h, w, CV_8UC1, Scalar::all(0.0))?;
    let dst = m.data_bytes_mut()?;
    vectorized(Luma {
        rgb: img.as_raw(),
        dst,
    });
    Ok(m)
}

/// The luma of `img` at DIS's level `shift` (each pixel the mean of a 2^shift-square block of
/// the frame's lumas), when the frame's sides divide by 2^shift: what [`grey_mat`] and
/// [`level_grey`] make, bit for bit, in one pass over the frame without its full-size grey
/// image, in two halves on two cores with `parallel` (see [`both`]). `None` for other sizes
/// (OpenCV's area resize then weighs partial pixels) or `shift` 0.
pub(crate) fn level_grey_from_rgb(
    img: &RgbImage,
    shift: u32,
    parallel: bool,
) -> Result<Option<Mat>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let k = 1usize << shift;
    if shift == 0 || shift > 4 || w % k != 0 || h % k != 0 || w == 0 || h == 0 {
        return Ok(None);
    }
    let (lw, lh) = (w / k, h / k);
    let mut m = Mat::new_rows_cols_with_default(lh as i32, lw as i32, CV_8UC1, Scalar::all(0.0))?;
    let dst = m.data_bytes_mut()?;
    let rgb = img.as_raw();
    let (top, bottom) = dst.split_at_mut((lh / 2) * lw);
    let (rgb_top, rgb_bottom) = rgb.split_at((lh / 2) * k * w * 3);
    both(
        parallel,
        || block_means(rgb_top, w, k, top),
        || block_means(rgb_bottom, w, k, bottom),
    );
    Ok(Some(m))
}

/// `out` (rows of `w` / `k` bytes) = the means of `k`-square blocks of the lumas of `rgb` (rows
/// of `w` RGB pixels), rounded to the nearest as OpenCV's area resize rounds: ties up when
/// halving (its vector path), ties to even otherwise (sum · (1 / k²) rounded by `cvRound`).
fn block_means(rgb: &[u8], w: usize, k: usize, out: &mut [u8]) {
    let lw = w / k;
    let mut luma = vec![0u8; w];
    let mut sums = vec![0u32; lw];
    let scale = 1.0 / (k * k) as f32;
    for (out_row, block) in out.chunks_exact_mut(lw).zip(rgb.chunks_exact(3 * w * k)) {
        sums.fill(0);
        for row in block.chunks_exact(3 * w) {
            vectorized(Luma {
                rgb: row,
                dst: &mut luma,
            });
            for (s, px) in sums.iter_mut().zip(luma.chunks_exact(k)) {
                *s += px.iter().map(|&v| u32::from(v)).sum::<u32>();
            }
        }
        for (o, &s) in out_row.iter_mut().zip(&sums) {
            // At most 255: a mean of bytes.
            *o = if k == 2 {
                ((s + 2) >> 2) as u8
            } else {
                (s as f32 * scale).round_ties_even() as u8
            };
        }
    }
}

/// `dst` = luma of interleaved RGB bytes, (77 R + 150 G + 29 B + 128) / 256.
struct Luma<'a> {
    rgb: &'a [u8],
    dst: &'a mut [u8],
}

impl Kernel for Luma<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        for (d, p) in self.dst.iter_mut().zip(self.rgb.chunks_exact(3)) {
            // At most 65,408: u16 arithmetic, twice the lanes of u32.
            let sum = 77 * u16::from(p[0]) + 150 * u16::from(p[1]) + 29 * u16::from(p[2]) + 128;
            *d = (sum >> 8) as u8;
        }
    }
}
