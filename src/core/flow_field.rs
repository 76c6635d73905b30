//! Dense 2D flow fields.

use crate::simd::small_int;

/// Dense flow, row-major, interleaved (u, v) in pixels; `u` along x.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowField {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl FlowField {
    pub fn zeros(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0.0; width * height * 2],
        }
    }

    #[inline]
    pub fn get(&self, x: usize, y: usize) -> (f32, f32) {
        let i = (y * self.width + x) * 2;
        (self.data[i], self.data[i + 1])
    }

    #[inline]
    pub fn set(&mut self, x: usize, y: usize, u: f32, v: f32) {
        let i = (y * self.width + x) * 2;
        self.data[i] = u;
        self.data[i + 1] = v;
    }

    /// Bilinear sample at a sub-pixel position; `None` outside the field.
    #[inline]
    pub fn sample(&self, x: f32, y: f32) -> Option<(f32, f32)> {
        bilinear2(&self.data, self.width, self.height, x, y)
    }
}

/// Bilinear sample of an interleaved two-channel grid; `None` outside.
#[inline]
pub fn bilinear2(data: &[f32], width: usize, height: usize, x: f32, y: f32) -> Option<(f32, f32)> {
    if !(x >= 0.0 && y >= 0.0 && x <= (width - 1) as f32 && y <= (height - 1) as f32) {
        return None;
    }
    let x0 = (x as usize).min(width.saturating_sub(2)); // x ≥ 0: truncation is floor
    let y0 = (y as usize).min(height.saturating_sub(2));
    let x1 = (x0 + 1).min(width - 1);
    let y1 = (y0 + 1).min(height - 1);
    let fx = x - x0 as f32;
    let fy = y - y0 as f32;
    let at = |xx: usize, yy: usize| {
        let i = (yy * width + xx) * 2;
        (data[i], data[i + 1])
    };
    let (a, b, c, d) = (at(x0, y0), at(x1, y0), at(x0, y1), at(x1, y1));
    let w00 = (1.0 - fx) * (1.0 - fy);
    let w10 = fx * (1.0 - fy);
    let w01 = (1.0 - fx) * fy;
    let w11 = fx * fy;
    Some((
        a.0 * w00 + b.0 * w10 + c.0 * w01 + d.0 * w11,
        a.1 * w00 + b.1 * w10 + c.1 * w01 + d.1 * w11,
    ))
}

/// Bilinear sample of a single-channel grid; `None` outside.
#[inline]
pub fn bilinear1(data: &[f32], width: usize, height: usize, x: f32, y: f32) -> Option<f32> {
    if !(x >= 0.0 && y >= 0.0 && x <= (width - 1) as f32 && y <= (height - 1) as f32) {
        return None;
    }
    let x0 = (x as usize).min(width.saturating_sub(2)); // x ≥ 0: truncation is floor
    let y0 = (y as usize).min(height.saturating_sub(2));
    let x1 = (x0 + 1).min(width - 1);
    let y1 = (y0 + 1).min(height - 1);
    let fx = x - x0 as f32;
    let fy = y - y0 as f32;
    let at = |xx: usize, yy: usize| data[yy * width + xx];
    Some(
        at(x0, y0) * (1.0 - fx) * (1.0 - fy)
            + at(x1, y0) * fx * (1.0 - fy)
            + at(x0, y1) * (1.0 - fx) * fy
            + at(x1, y1) * fx * fy,
    )
}

/// Where the pixels of one image row land under a flow, for bilinear reads of another field:
/// each target's cell (the index of its top-left value), the fractions for the weights, and an
/// all-ones mask where the target is inside the image (0 outside, where the cell is 0 and the
/// value read must be masked out). Buffers are kept between rows.
pub struct TargetCells {
    pub cell: Vec<u32>,
    pub fx: Vec<f32>,
    pub fy: Vec<f32>,
    pub inside: Vec<u32>,
}

impl TargetCells {
    pub fn new(w: usize) -> Self {
        Self {
            cell: vec![0; w],
            fx: vec![0.0; w],
            fy: vec![0.0; w],
            inside: vec![0; w],
        }
    }

    /// Fills the cells of row `y` of a `w` × `h` image (≥ 2 × 2) moved by `flow_row` (that
    /// row of an interleaved flow), for a field of `channels` values per pixel. Branch-free, so it vectorises inside a dispatched
    /// kernel: the float → int conversions go through [`small_int`] (a saturating `as` keeps
    /// the loop scalar), the column counter through i32 (AVX2 has no u32 → f32).
    #[allow(clippy::inline_always)] // inlined into dispatched kernels (`crate::simd`)
    #[inline(always)]
    pub fn fill(&mut self, flow_row: &[f32], y: usize, (w, h): (usize, usize), channels: u32) {
        let (xmax, ymax) = ((w - 1) as f32, (h - 1) as f32);
        let (last_x, last_y) = ((w - 2) as f32, (h - 2) as f32);
        let yf = y as f32;
        // Images are far smaller than 2²² pixels a side.
        let stride = w as u32 * channels;
        let fl = &flow_row[..2 * w];
        let (cell, fx, fy, inside) = (
            &mut self.cell[..w],
            &mut self.fx[..w],
            &mut self.fy[..w],
            &mut self.inside[..w],
        );
        for x in 0..w {
            let (tx, ty) = (x as i32 as f32 + fl[2 * x], yf + fl[2 * x + 1]);
            let ok = tx >= 0.0 && ty >= 0.0 && tx <= xmax && ty <= ymax;
            inside[x] = if ok { u32::MAX } else { 0 };
            // Outside (or NaN) reads cell 0 and is masked out by the caller.
            let (tx, ty) = if ok { (tx, ty) } else { (0.0, 0.0) };
            // The last column/row samples its left/top cell.
            let x0 = tx.floor().min(last_x);
            let y0 = ty.floor().min(last_y);
            (fx[x], fy[x]) = (tx - x0, ty - y0);
            cell[x] = small_int(y0) * stride + channels * small_int(x0);
        }
    }
}
