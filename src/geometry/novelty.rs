//! Novelty weight w_t ∈ [0, 1] of a frame (PAS3R-inspired pose-adaptive updates): how much new
//! geometry it brings (motion since the last admitted frame) times how usable it is (sharpness).
//!
//! ```text
//! motion    m = max(1 − exp(−(t/t_med · ½ + θ/θ_ref)),   pose change since the last admitted frame
//!                   1 − exp(−parallax / (f_ref · W)),     median flow magnitude on confident pixels
//!                   1 − exp(−max(0, Δ − Δ₀) / Δ_ref))     mean |I − I_admitted| on a 64-px thumbnail,
//!                                                         less a sensor-noise floor Δ₀
//! sharpness s = min(1, hf / hf_ref)                       FFT high-frequency energy ratio, hf_ref =
//!                                                         running mean over admitted frames
//! w = m · s
//! ```
//! Terms whose input is missing (no pose yet, no flow) are left out of the max. Identical frames
//! score ~0, a large rotation ~1, a blurred frame lower than a sharp one.

use std::collections::VecDeque;

use image::RgbImage;
use opencv::core::{self as cvcore, Mat, Scalar, CV_32F};
use opencv::prelude::*;
use serde::{Deserialize, Serialize};

use streamrecon_core::error::Result;
use streamrecon_core::frame::{pose_from_array, pose_to_array, Pose};

/// A [`NoveltyMeter`]'s stream state (poses as [`pose_to_array`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoveltyState {
    steps: Vec<f64>,
    last_pose: Option<[f64; 7]>,
    admitted_pose: Option<[f64; 7]>,
    admitted_thumb: Option<Vec<f32>>,
    hf_ref: Option<f64>,
}

/// Parameters of the novelty weight (see the module docs for the formula).
#[derive(Debug, Clone, Serialize)]
pub struct NoveltyConfig {
    /// Rotation (degrees) counted as one unit of motion.
    pub rot_ref_deg: f64,
    /// Flow parallax, as a fraction of the image width, counted as one unit of motion.
    pub flow_ref_fraction: f64,
    /// Mean absolute thumbnail difference (0..1) counted as one unit of motion…
    pub appearance_ref: f64,
    /// …above this floor (sensor noise is not novelty).
    pub appearance_floor: f64,
    /// Frames in the running median of translation steps.
    pub step_window: usize,
    /// Fraction of the spectrum radius above which energy counts as high frequency.
    pub hf_cutoff: f64,
}

impl Default for NoveltyConfig {
    fn default() -> Self {
        Self {
            rot_ref_deg: 5.0,
            flow_ref_fraction: 0.01,
            appearance_ref: 0.03,
            appearance_floor: 0.01,
            step_window: 15,
            hf_cutoff: 0.25,
        }
    }
}

/// What one frame's weight was made of.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Novelty {
    pub weight: f64,
    pub motion: f64,
    pub sharpness: f64,
    pub hf_ratio: f64,
}

/// Side of the square thumbnail used for appearance change and spectra.
const THUMB: u32 = 64;

/// Running state of the novelty weight over a stream.
#[derive(Default)]
pub struct NoveltyMeter {
    config: NoveltyConfig,
    steps: VecDeque<f64>,
    last_pose: Option<Pose>,
    admitted_pose: Option<Pose>,
    admitted_thumb: Option<Vec<f32>>,
    hf_ref: Option<f64>,
}

