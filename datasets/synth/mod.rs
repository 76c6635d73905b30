//! The synthetic world: deterministic scenes, trajectories and exact ground truth.

pub mod render;
pub mod scene;
pub mod texture;
pub mod trajectory;

use std::collections::HashMap;

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

pub use render::{flow_between, render, RenderedFrame, NO_OBJECT};
pub use scene::{Scene, SceneKind};
pub use trajectory::{Trajectory, TrajectoryKind};

use streamrecon_core::cloud::PointCloud;
use streamrecon_core::flow_field::FlowField;
use streamrecon_core::frame::{Frame, Intrinsics, Pose, RgbImage};

/// Optional image degradations (none by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Degrade {
    /// Gaussian sensor noise, standard deviation in [0, 1] intensity units.
    pub noise: f32,
    /// Motion-blur sub-frames averaged over the interval since the previous frame (0 or 1 = off).
    pub blur: u32,
    /// Exposure change amplitude: gain 1 ± this, slowly varying.
    pub exposure: f32,
    /// Fog density per metre (contrast loss towards grey).
    pub fog: f32,
    /// Signal-dependent (shot) noise: variance `shot · intensity` on top of `noise`'s, the
    /// Poisson–Gaussian model of a real sensor.
    #[serde(default)]
    pub shot: f32,
    /// JPEG quality the frames are compressed at (compression artefacts, as a camera or video
    /// stream gives); 0 = none.
    #[serde(default)]
    pub jpeg: u8,
    /// Rolling shutter: the rows are read top to bottom over this fraction of the frame
    /// interval, the middle row at the frame's time (a phone camera reads in about 0.5–0.9 of
    /// it at 30 frames/s); 0 = a global shutter.
    #[serde(default)]
    pub rolling: f32,
    /// Radial lens distortion k1 of OpenCV's model (x_d = x_u (1 + k1 r²), r in normalised
    /// image coordinates): negative is barrel, as wide-angle and phone lenses; 0 = a pinhole.
    /// The intrinsics stay the lens's camera matrix; [`SynthWorld::calibration_yaml`] gives the
    /// calibration that undistorts the frames back to it.
    #[serde(default)]
    pub lens: f32,
}

/// The lens's radial factor at undistorted normalised coordinates: x_d = x_u · this.
fn radial(k1: f64, x: f64, y: f64) -> f64 {
    1.0 + k1 * (x * x + y * y)
}

/// The frame seen through the lens: each pixel sampled bilinearly at its place in the pinhole
/// image (`map`, from [`SynthWorld::lens_pinhole`]).
fn through_lens(rgb: &[[f32; 3]], k: &Intrinsics, map: &[[f32; 2]]) -> Vec<[f32; 3]> {
    let (w, h) = (k.width as usize, k.height as usize);
    map.iter()
        .map(|&[x, y]| {
            let x = x.clamp(0.0, (w - 1) as f32);
            let y = y.clamp(0.0, (h - 1) as f32);
            let (x0, y0) = (x.floor() as usize, y.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let (fx, fy) = (x - x0 as f32, y - y0 as f32);
            let p = |xx: usize, yy: usize| rgb[yy * w + xx];
            let (a, b, c, d) = (p(x0, y0), p(x1, y0), p(x0, y1), p(x1, y1));
            std::array::from_fn(|ch| {
                (a[ch] * (1.0 - fx) + b[ch] * fx) * (1.0 - fy)
                    + (c[ch] * (1.0 - fx) + d[ch] * fx) * fy
            })
        })
        .collect()
}

/// Row bands of a rolling-shutter frame, each rendered at its own time.
const ROLLING_BANDS: u32 = 16;

impl Degrade {
    /// Parses `noise=0.02,shot=0.01,blur=4,exposure=0.2,fog=0.1,jpeg=75,rolling=0.7,lens=-0.2`
    /// (any subset).
    ///
    /// # Errors
    /// An unknown key or a bad number.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut d = Self::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value in '{part}'"))?;
            let num = |v: &str| {
                v.parse::<f32>()
                    .map_err(|_| format!("bad number '{v}' for {k}"))
            };
            match k {
                "noise" => d.noise = num(v)?,
                "blur" => d.blur = v.parse().map_err(|_| format!("bad count '{v}' for blur"))?,
                "exposure" => d.exposure = num(v)?,
                "fog" => d.fog = num(v)?,
                "shot" => d.shot = num(v)?,
                "rolling" => {
                    d.rolling = num(v)?;
                    if !(0.0..=1.0).contains(&d.rolling) {
                        return Err(format!(
                            "rolling must be 0-1 of the frame interval, got {v}"
                        ));
                    }
                }
                "lens" => {
                    d.lens = num(v)?;
                    if !(-0.5..=0.5).contains(&d.lens) {
                        return Err(format!("lens must be a k1 within ±0.5, got {v}"));
                    }
                }
                "jpeg" => {
                    d.jpeg = v
                        .parse()
                        .ok()
                        .filter(|q| (1..=100).contains(q))
                        .ok_or_else(|| format!("bad quality '{v}' for jpeg (1-100)"))?;
                }
                _ => {
                    return Err(format!(
                    "unknown degradation '{k}' (noise, shot, blur, exposure, fog, jpeg, rolling, lens)"
                ))
                }
            }
        }
        Ok(d)
    }
}

