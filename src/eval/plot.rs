//! Minimal PNG plots for evaluation reports: polylines on a white canvas, equal axis scaling.
//! Hand-written: two line series need no plotting library (and plotters' text needs system fonts).

use image::{Rgb, RgbImage};

/// A series: points in data units and a colour.
pub struct Series<'a> {
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
}

const MARGIN: f64 = 20.0;

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: [u8; 3]) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgb(c));
            }
        }
    }
}

/// Draws the series scaled to fit; `equal_axes` keeps metres square (top views).
pub fn plot(series: &[Series<'_>], width: u32, height: u32, equal_axes: bool) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if all.is_empty() {
        return img;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for p in &all {
        x0 = x0.min(p.0);
        x1 = x1.max(p.0);
        y0 = y0.min(p.1);
        y1 = y1.max(p.1);
    }
    let (w, h) = (
        f64::from(width) - 2.0 * MARGIN,
        f64::from(height) - 2.0 * MARGIN,
    );
    let (mut sx, mut sy) = (w / (x1 - x0).max(1e-12), h / (y1 - y0).max(1e-12));
    if equal_axes {
        let s = sx.min(sy);
        sx = s;
        sy = s;
    }
    let to_px = |p: (f64, f64)| {
        (
            MARGIN + (p.0 - x0) * sx,
            f64::from(height) - MARGIN - (p.1 - y0) * sy,
        )
    };
    // Axes frame.
    let frame = [0x99, 0x99, 0x99];
    let (l, r, t, b) = (
        MARGIN,
        f64::from(width) - MARGIN,
        MARGIN,
        f64::from(height) - MARGIN,
    );
    line(&mut img, (l, b), (r, b), frame);
    line(&mut img, (l, t), (l, b), frame);
    for s in series {
        for w2 in s.points.windows(2) {
            line(&mut img, to_px(w2[0]), to_px(w2[1]), s.color);
        }
    }
    img
}