impl NoveltyMeter {
    pub fn new(config: NoveltyConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// The weight of `image`; `pose` (world_from_cam, if known) and `parallax_px` (median flow
    /// magnitude to the previous frame, if known) add motion terms.
    ///
    /// # Errors
    /// OpenCV failure on the spectrum.
    pub fn weigh(
        &self,
        image: &RgbImage,
        pose: Option<&Pose>,
        parallax_px: Option<f64>,
    ) -> Result<(Novelty, Vec<f32>)> {
        let c = &self.config;
        let thumb = thumbnail(image);
        let hf = hf_energy_ratio(image)?;
        let mut terms = Vec::new();
        if let (Some(p), Some(a)) = (pose, self.admitted_pose.as_ref()) {
            let rel = a.inverse() * p;
            let t = rel.translation.vector.norm();
            let theta = rel.rotation.angle().to_degrees();
            let med = median(&self.steps).unwrap_or(t).max(1e-9);
            terms.push(1.0 - (-(t / med * 0.5 + theta / c.rot_ref_deg)).exp());
        }
        if let Some(px) = parallax_px {
            let reference = c.flow_ref_fraction * f64::from(image.width());
            terms.push(1.0 - (-px / reference.max(1e-9)).exp());
        }
        if let Some(prev) = &self.admitted_thumb {
            let d = thumb
                .iter()
                .zip(prev)
                .map(|(a, b)| f64::from((a - b).abs()))
                .sum::<f64>()
                / thumb.len() as f64;
            terms.push(1.0 - (-(d - c.appearance_floor).max(0.0) / c.appearance_ref).exp());
        }
        // The first frame of a stream is all new.
        let motion = if terms.is_empty() {
            1.0
        } else {
            terms.iter().copied().fold(0.0, f64::max)
        };
        let sharpness = match self.hf_ref {
            Some(r) if r > 0.0 => (hf / r).min(1.0),
            _ => 1.0,
        };
        Ok((
            Novelty {
                weight: motion * sharpness,
                motion,
                sharpness,
                hf_ratio: hf,
            },
            thumb,
        ))
    }

    /// Records a frame's pose (every frame) so the median step stays current.
    pub fn observe_pose(&mut self, pose: &Pose) {
        if let Some(prev) = &self.last_pose {
            let step = (prev.inverse() * pose).translation.vector.norm();
            self.steps.push_back(step);
            while self.steps.len() > self.config.step_window.max(1) {
                self.steps.pop_front();
            }
        }
        self.last_pose = Some(*pose);
    }

    /// Makes this frame the reference for the next weights.
    pub fn admit(&mut self, pose: Option<&Pose>, thumb: Vec<f32>, hf_ratio: f64) {
        if let Some(p) = pose {
            self.admitted_pose = Some(*p);
        }
        self.admitted_thumb = Some(thumb);
        self.hf_ref = Some(match self.hf_ref {
            Some(r) => 0.9 * r + 0.1 * hf_ratio,
            None => hf_ratio,
        });
    }

    /// Forgets the stream.
    /// What the meter has learnt of the stream, for a snapshot.
    pub fn state(&self) -> NoveltyState {
        NoveltyState {
            steps: self.steps.iter().copied().collect(),
            last_pose: self.last_pose.as_ref().map(pose_to_array),
            admitted_pose: self.admitted_pose.as_ref().map(pose_to_array),
            admitted_thumb: self.admitted_thumb.clone(),
            hf_ref: self.hf_ref,
        }
    }

    /// Takes back a [`NoveltyMeter::state`].
    pub fn restore(&mut self, s: NoveltyState) {
        self.steps = s.steps.into();
        self.last_pose = s.last_pose.and_then(pose_from_array);
        self.admitted_pose = s.admitted_pose.and_then(pose_from_array);
        self.admitted_thumb = s.admitted_thumb;
        self.hf_ref = s.hf_ref;
    }

    pub fn reset(&mut self) {
        *self = Self::new(self.config.clone());
    }
}

fn median(v: &VecDeque<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    Some(s[s.len() / 2])
}

/// Grey 64×64 thumbnail in [0, 1] (area average).
fn thumbnail(image: &RgbImage) -> Vec<f32> {
    let (w, h) = (image.width().max(1), image.height().max(1));
    let mut out = vec![0f32; (THUMB * THUMB) as usize];
    for ty in 0..THUMB {
        let (y0, y1) = (
            ty * h / THUMB,
            ((ty + 1) * h / THUMB).max(ty * h / THUMB + 1).min(h),
        );
        for tx in 0..THUMB {
            let (x0, x1) = (
                tx * w / THUMB,
                ((tx + 1) * w / THUMB).max(tx * w / THUMB + 1).min(w),
            );
            let mut acc = 0f32;
            let mut n = 0f32;
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = image.get_pixel(x, y).0;
                    acc +=
                        0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
                    n += 1.0;
                }
            }
            out[(ty * THUMB + tx) as usize] = acc / n.max(1.0) / 255.0;
        }
    }
    out
}

/// Side of the central patch whose spectrum is measured (at full resolution: blur shows there).
const PATCH: u32 = 128;