/// What to render.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthConfig {
    pub scene: SceneKind,
    pub trajectory: TrajectoryKind,
    pub frames: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub hfov_deg: f64,
    pub fps: f64,
    pub degrade: Degrade,
    /// Render the optical flow and occlusion ground truth between consecutive frames (about a
    /// fifth of the rendering time; layouts without flow files skip it).
    #[serde(default = "default_flow")]
    pub flow: bool,
    /// How fast the camera moves along its path: frame i is at the path's frame `i · speed`
    /// (2 = twice as many pixels of motion a frame; fractional positions are interpolated).
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// Photographs for the scene's first materials (real textures instead of procedural ones;
    /// at most 10 are used).
    #[serde(default)]
    pub photos: Vec<std::path::PathBuf>,
}

/// Reads the photographs of [`SynthConfig::photos`].
///
/// # Errors
/// A file that is not a readable image, named.
pub fn read_photos(paths: &[std::path::PathBuf]) -> Result<Vec<image::RgbImage>, String> {
    paths
        .iter()
        .map(|p| {
            image::open(p)
                .map(|i| i.to_rgb8())
                .map_err(|e| format!("photo {}: {e}", p.display()))
        })
        .collect()
}

fn default_flow() -> bool {
    true
}

fn default_speed() -> f64 {
    1.0
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            scene: SceneKind::Room,
            trajectory: TrajectoryKind::Smooth,
            frames: 100,
            width: 640,
            height: 480,
            seed: 0,
            hfov_deg: streamrecon_core::frame::DEFAULT_HFOV_DEG,
            fps: 30.0,
            degrade: Degrade::default(),
            flow: true,
            speed: 1.0,
            photos: Vec::new(),
        }
    }
}

/// One image row to u8: `linear · gain`, clamped to [0, 1], times 255, rounded (flat RGB, so
/// the loop vectorises).
struct QuantiseRow<'a> {
    linear: &'a [f32],
    gain: f32,
    out: &'a mut [u8],
}

impl streamrecon_core::simd::Kernel for QuantiseRow<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        quantise_row(self.linear, self.gain, self.out);
    }
}

#[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
#[inline(always)]
fn quantise_row(linear: &[f32], gain: f32, out: &mut [u8]) {
    let n = linear.len().min(out.len());
    let (linear, out) = (&linear[..n], &mut out[..n]);
    for i in 0..n {
        out[i] = quantise(linear[i] * gain);
    }
}

/// Linear [0, 1] to 8 bits, rounded (clamped outside).
#[allow(clippy::inline_always)] // per-pixel code of `QuantiseRow`
#[inline(always)]
/// `img` compressed as a JPEG at `quality` and decoded again (unchanged if either fails).
fn jpeg_round_trip(img: RgbImage, quality: u8) -> RgbImage {
    let mut bytes = Vec::new();
    let encoded = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality)
        .encode_image(&img)
        .is_ok();
    if !encoded {
        return img;
    }
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
        .map_or(img, image::DynamicImage::into_rgb8)
}

