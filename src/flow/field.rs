//! Dense 2D flow fields.

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
