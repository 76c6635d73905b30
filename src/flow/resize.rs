//! Resizing flows and float planes: OpenCV's bilinear resize (`INTER_LINEAR`), and our own
//! enlargement that gives its bits. The engine enlarges two flows and two confidences a frame
//! from DIS's grid (2.4 MB a flow at 640×480): [`upsample_linear`] writes each output once,
//! where OpenCV's needs a zeroed (or separately allocated) destination, and takes about two
//! thirds of OpenCV's time for a 2-channel flow. `tests` compare the two bit for bit.

use opencv::core::{DataType, Mat, Size, ToInputArray, Vec2f};
use opencv::imgproc::{resize, INTER_LINEAR};
use opencv::prelude::*;

use super::FlowField;
use streamrecon_core::error::Result;
use streamrecon_core::simd::{vectorized, Kernel};

/// Per destination column: the first source element and the two weights (OpenCV's rule: the
/// source position of column x is (x + ½)·sw/w − ½ in double, rounded to float; positions
/// outside the image clamp to its edge with weights (1, 0)).
struct Columns {
    /// Element offset of the left source pixel (channel 0).
    offset: Vec<usize>,
    alpha: Vec<[f32; 2]>,
    /// Columns from here on copy their source pixel instead of blending (OpenCV's `xmax`).
    xmax: usize,
}

fn columns(sw: usize, w: usize, cn: usize) -> Columns {
    let scale = sw as f64 / w as f64;
    let mut offset = Vec::with_capacity(w);
    let mut alpha = Vec::with_capacity(w);
    let mut xmax = w;
    for dx in 0..w {
        let f = ((dx as f64 + 0.5) * scale - 0.5) as f32;
        let mut sx = f.floor();
        let mut fx = f - sx;
        if sx < 0.0 {
            (sx, fx) = (0.0, 0.0);
        }
        if sx + 1.0 >= sw as f32 {
            xmax = xmax.min(dx);
            if sx >= (sw - 1) as f32 {
                (sx, fx) = ((sw - 1) as f32, 0.0);
            }
        }
        offset.push(sx as usize * cn);
        alpha.push([1.0 - fx, fx]);
    }
    Columns {
        offset,
        alpha,
        xmax,
    }
}

/// A source row resized horizontally into `out` (`w` · `cn` elements, overwritten).
fn horizontal(src_row: &[f32], c: &Columns, cn: usize, out: &mut [f32]) {
    match cn {
        1 => horizontal_cn::<1>(src_row, c, out),
        2 => horizontal_cn::<2>(src_row, c, out),
        _ => {
            for (dx, d) in out.chunks_exact_mut(cn).enumerate() {
                let (o, [a0, a1]) = (c.offset[dx], c.alpha[dx]);
                for (k, v) in d.iter_mut().enumerate() {
                    *v = if dx < c.xmax {
                        src_row[o + k] * a0 + src_row[o + k + cn] * a1
                    } else {
                        src_row[o + k]
                    };
                }
            }
        }
    }
}

fn horizontal_cn<const CN: usize>(src_row: &[f32], c: &Columns, out: &mut [f32]) {
    let (out_blend, out_copy) = out.split_at_mut(c.xmax * CN);
    let cols = c.offset.iter().zip(&c.alpha);
    for (d, (&o, &[a0, a1])) in out_blend.chunks_exact_mut(CN).zip(cols.clone()) {
        let s: &[f32] = &src_row[o..o + 2 * CN];
        for k in 0..CN {
            d[k] = s[k] * a0 + s[k + CN] * a1;
        }
    }
    for (d, (&o, _)) in out_copy.chunks_exact_mut(CN).zip(cols.skip(c.xmax)) {
        d.copy_from_slice(&src_row[o..o + CN]);
    }
}

/// One destination row: `b0`·`s0` + `b1`·`s1`.
struct Vertical<'a> {
    s0: &'a [f32],
    s1: &'a [f32],
    b0: f32,
    b1: f32,
    out: &'a mut [f32],
}

impl Kernel for Vertical<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let Self {
            s0,
            s1,
            b0,
            b1,
            out,
        } = self;
        for ((o, &a), &b) in out.iter_mut().zip(s0).zip(s1) {
            *o = a * b0 + b * b1;
        }
    }
}

