//! The Middlebury (Baker et al. 2011) colour wheel for flow visualisation.

use super::FlowField;
use streamrecon_core::frame::RgbImage;
use streamrecon_core::simd::{small_int, vectorized, Kernel};

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

/// `y.atan2(x)` to within 1e-5 rad (a 1/5000 of a wheel segment), exact on the axes and with
/// atan2's signs of zero (`atan2(−0, −1) = −π`: rightward flow must stay red); no libm call,
/// which was a visible share of the pipeline's CPU (one call per pixel per frame).
#[inline]
fn atan2_approx(y: f32, x: f32) -> f32 {
    use std::f32::consts::{FRAC_PI_2, PI};
    let (ax, ay) = (x.abs(), y.abs());
    let (lo, hi) = (ax.min(ay), ax.max(ay));
    if hi == 0.0 {
        return y.atan2(x); // the signed zeros' cases
    }
    let t = lo / hi;
    let s = t * t;
    // Minimax polynomial for atan on [0, 1] (max error ≈ 1e-5 rad).
    let mut r = t
        * (0.999_977_26
            + s * (-0.332_623_47
                + s * (0.193_543_46 + s * (-0.116_432_87 + s * (0.052_653_32 - 0.011_721_2 * s)))));
    if ay > ax {
        r = FRAC_PI_2 - r;
    }
    if x.is_sign_negative() {
        r = PI - r;
    }
    if y.is_sign_negative() {
        -r
    } else {
        r
    }
}

/// Hue table entries over the wheel: adjacent entries differ by < 1 grey level.
const HUE_STEPS: usize = 4096;

/// The wheel's fully saturated colour at `HUE_STEPS` + 1 evenly spaced hues from wheel index 0 to
/// n − 1 (linear between wheel entries), in 8 bits.
fn hue_table(wheel: &[[f32; 3]]) -> Vec<[u8; 3]> {
    let last = (wheel.len() - 1) as f32;
    (0..=HUE_STEPS)
        .map(|j| {
            let fk = j as f32 * last / HUE_STEPS as f32;
            let k0 = (fk as usize).min(wheel.len() - 1);
            let k1 = (k0 + 1) % wheel.len();
            let f = fk - k0 as f32;
            let mut c = [0u8; 3];
            for (ch, out) in c.iter_mut().enumerate() {
                *out = ((1.0 - f) * wheel[k0][ch] + f * wheel[k1][ch] + 0.5).min(255.0) as u8;
            }
            c
        })
        .collect()
}

/// Grid steps per unit of normalised flow in the colour lookup table.
const LUT_STEPS: usize = 255;
/// Lookup-table side: normalised u and v from −1 to 1.
const LUT_SIDE: usize = 2 * LUT_STEPS + 1;

/// The colour of one normalised flow vector (full saturation at magnitude 1).
///
/// The hue from a 4096-entry table (nearest) and the saturation blend in 8.8 fixed point,
/// within 1–2 grey levels of the float formula.
#[inline]
fn colour_of(u: f32, v: f32, hues: &[[u8; 3]]) -> [u8; 3] {
    let hue_scale = HUE_STEPS as f32 / 2.0; // a ∈ [−1, 1] → [0, HUE_STEPS]
    let rad = (u * u + v * v).sqrt();
    let a = atan2_approx(-v, -u) / std::f32::consts::PI;
    let j = (((a + 1.0) * hue_scale + 0.5) as i32).clamp(0, HUE_STEPS as i32);
    let hue = hues[j as usize];
    let mut rgb = [0u8; 3];
    if rad <= 1.0 {
        // 255 − rad·(255 − hue): white at rest, the hue at full magnitude.
        let r = (rad * 256.0 + 0.5) as u32; // ≤ 256
        for (o, h) in rgb.iter_mut().zip(hue) {
            *o = (255 - ((r * (255 - u32::from(h)) + 128) >> 8)) as u8;
        }
    } else {
        // Beyond the normalising magnitude: the hue, darkened.
        for (o, h) in rgb.iter_mut().zip(hue) {
            *o = ((u32::from(h) * 3 + 2) >> 2) as u8;
        }
    }
    rgb
}

/// The hue table of the standard wheel, built once per process.
fn hues() -> &'static [[u8; 3]] {
    static HUES: std::sync::OnceLock<Vec<[u8; 3]>> = std::sync::OnceLock::new();
    HUES.get_or_init(|| hue_table(&wheel()))
}