fn quantise(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// A frame with everything the ground truth holds.
pub struct SynthFrame {
    pub index: usize,
    pub timestamp: f64,
    /// The image as a camera would deliver it (degradations applied).
    pub image: RgbImage,
    pub view: RenderedFrame,
    /// Flow to the next frame and its occlusion mask (absent for the last frame).
    pub flow_fwd: Option<(FlowField, Vec<bool>)>,
    /// Flow to the previous frame and its occlusion mask (absent for frame 0).
    pub flow_bwd: Option<(FlowField, Vec<bool>)>,
}

/// A scene, a trajectory and a camera.
pub struct SynthWorld {
    pub config: SynthConfig,
    pub scene: Scene,
    pub trajectory: Trajectory,
    pub intrinsics: Intrinsics,
    /// With lens distortion, made on first use (see [`SynthWorld::lens_pinhole`]).
    lens: std::sync::OnceLock<Option<(Intrinsics, Vec<[f32; 2]>)>>,
}

impl SynthWorld {
    pub fn new(config: SynthConfig) -> Self {
        // Checked where the configuration is made (`streamrecon synth` refuses a bad photo);
        // one that cannot be read here leaves its material procedural.
        let photos = read_photos(&config.photos).unwrap_or_else(|e| {
            log::error!("{e}: procedural textures instead");
            Vec::new()
        });
        let scene = Scene::with_photos(config.scene, config.seed, &photos);
        let trajectory = Trajectory::new(
            config.trajectory,
            config.seed,
            scene.free_min,
            scene.free_max,
        );
        let intrinsics = Intrinsics::from_hfov(config.width, config.height, config.hfov_deg);
        Self {
            config,
            scene,
            trajectory,
            intrinsics,
            lens: std::sync::OnceLock::new(),
        }
    }

    pub fn world_from_cam(&self, i: usize) -> Pose {
        self.pose_at(i as f64)
    }

    /// Frames at which the path jumps (`jumpy`, `revisit`), at this world's speed.
    pub fn jump_frames(&self) -> Vec<usize> {
        let speed = self.speed();
        let along = (self.config.frames as f64 * speed).ceil() as usize;
        let mut v: Vec<usize> = self
            .trajectory
            .jump_frames(along)
            .into_iter()
            .map(|k| (k as f64 / speed).ceil() as usize)
            .filter(|&f| f < self.config.frames)
            .collect();
        v.dedup();
        v
    }

    fn speed(&self) -> f64 {
        if self.config.speed.is_finite() && self.config.speed > 0.0 {
            self.config.speed
        } else {
            1.0
        }
    }

    /// Renders frame `i` without degradations.
    pub fn view(&self, i: usize) -> RenderedFrame {
        render(&self.scene, &self.intrinsics, &self.world_from_cam(i))
    }

    /// The camera pose at a time in frames: on the path at `t · speed`, between its frames'
    /// poses.
    fn pose_at(&self, t: f64) -> Pose {
        let t = (t * self.speed()).max(0.0);
        let i = t.floor() as usize;
        let a = self.trajectory.world_from_cam(i);
        let frac = t - t.floor();
        // On a frame of the path: its pose exactly.
        if frac <= 0.0 {
            return a;
        }
        a.lerp_slerp(&self.trajectory.world_from_cam(i + 1), frac)
    }

    /// The linear RGB the camera sees at time `t` (frames): one render, or with a rolling
    /// shutter each band of rows rendered at the time it is read. `k` is the frame's camera or,
    /// through a lens, the pinhole canvas behind it (taller than the frame): a band is read when
    /// the sensor reads the frame row it falls on (along the principal column), so the readout
    /// spans the frame's rows, as a sensor's does.
    fn render_at(&self, t: f64, k: &Intrinsics) -> Vec<[f32; 3]> {
        let rolling = f64::from(self.config.degrade.rolling);
        if rolling <= 0.0 {
            return render(&self.scene, k, &self.pose_at(t)).rgb;
        }
        let k = *k;
        let frame = self.intrinsics;
        let k1 = f64::from(self.config.degrade.lens);
        // The frame row (pixel centres) a row of `k` falls on.
        let frame_row = |row: f64| {
            let y = (row - k.cy) / k.fy;
            frame.cy + frame.fy * y * radial(k1, 0.0, y)
        };
        let mut rgb = Vec::with_capacity(k.width as usize * k.height as usize);
        // Bands as tall as the frame's 16 would be.
        let bands = (ROLLING_BANDS * k.height)
            .div_ceil(frame.height.max(1))
            .clamp(1, k.height);
        for b in 0..bands {
            let (r0, r1) = (k.height * b / bands, k.height * (b + 1) / bands);
            let middle =
                (frame_row(f64::from(r0 + r1) * 0.5 - 0.5) + 0.5) / f64::from(frame.height);
            // The band alone: the same camera with its rows cropped.
            let band = Intrinsics {
                cy: k.cy - f64::from(r0),
                height: r1 - r0,
                ..k
            };
            let when = t + rolling * (middle.clamp(0.0, 1.0) - 0.5);
            rgb.extend(render(&self.scene, &band, &self.pose_at(when)).rgb);
        }
        rgb
    }

    /// The camera image of a view: degradations applied, quantised to u8.
    pub fn camera_image(&self, i: usize, view: &RenderedFrame) -> RgbImage {
        let d = self.config.degrade;
        // Copied only when blur, fog or the rolling shutter change it (3.7 MB per 640×480 frame
        // otherwise).
        let mut rgb = std::borrow::Cow::Borrowed(view.rgb.as_slice());
        // Through a lens, the pinhole images are rendered wider and the lens applied last.
        let lens = self.lens.get_or_init(|| self.lens_pinhole()).as_ref();
        let pinhole = lens.map_or(self.intrinsics, |(k, _)| *k);
        if d.rolling > 0.0 || lens.is_some() {
            rgb = std::borrow::Cow::Owned(self.render_at(i as f64, &pinhole));
        }
        if d.blur > 1 && i > 0 {
            let rgb = rgb.to_mut();
            for k in 1..d.blur {
                // Over the second half of the interval since the previous frame.
                let t = f64::from(k) / f64::from(d.blur);
                let sub = self.render_at(i as f64 - 0.5 * t, &pinhole);
                for (acc, s) in rgb.iter_mut().zip(&sub) {
                    for c in 0..3 {
                        acc[c] += s[c];
                    }
                }
            }
            let s = 1.0 / d.blur as f32;
            for p in rgb.iter_mut() {
                for c in p.iter_mut() {
                    *c *= s;
                }
            }
        }
        if let Some((k, map)) = lens {
            rgb = std::borrow::Cow::Owned(through_lens(&rgb, k, map));
        }
        // Fog reads the pinhole view's depth at the same pixel (not moved by a lens).
        if d.fog > 0.0 {
            for (p, &z) in rgb.to_mut().iter_mut().zip(&view.depth) {
                let keep = if z > 0.0 { (-d.fog * z).exp() } else { 0.0 };
                for c in p.iter_mut() {
                    *c = *c * keep + 0.7 * (1.0 - keep);
                }
            }
        }
        let gain = 1.0 + d.exposure * (std::f32::consts::TAU * i as f32 / 90.0).sin();
        let (w, h) = (self.intrinsics.width, self.intrinsics.height);
        let mut img = RgbImage::new(w, h);
        if d.noise > 0.0 || d.shot > 0.0 {
            // One generator per frame, drawn in pixel order: the same seed gives the same bytes.
            let mut rng = rand_pcg::Pcg64::seed_from_u64(
                self.config.seed ^ (i as u64).wrapping_mul(0x9e37_79b9),
            );
            let unit = Normal::new(0.0f32, 1.0).expect("finite sigma");
            for (px, c) in img.pixels_mut().zip(rgb.iter()) {
                for k in 0..3 {
                    let v = (c[k] * gain).max(0.0);
                    let sigma = (d.noise * d.noise + d.shot * v).sqrt();
                    px[k] = quantise(v + sigma * unit.sample(&mut rng));
                }
            }
        } else {
            use rayon::prelude::*;
            let row = 3 * w as usize;
            let buf: &mut [u8] = &mut img;
            buf.par_chunks_mut(row)
                .zip(rgb.par_chunks(w as usize))
                .for_each(|(out, src)| {
                    streamrecon_core::simd::vectorized(QuantiseRow {
                        linear: src.as_flattened(),
                        gain,
                        out,
                    });
                });
        }
        if d.jpeg > 0 {
            img = jpeg_round_trip(img, d.jpeg);
        }
        img
    }

    /// With lens distortion: the pinhole camera the frames are rendered with before the lens
    /// and, per frame pixel, where it falls in that pinhole image. The pinhole has the lens's
    /// focal length (at the centre the distortion is 1:1, as on a real sensor) on a canvas large
    /// enough that every pixel of the distorted frame sees into it. A narrower focal length on
    /// the frame's canvas would render the centre with fewer pixels than the frame has and
    /// upsample it: on camera-like frames (noise, blur, JPEG) that softness alone took flowvo's
    /// ATE on seed 3 from 0.27 % of the path to 2.30 %, a loss no real lens causes.
    fn lens_pinhole(&self) -> Option<(Intrinsics, Vec<[f32; 2]>)> {
        let k1 = f64::from(self.config.degrade.lens);
        if k1 == 0.0 {
            return None;
        }
        let k = self.intrinsics;
        let (w, h) = (k.width as usize, k.height as usize);
        // Each distorted pixel's undistorted normalised coordinates: x_d = x_u (1 + k1 r_u²)
        // inverted by fixed-point iteration, as OpenCV's undistortPoints does.
        let undistorted: Vec<[f64; 2]> = (0..w * h)
            .map(|i| {
                let xd = ((i % w) as f64 - k.cx) / k.fx;
                let yd = ((i / w) as f64 - k.cy) / k.fy;
                let (mut x, mut y) = (xd, yd);
                for _ in 0..20 {
                    let f = radial(k1, x, y);
                    (x, y) = (xd / f, yd / f);
                }
                [x, y]
            })
            .collect();
        // The canvas: the frame's own, grown on each side to the farthest pixel the lens sees
        // there (pixel centres; one pixel of room for the bilinear read).
        let (mut x0, mut x1, mut y0, mut y1) = (0.0f64, (w - 1) as f64, 0.0f64, (h - 1) as f64);
        for [x, y] in &undistorted {
            let (px, py) = (k.fx * x + k.cx, k.fy * y + k.cy);
            (x0, x1, y0, y1) = (x0.min(px), x1.max(px), y0.min(py), y1.max(py));
        }
        let (left, top) = ((-x0).ceil() + 1.0, (-y0).ceil() + 1.0);
        let width = (x1 + left).ceil() as u32 + 2;
        let height = (y1 + top).ceil() as u32 + 2;
        let pinhole = Intrinsics {
            cx: k.cx + left,
            cy: k.cy + top,
            width,
            height,
            ..k
        };
        let map = undistorted
            .iter()
            .map(|[x, y]| {
                [
                    (pinhole.fx * x + pinhole.cx) as f32,
                    (pinhole.fy * y + pinhole.cy) as f32,
                ]
            })
            .collect();
        Some((pinhole, map))
    }

    /// With lens distortion, OpenCV's calibration file (YAML) of the frames: the camera matrix
    /// of [`Self::intrinsics`] and the distortion coefficients, for `--intrinsics-file`.
    pub fn calibration_yaml(&self) -> Option<String> {
        let k1 = self.config.degrade.lens;
        if k1 == 0.0 {
            return None;
        }
        let k = self.intrinsics;
        Some(format!(
            "%YAML:1.0\n---\nimage_width: {}\nimage_height: {}\ncamera_matrix: !!opencv-matrix\n   rows: 3\n   cols: 3\n   dt: d\n   data: [ {}, 0., {}, 0., {}, {}, 0., 0., 1. ]\ndistortion_coefficients: !!opencv-matrix\n   rows: 1\n   cols: 5\n   dt: d\n   data: [ {}, 0., 0., 0., 0. ]\n",
            k.width, k.height, k.fx, k.cx, k.fy, k.cy, k1
        ))
    }

    /// The sequence as pipeline input: each camera image as a [`Frame`] with the intrinsics
    /// (no ground truth attached), with its rendered view (pose, depth).
    pub fn input_frames(&self) -> impl Iterator<Item = (Frame, RenderedFrame)> + '_ {
        let intrinsics = self.intrinsics;
        self.frames().map(move |f| {
            let frame = Frame {
                index: f.index as u64,
                source_index: f.index as u64,
                timestamp: f.timestamp,
                image: f.image,
                intrinsics: Some(intrinsics),
                gt: None,
            };
            (frame, f.view)
        })
    }

    /// Streams the sequence frame by frame, holding at most two rendered views.
    pub fn frames(&self) -> SynthFrames<'_> {
        SynthFrames {
            world: self,
            next: 0,
            pending: None,
        }
    }
}

