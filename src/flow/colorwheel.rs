//! The Middlebury (Baker et al. 2011) colour wheel for flow visualisation.

use super::FlowField;
use crate::frame::RgbImage;

/// Hue segments of the wheel: red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta, magenta-red.
const SEGMENTS: [usize; 6] = [15, 6, 4, 11, 13, 6];

fn wheel() -> Vec<[f32; 3]> {
    let mut w = Vec::with_capacity(55);
    let [ry, yg, gc, cb, bm, mr] = SEGMENTS;
    for i in 0..ry {
        w.push([255.0, 255.0 * i as f32 / ry as f32, 0.0]);
    }
    for i in 0..yg {
        w.push([255.0 - 255.0 * i as f32 / yg as f32, 255.0, 0.0]);
    }
    for i in 0..gc {
        w.push([0.0, 255.0, 255.0 * i as f32 / gc as f32]);
    }
    for i in 0..cb {
        w.push([0.0, 255.0 - 255.0 * i as f32 / cb as f32, 255.0]);
    }
    for i in 0..bm {
        w.push([255.0 * i as f32 / bm as f32, 0.0, 255.0]);
    }
    for i in 0..mr {
        w.push([255.0, 0.0, 255.0 - 255.0 * i as f32 / mr as f32]);
    }
    w
}

/// Colour-codes a flow field; `max_flow` sets the magnitude of full saturation (None = the field's
/// largest finite magnitude). Rows are coloured in parallel.
pub fn flow_to_rgb(flow: &FlowField, max_flow: Option<f32>) -> RgbImage {
    use rayon::prelude::*;
    let wheel = wheel();
    let n = wheel.len();
    let max = max_flow.unwrap_or_else(|| {
        flow.data
            .par_chunks(2 * flow.width.max(1))
            .map(|row| {
                row.chunks_exact(2)
                    .map(|c| c[0] * c[0] + c[1] * c[1])
                    .filter(|m| m.is_finite())
                    .fold(0.0f32, f32::max)
            })
            .reduce(|| 0.0, f32::max)
            .sqrt()
    });
    let inv_max = if max > 1e-6 { 1.0 / max } else { 1.0 };
    let mut img = RgbImage::new(flow.width as u32, flow.height as u32);
    let w = flow.width;
    let buf: &mut [u8] = &mut img;
    buf.par_chunks_mut(3 * w.max(1))
        .zip(flow.data.par_chunks(2 * w.max(1)))
        .for_each(|(out, row)| {
            for (px, uv) in out.chunks_exact_mut(3).zip(row.chunks_exact(2)) {
                let (u, v) = (uv[0], uv[1]);
                if !(u.is_finite() && v.is_finite()) {
                    px.copy_from_slice(&[0, 0, 0]);
                    continue;
                }
                let (u, v) = (u * inv_max, v * inv_max);
                let rad = (u * u + v * v).sqrt();
                let a = (-v).atan2(-u) / std::f32::consts::PI;
                let fk = f32::midpoint(a, 1.0) * (n - 1) as f32;
                let k0 = (fk as usize) % n; // fk ≥ 0: truncation is floor
                let k1 = (k0 + 1) % n;
                let f = fk - fk.trunc();
                for c in 0..3 {
                    let col = ((1.0 - f) * wheel[k0][c] + f * wheel[k1][c]) * (1.0 / 255.0);
                    let col = if rad <= 1.0 {
                        1.0 - rad * (1.0 - col)
                    } else {
                        col * 0.75
                    };
                    px[c] = (255.0 * col + 0.5).min(255.0) as u8;
                }
            }
        });
    img
}