/// `src`, `sw` × `sh` pixels of `cn` interleaved floats, enlarged to `w` × `h` as OpenCV's
/// `resize(.., INTER_LINEAR)` does (for shrinking, OpenCV has other paths: there the result is
/// the same formula, not OpenCV's bits). Empty sizes give an empty image.
#[must_use]
pub fn upsample_linear(
    src: &[f32],
    (sw, sh): (usize, usize),
    cn: usize,
    (w, h): (usize, usize),
) -> Vec<f32> {
    if sw == 0 || sh == 0 || w == 0 || h == 0 || cn == 0 || src.len() < sw * sh * cn {
        return Vec::new();
    }
    let cols = columns(sw, w, cn);
    let scale = sh as f64 / h as f64;
    let row_len = sw * cn;
    let src_row = |r: usize| &src[r * row_len..(r + 1) * row_len];
    // The two horizontally resized source rows in use (index, row).
    let mut rows: [(usize, Vec<f32>); 2] = [
        (usize::MAX, vec![0.0; w * cn]),
        (usize::MAX, vec![0.0; w * cn]),
    ];
    // Each row is made in a small buffer and appended: the output is written once, not zeroed
    // first.
    let mut out = Vec::with_capacity(w * h * cn);
    let mut out_row = vec![0.0; w * cn];
    for dy in 0..h {
        let f = ((dy as f64 + 0.5) * scale - 0.5) as f32;
        let sy = f.floor();
        let fy = f - sy;
        // Rows clamp to the image; the weights do not (OpenCV's).
        let clamp = |r: f32| (r.max(0.0) as usize).min(sh - 1);
        let (r0, r1) = (clamp(sy), clamp(sy + 1.0));
        if rows[0].0 != r0 && rows[1].0 == r0 {
            rows.swap(0, 1);
        }
        for (slot, r) in [(0, r0), (1, r1)] {
            if rows[slot].0 != r {
                let (idx, buf) = &mut rows[slot];
                horizontal(src_row(r), &cols, cn, buf);
                *idx = r;
            }
        }
        vectorized(Vertical {
            s0: &rows[0].1,
            s1: &rows[1].1,
            b0: 1.0 - fy,
            b1: fy,
            out: &mut out_row,
        });
        out.extend_from_slice(&out_row);
    }
    out
}

/// OpenCV's bilinear resize of `src` into `dst`, the bytes of a `w` × `h` matrix of `T`.
fn resize_into<T: DataType>(
    src: &impl ToInputArray,
    dst: &mut [u8],
    w: usize,
    h: usize,
) -> Result<()> {
    let mut m = Mat::new_rows_cols_with_bytes_mut::<T>(h as i32, w as i32, dst)?;
    let before = m.data();
    resize(
        src,
        &mut m,
        Size::new(w as i32, h as i32),
        0.0,
        0.0,
        INTER_LINEAR,
    )?;
    if m.data() == before {
        return Ok(());
    }
    // OpenCV reallocated instead (not expected): copy its result.
    let out = m.try_clone()?;
    drop(m);
    dst.copy_from_slice(out.data_bytes()?);
    Ok(())
}

/// `f` resized to `w` × `h` (OpenCV's bilinear resize) and scaled by `k`: DIS's own last step
/// when upsampling, and a prior for DIS from a full-resolution flow when downsampling (what DIS
/// does itself with an initial flow of the images' size). The smaller of the two fields is
/// scaled (the resize is linear; with `k` a power of two, as every caller's, both orders give
/// the same bits). Enlargements are OpenCV's resize bit for bit, computed here.
pub(crate) fn resized_flow(f: &FlowField, (w, h): (usize, usize), k: f32) -> Result<FlowField> {
    if w >= f.width && h >= f.height {
        // Enlarging: ours, one pass into a fresh buffer, from the scaled source.
        let scaled: Vec<f32> = f.data.iter().map(|v| v * k).collect();
        let data = upsample_linear(&scaled, (f.width, f.height), 2, (w, h));
        return Ok(FlowField {
            width: w,
            height: h,
            data,
        });
    }
    let mut out = FlowField::zeros(w, h);
    let src = Mat::new_rows_cols_with_bytes::<Vec2f>(
        f.height as i32,
        f.width as i32,
        bytemuck::cast_slice(&f.data),
    )?;
    resize_into::<Vec2f>(&src, bytemuck::cast_slice_mut(&mut out.data), w, h)?;
    for v in &mut out.data {
        *v *= k;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use opencv::core::{Mat, Size, CV_32FC1, CV_32FC2};
    use opencv::imgproc::{resize, INTER_LINEAR};
    use opencv::prelude::*;

    fn opencv_resize(
        src: &[f32],
        (sw, sh): (usize, usize),
        cn: usize,
        (w, h): (usize, usize),
    ) -> Vec<f32> {
        let typ = if cn == 1 { CV_32FC1 } else { CV_32FC2 };
        let m = Mat::new_rows_cols_with_data::<f32>(sh as i32, (sw * cn) as i32, src).expect("mat");
        let m = m.reshape(cn as i32, sh as i32).expect("reshape");
        assert_eq!(m.typ(), typ);
        let mut out = Mat::default();
        resize(
            &m,
            &mut out,
            Size::new(w as i32, h as i32),
            0.0,
            0.0,
            INTER_LINEAR,
        )
        .expect("resize");
        let out = out.reshape(1, 1).expect("flat");
        out.data_typed::<f32>().expect("data").to_vec()
    }

    #[test]
    fn enlarging_is_opencv_resize_bit_for_bit() {
        // Powers of two (the engine's), sizes that are not multiples of the factor, and single
        // rows and columns.
        for &((sw, sh), (w, h)) in &[
            ((160, 120), (640, 480)),
            ((82, 62), (330, 250)),
            ((41, 31), (330, 250)),
            ((20, 15), (160, 120)),
            ((1, 7), (4, 28)),
            ((9, 1), (36, 3)),
        ] {
            for cn in [1, 2] {
                let src: Vec<f32> = (0..sw * sh * cn)
                    .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.0137)
                    .collect();
                let got = super::upsample_linear(&src, (sw, sh), cn, (w, h));
                let want = opencv_resize(&src, (sw, sh), cn, (w, h));
                assert_eq!(got.len(), want.len());
                let diff = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    diff, 0,
                    "{sw}x{sh} -> {w}x{h}, {cn} channels: {diff} values differ"
                );
            }
        }
    }
}