/// Iterator over a synthetic sequence (see [`SynthWorld::frames`]).
pub struct SynthFrames<'a> {
    world: &'a SynthWorld,
    next: usize,
    pending: Option<SynthFrame>,
}

impl Iterator for SynthFrames<'_> {
    type Item = SynthFrame;

    fn next(&mut self) -> Option<SynthFrame> {
        let w = self.world;
        let n = w.config.frames;
        loop {
            if self.next >= n {
                return self.pending.take();
            }
            let i = self.next;
            self.next += 1;
            let view = w.view(i);
            let image = w.camera_image(i, &view);
            let mut frame = SynthFrame {
                index: i,
                timestamp: i as f64 / w.config.fps,
                image,
                view,
                flow_fwd: None,
                flow_bwd: None,
            };
            if let Some(mut prev) = self.pending.take() {
                if !w.config.flow {
                    self.pending = Some(frame);
                    return Some(prev);
                }
                let (fwd, bwd) = rayon::join(
                    || flow_between(&prev.view, &frame.view, &w.intrinsics),
                    || flow_between(&frame.view, &prev.view, &w.intrinsics),
                );
                prev.flow_fwd = Some(fwd);
                frame.flow_bwd = Some(bwd);
                self.pending = Some(frame);
                return Some(prev);
            }
            self.pending = Some(frame);
        }
    }
}