/// [`colour_of`] on a `LUT_SIDE`² grid over normalised u, v ∈ [−1, 1], built once per process:
/// one table read per pixel instead of a square root, an arctangent and a blend (a 640×480
/// image took 9.9 ms on one core with the formula, 4.5 ms with the table).
fn colour_table() -> &'static [[u8; 3]] {
    static TABLE: std::sync::OnceLock<Vec<[u8; 3]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let at = |k: usize| (k as f32 - LUT_STEPS as f32) / LUT_STEPS as f32;
        (0..LUT_SIDE * LUT_SIDE)
            .map(|i| colour_of(at(i % LUT_SIDE), at(i / LUT_SIDE), hues()))
            .collect()
    })
}

/// Byte order of a colour-coded flow image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    Rgb,
    /// OpenCV's order (its encoders take BGR).
    Bgr,
}

/// Colour-codes a flow field; `max_flow` sets the magnitude of full saturation (None = the field's
/// largest finite magnitude). See [`flow_to_bytes`].
pub fn flow_to_rgb(flow: &FlowField, max_flow: Option<f32>) -> RgbImage {
    let mut img = RgbImage::new(flow.width as u32, flow.height as u32);
    colour_rows(flow, max_flow, ChannelOrder::Rgb, &mut img);
    img
}

/// Colour-codes a flow field into `out` (3 bytes a pixel in `order`, row-major; resized to fit).
/// Rows are coloured in parallel.
///
/// Per pixel: the nearest entry of a table of [`colour_of`] on a grid of 1/255 of the
/// normalising magnitude (within 1–2 grey levels of the exact formula); flows at or beyond
/// 0.995 of the magnitude take the formula.
pub fn flow_to_bytes(
    flow: &FlowField,
    max_flow: Option<f32>,
    order: ChannelOrder,
    out: &mut Vec<u8>,
) {
    // Every byte is overwritten.
    out.resize(3 * flow.width * flow.height, 0);
    colour_rows(flow, max_flow, order, out);
}

fn colour_rows(flow: &FlowField, max_flow: Option<f32>, order: ChannelOrder, buf: &mut [u8]) {
    use rayon::prelude::*;
    let max = max_flow.unwrap_or_else(|| {
        flow.data
            .par_chunks(2 * flow.width.max(1))
            .map(|row| vectorized(LargestSquare { row }))
            .reduce(|| 0.0, f32::max)
            .sqrt()
    });
    let inv_max = if max > 1e-6 { 1.0 / max } else { 1.0 };
    let w = flow.width.max(1);
    let (table, hues) = (colour_table(), hues());
    buf.par_chunks_mut(3 * w)
        .zip(flow.data.par_chunks(2 * w))
        .for_each_init(
            || vec![0u32; w],
            |cells, (out, row)| {
                vectorized(WheelRow {
                    row,
                    out,
                    cells,
                    inv_max,
                    table,
                    hues,
                    order,
                });
            },
        );
}

/// The largest finite squared magnitude of a row of flow (0 if none).
struct LargestSquare<'a> {
    row: &'a [f32],
}

impl Kernel for LargestSquare<'_> {
    type Output = f32;

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) -> f32 {
        // Eight running maxima, one per lane: a single one would be a serial chain.
        let mut lanes = [0.0f32; 8];
        let mut chunks = self.row.chunks_exact(16);
        for c in &mut chunks {
            for (k, m) in lanes.iter_mut().enumerate() {
                let s = c[2 * k] * c[2 * k] + c[2 * k + 1] * c[2 * k + 1];
                // Non-finite squares lose every comparison (NaN compares false).
                if s > *m && s < f32::INFINITY {
                    *m = s;
                }
            }
        }
        let rest = chunks.remainder().chunks_exact(2);
        let tail = rest
            .map(|c| c[0] * c[0] + c[1] * c[1])
            .filter(|s| s.is_finite())
            .fold(0.0f32, f32::max);
        lanes.into_iter().fold(tail, f32::max)
    }
}

/// One row of [`colour_rows`]: table cells (vectorised), then the table reads.
struct WheelRow<'a> {
    row: &'a [f32],
    out: &'a mut [u8],
    /// Each pixel's table entry, or `FAR` for the formula.
    cells: &'a mut [u32],
    inv_max: f32,
    table: &'a [[u8; 3]],
    hues: &'a [[u8; 3]],
    order: ChannelOrder,
}

/// A pixel whose colour the table does not hold (see [`colour_rows`]).
const FAR: u32 = u32::MAX;