/// Share of the (mean-removed) spectral energy of the central grey patch of `image` above a
/// quarter of the maximum radius.
///
/// # Errors
/// OpenCV failure.
pub fn hf_energy_ratio(image: &RgbImage) -> Result<f64> {
    let (w, h) = image.dimensions();
    let side = PATCH.min(w).min(h).max(1);
    let (x0, y0) = ((w - side) / 2, (h - side) / 2);
    let mut patch = Vec::with_capacity((side * side) as usize);
    for y in y0..y0 + side {
        for x in x0..x0 + side {
            let p = image.get_pixel(x, y).0;
            patch.push(
                (0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
                    / 255.0,
            );
        }
    }
    hf_energy_ratio_of(&patch, side as i32)
}

fn hf_energy_ratio_of(patch: &[f32], n: i32) -> Result<f64> {
    let mean = patch.iter().sum::<f32>() / patch.len() as f32;
    let centred: Vec<f32> = patch.iter().map(|v| v - mean).collect();
    let mut src = Mat::new_rows_cols_with_default(n, n, CV_32F, Scalar::all(0.0))?;
    src.data_typed_mut::<f32>()?.copy_from_slice(&centred);
    let mut spec = Mat::default();
    cvcore::dft(&src, &mut spec, cvcore::DFT_COMPLEX_OUTPUT, 0)?;
    let data = spec.data_typed::<opencv::core::Vec2f>()?;
    let (mut total, mut high) = (0f64, 0f64);
    let half = f64::from(n) / 2.0;
    for (i, c) in data.iter().enumerate() {
        let (u, v) = ((i as i32 % n) as f64, (i as i32 / n) as f64);
        // Frequencies wrap: index k stands for min(k, n − k).
        let fu = u.min(f64::from(n) - u);
        let fv = v.min(f64::from(n) - v);
        let r = (fu * fu + fv * fv).sqrt() / half;
        let e = f64::from(c[0]).powi(2) + f64::from(c[1]).powi(2);
        total += e;
        if r > 0.25 {
            high += e;
        }
    }
    Ok(if total > 0.0 { high / total } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::{Translation3, UnitQuaternion, Vector3};

    /// Smooth shading plus fine texture, like a camera image.
    fn textured(seed: u32) -> RgbImage {
        RgbImage::from_fn(160, 120, |x, y| {
            let (xf, yf) = (f64::from(x), f64::from(y) + f64::from(seed) * 3.0);
            let smooth = 60.0 * (xf / 15.0).sin() * (yf / 11.0).cos();
            let fine = 30.0 * (f64::from((x * 37 + y * 91 + seed * 13) % 97) - 48.0) / 48.0;
            let v = (128.0 + smooth + fine).clamp(0.0, 255.0) as u8;
            image::Rgb([v, v, v])
        })
    }

    fn blurred(img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        RgbImage::from_fn(w, h, |x, y| {
            let mut acc = [0u32; 3];
            let mut n = 0;
            for dy in -3i32..=3 {
                for dx in -3i32..=3 {
                    let (sx, sy) = (x as i32 + dx, y as i32 + dy);
                    if sx >= 0 && sy >= 0 && sx < w as i32 && sy < h as i32 {
                        let p = img.get_pixel(sx as u32, sy as u32).0;
                        for c in 0..3 {
                            acc[c] += u32::from(p[c]);
                        }
                        n += 1;
                    }
                }
            }
            image::Rgb([(acc[0] / n) as u8, (acc[1] / n) as u8, (acc[2] / n) as u8])
        })
    }

    #[test]
    fn identical_frames_score_low_and_a_large_rotation_high() {
        let img = textured(1);
        let mut m = NoveltyMeter::new(NoveltyConfig::default());
        let p0 = Pose::identity();
        let (first, thumb) = m.weigh(&img, Some(&p0), None).unwrap();
        assert!(
            (first.weight - 1.0).abs() < 1e-9,
            "the first frame is all new"
        );
        m.observe_pose(&p0);
        m.admit(Some(&p0), thumb, first.hf_ratio);
        let (same, _) = m.weigh(&img, Some(&p0), Some(0.0)).unwrap();
        assert!(same.weight < 0.05, "{same:?}");
        let turned = Pose::from_parts(
            Translation3::identity(),
            UnitQuaternion::from_axis_angle(&Vector3::y_axis(), 20f64.to_radians()),
        );
        let (rot, _) = m.weigh(&img, Some(&turned), None).unwrap();
        assert!(rot.weight > 0.9, "{rot:?}");
    }

    #[test]
    fn a_blurred_frame_weighs_less_than_a_sharp_one() {
        let sharp = textured(2);
        let soft = blurred(&sharp);
        let (hs, hb) = (
            hf_energy_ratio(&sharp).unwrap(),
            hf_energy_ratio(&soft).unwrap(),
        );
        assert!(hb < 0.5 * hs);
        let mut m = NoveltyMeter::new(NoveltyConfig::default());
        let (n0, t0) = m.weigh(&textured(0), None, None).unwrap();
        m.admit(None, t0, n0.hf_ratio);
        let (a, _) = m.weigh(&sharp, None, Some(5.0)).unwrap();
        let (b, _) = m.weigh(&soft, None, Some(5.0)).unwrap();
        assert!(b.weight < a.weight, "blurred {b:?} vs sharp {a:?}");
        assert!(b.sharpness < 0.8);
    }
}