/// Accumulates a ground-truth cloud of the visible surfaces, one point per voxel (bounded by the scene).
pub struct SurfaceSampler {
    voxel: f32,
    stride: usize,
    cells: HashMap<(i32, i32, i32), SurfacePoint>,
}

/// A sampled surface point and its colour.
type SurfacePoint = ([f32; 3], [u8; 3]);

impl SurfaceSampler {
    pub fn new(voxel: f32, stride: usize) -> Self {
        Self {
            voxel,
            stride: stride.max(1),
            cells: HashMap::new(),
        }
    }

    pub fn add(&mut self, view: &RenderedFrame, image: &RgbImage, intr: &Intrinsics) {
        let w = intr.width as usize;
        for y in (0..intr.height as usize).step_by(self.stride) {
            for x in (0..w).step_by(self.stride) {
                let z = view.depth[y * w + x];
                if z <= 0.0 {
                    continue;
                }
                let p = view.world_from_cam * intr.unproject(x as f64, y as f64, f64::from(z));
                let p = [p.x as f32, p.y as f32, p.z as f32];
                let key = (
                    (p[0] / self.voxel).floor() as i32,
                    (p[1] / self.voxel).floor() as i32,
                    (p[2] / self.voxel).floor() as i32,
                );
                let c = image.get_pixel(x as u32, y as u32).0;
                self.cells.entry(key).or_insert((p, c));
            }
        }
    }

    /// The cloud, sorted by voxel so equal inputs give equal bytes.
    pub fn cloud(&self) -> PointCloud {
        let mut entries: Vec<_> = self.cells.iter().collect();
        entries.sort_unstable_by_key(|(k, _)| **k);
        PointCloud {
            points: entries.iter().map(|(_, v)| v.0).collect(),
            colors: Some(entries.iter().map(|(_, v)| v.1).collect()),
            confidence: None,
            normals: None,
        }
    }
}