impl Kernel for WheelRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let WheelRow {
            row,
            out,
            cells,
            inv_max,
            table,
            hues,
            order,
        } = self;
        let w = (row.len() / 2).min(out.len() / 3).min(cells.len());
        let (row, out, cells) = (&row[..2 * w], &mut out[..3 * w], &mut cells[..w]);
        let steps = LUT_STEPS as f32;
        for (c, uv) in cells.iter_mut().zip(row.chunks_exact(2)) {
            let (u, v) = (uv[0] * inv_max, uv[1] * inv_max);
            // Inside radius 0.995 the nearest entry (≤ 0.003 away) is inside radius 1 too,
            // so no pixel flips between the blend and the darkened hue. NaN is not near.
            let near = u * u + v * v < 0.99;
            // Both in [0, 2·LUT_STEPS] when near, rounded to the nearest entry.
            let iu = small_int((u + 1.0) * steps);
            let iv = small_int((v + 1.0) * steps);
            let cell = iv.wrapping_mul(LUT_SIDE as u32).wrapping_add(iu);
            *c = if near { cell } else { FAR };
        }
        for ((px, &c), uv) in out
            .chunks_exact_mut(3)
            .zip(cells.iter())
            .zip(row.chunks_exact(2))
        {
            let rgb = if c == FAR {
                let (u, v) = (uv[0] * inv_max, uv[1] * inv_max);
                if u.is_finite() && v.is_finite() {
                    colour_of(u, v, hues)
                } else {
                    [0, 0, 0]
                }
            } else {
                table[c as usize]
            };
            match order {
                ChannelOrder::Rgb => px.copy_from_slice(&rgb),
                ChannelOrder::Bgr => px.copy_from_slice(&[rgb[2], rgb[1], rgb[0]]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::atan2_approx;

    #[test]
    fn atan2_approximation_matches_libm_everywhere_and_exactly_on_the_axes() {
        let mut worst = 0.0f32;
        for i in -50..=50 {
            for j in -50..=50 {
                let (y, x) = (i as f32 * 0.37, j as f32 * 0.53);
                worst = worst.max((atan2_approx(y, x) - y.atan2(x)).abs());
            }
        }
        assert!(worst < 2e-5, "worst error {worst} rad");
        for (y, x) in [
            (0.0, 1.0),
            (-0.0, -1.0),
            (0.0, -1.0),
            (2.0, 0.0),
            (-2.0, -0.0),
        ] {
            let (ours, libm) = (atan2_approx(y, x), y.atan2(x));
            assert_eq!(
                ours.to_bits(),
                libm.to_bits(),
                "atan2({y}, {x}): {ours} vs {libm}"
            );
        }
    }

    #[test]
    fn colour_table_is_within_two_grey_levels_of_the_formula() {
        use super::{colour_of, flow_to_rgb, hues};
        let mut f = crate::FlowField::zeros(101, 101);
        for y in 0..101 {
            for x in 0..101 {
                // Off the table's grid, every direction, magnitudes 0 to beyond 1.
                let (u, v) = ((x as f32 - 50.3) / 41.0, (y as f32 - 49.7) / 41.0);
                f.set(x, y, u, v);
            }
        }
        f.set(0, 0, f32::NAN, 0.0);
        let img = flow_to_rgb(&f, Some(1.0));
        let mut worst = 0i32;
        for y in 1..101 {
            for x in 0..101 {
                let (u, v) = f.get(x, y);
                let exact = colour_of(u, v, hues());
                let got = img.get_pixel(x as u32, y as u32).0;
                for c in 0..3 {
                    worst = worst.max((i32::from(got[c]) - i32::from(exact[c])).abs());
                }
            }
        }
        assert!(worst <= 2, "worst difference {worst} grey levels");
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0], "non-finite flow is black");
    }
    #[test]
    fn normalising_magnitude_skips_non_finite_flow_and_bgr_is_rgb_swapped() {
        use super::{flow_to_bytes, flow_to_rgb, ChannelOrder};
        // 37 wide: rows have whole chunks of 8 pixels and a remainder.
        let mut f = crate::FlowField::zeros(37, 3);
        for y in 0..3 {
            for x in 0..37 {
                f.set(x, y, 0.1 * x as f32, -0.05 * y as f32);
            }
        }
        f.set(3, 0, f32::INFINITY, 0.0);
        f.set(36, 1, f32::NAN, 1.0);
        // The largest finite magnitude, in a row's remainder.
        f.set(35, 2, 6.0, 8.0);
        let auto = flow_to_rgb(&f, None);
        assert_eq!(auto, flow_to_rgb(&f, Some(10.0)));
        // ...and in a chunk.
        f.set(35, 2, 0.0, 0.0);
        f.set(9, 1, -8.0, 6.0);
        assert_eq!(flow_to_rgb(&f, None), flow_to_rgb(&f, Some(10.0)));
        let mut bgr = Vec::new();
        flow_to_bytes(&f, None, ChannelOrder::Bgr, &mut bgr);
        let rgb = flow_to_rgb(&f, None);
        for (b, r) in bgr.chunks_exact(3).zip(rgb.as_raw().chunks_exact(3)) {
            assert_eq!([b[2], b[1], b[0]], [r[0], r[1], r[2]]);
        }
    }
}
