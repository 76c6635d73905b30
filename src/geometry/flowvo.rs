//! Engine `flowvo`: monocular visual odometry driven by the flow stage, no weights.
//!
//! - Tracks: one point per grid cell on textured pixels, advanced by the forward flow and killed
//!   where the flow is unconfident or occluded.
//! - Initialisation: once the tracks' median displacement from the segment's reference frame
//!   exceeds a parallax threshold, essential matrix (MAGSAC++), pose recovery and triangulation
//!   (OpenCV calib3d), accepted only when the triangulated points' median ray angle reaches 2°
//!   and the parallax left after the best pure rotation between the views is at least 5 % of
//!   that rotation (a turn displaces pixels without revealing depth, and the essential matrix
//!   of a pure turn is arbitrary; maps started from less drifted in scale on a third of our
//!   synthetic sequences, `benches/flowvo_seeds.rs`). Frames seen meanwhile are held back and
//!   posed by PnP once the map exists.
//! - Tracking: PnP + RANSAC against the triangulated tracks; new tracks are triangulated once their
//!   parallax suffices. Too few inliers = tracking lost: a new map segment starts at the last pose
//!   (scale matched to the previous segment's median depth) and is reported.
//! - Keyframes by parallax and tracked fraction; two dense flow chains map each new frame's pixels
//!   back to the last two keyframes, and per-pixel triangulation against the older one gives depth,
//!   with confidence from the parallax angle and the chained flow confidence.
//!
//! Scale is that of the first segment's initialisation, normalised to a median depth of 1.

use std::collections::{BTreeMap, HashMap, VecDeque};

use nalgebra::{Matrix3, Point3, Vector3};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cv;
use super::novelty::{NoveltyConfig, NoveltyMeter};
use super::triangulate::midpoint;
use super::window_ba::{self, Observation, Window};
use super::{FrameGeometry, GeometryEngine, GeometryStats};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{Frame, Intrinsics, Pose, RgbImage};
use streamrecon_core::simd::{vectorized, Kernel};
use streamrecon_flow::{FlowField, PairFlow, TargetCells};

/// Parameters of `flowvo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowVoConfig {
    /// Track grid: cells across the image width (one track per cell).
    pub grid_cells_across: usize,
    /// Top up tracks whenever fewer than this fraction of cells hold one.
    pub min_track_coverage: f64,
    /// Least fraction of tracks that must be essential-matrix inliers to initialise.
    pub init_inlier_fraction: f64,
    /// Least grey-level gradient (0–255 scale) for a pixel to start a track.
    pub min_texture: f32,
    /// Least flow confidence for a track to survive a step.
    pub min_track_confidence: f32,
    /// Median track displacement (fraction of the image width) needed to initialise.
    pub init_parallax: f64,
    /// Median ray angle of the initial map's points needed to initialise, degrees: the parallax
    /// left once the rotation is taken out (pixel displacement alone is satisfied by a turn,
    /// which leaves the translation and so the map's shape unobservable).
    #[serde(default = "default_init_min_angle_deg")]
    pub init_min_angle_deg: f64,
    /// Median parallax left after the best pure rotation of one view onto the other, per unit
    /// of that rotation's angle, needed to initialise. A turn leaves none (only the tracks'
    /// drift: ≤ 0.026 on our synthetic pure turns), whatever the essential matrix claims; the
    /// synthetic translating paths initialise at 0.08–0.23.
    #[serde(default = "default_init_parallax_per_turn")]
    pub init_parallax_per_turn: f64,
    /// Least ray angle of a point in the initial map, as a fraction of `min_triangulation_deg`.
    #[serde(default = "default_init_point_angle_fraction")]
    pub init_point_angle_fraction: f64,
    /// Frames to wait for initialisation before giving up and starting over.
    pub max_init_frames: usize,
    /// Fewest PnP inliers for a tracked pose.
    pub min_inliers: usize,
    /// RANSAC reprojection threshold, pixels.
    pub ransac_px: f32,
    /// Least ray angle to triangulate a track, degrees.
    pub min_triangulation_deg: f64,
    /// A new keyframe once the median displacement from the last exceeds this fraction of the width…
    pub keyframe_parallax: f64,
    /// …or fewer than this fraction of the last keyframe's mapped tracks survive.
    pub keyframe_tracked_fraction: f64,
    /// Ray angle at which dense depth confidence (before the flow's own) reaches 0.5, degrees.
    pub depth_angle_deg: f64,
    /// Median scene depth the first segment is scaled to.
    pub initial_median_depth: f64,
    /// Pose-adaptive keyframes (`None` = the parallax/tracked-fraction rule alone).
    pub adaptive: Option<AdaptiveKeyframes>,
    /// Windowed bundle adjustment at each keyframe (`None` = off, the default: on the synthetic
    /// sequences it lowers the reprojection error but not the trajectory error; see the issue
    /// notes).
    #[serde(default)]
    pub window_ba: Option<WindowBaConfig>,
}

/// Windowed bundle adjustment (see `geometry::window_ba`): at each keyframe, the poses of up to
/// `frames` recent frames, `stride` frames apart and ending at the keyframe, and the mapped
/// points they see are refined together; the `fixed_frames` oldest poses stay fixed (frame and
/// scale).
/// With pose-adaptive keyframes on, a frame's observations weigh 0.25 + 0.75·w_t (its novelty
/// weight), so near-duplicate frames pull less; otherwise all weigh 1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WindowBaConfig {
    pub frames: usize,
    pub stride: usize,
    /// Points in the problem at most (evenly subsampled beyond).
    pub max_points: usize,
    pub iterations: usize,
    /// Huber threshold of the reprojection error, pixels.
    pub huber_px: f64,
    /// Oldest window frames held fixed (≥ 2: the monocular frame and scale). Two frames 8 apart
    /// anchor the scale on one short, noisy baseline: on hand-held seeds 1–4 and 9 that gave
    /// ATE up to 12.6 % of the path; four fixed, up to 7.9 %; six, up to 1.6 %
    /// (`benches/flowvo_seeds.rs --variants=ba,ba4,ba6`).
    #[serde(default = "default_ba_fixed_frames")]
    pub fixed_frames: usize,
}

fn default_ba_fixed_frames() -> usize {
    6
}

impl Default for WindowBaConfig {
    fn default() -> Self {
        Self {
            frames: 8,
            stride: 8,
            max_points: 2000,
            iterations: 8,
            huber_px: 1.5,
            fixed_frames: default_ba_fixed_frames(),
        }
    }
}

/// Keyframe selection by novelty weight (see `geometry::novelty`): a candidate keyframe whose
/// weight is below `admit` (blurred, or nothing new) is skipped; a frame whose weight reaches
/// `force` becomes a keyframe at half the usual parallax.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdaptiveKeyframes {
    pub admit: f64,
    pub force: f64,
}

impl Default for AdaptiveKeyframes {
    fn default() -> Self {
        Self {
            admit: 0.5,
            force: 0.9,
        }
    }
}

/// Median angle (radians) between the bearings `b` and the best pure rotation of the bearings
/// `a` (Wahba's problem, by SVD): the parallax a camera turn cannot explain; and that rotation's
/// angle. Unlike the ray angles of a triangulation it needs no essential-matrix decomposition,
/// which a pure turn leaves undetermined.
fn parallax_beyond_rotation(a: &[Vector3<f64>], b: &[Vector3<f64>]) -> (f64, f64) {
    let mut m = Matrix3::zeros();
    for (p, q) in a.iter().zip(b) {
        m += q.normalize() * p.normalize().transpose();
    }
    let svd = m.svd(true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return (0.0, 0.0);
    };
    let d = (u * v_t).determinant().signum();
    let r = u * Matrix3::from_diagonal(&Vector3::new(1.0, 1.0, d)) * v_t;
    let mut angles: Vec<f64> = a.iter().zip(b).map(|(p, q)| (r * p).angle(q)).collect();
    let turn = nalgebra::Rotation3::from_matrix_unchecked(r).angle();
    (median(&mut angles).unwrap_or(0.0), turn)
}

fn default_init_min_angle_deg() -> f64 {
    2.0
}

fn default_init_parallax_per_turn() -> f64 {
    0.05
}

fn default_init_point_angle_fraction() -> f64 {
    1.0
}

impl Default for FlowVoConfig {
    fn default() -> Self {
        Self {
            grid_cells_across: 40,
            min_track_coverage: 0.5,
            init_inlier_fraction: 0.6,
            min_texture: 1.5,
            min_track_confidence: 0.1,
            init_parallax: 0.03,
            init_min_angle_deg: default_init_min_angle_deg(),
            init_parallax_per_turn: default_init_parallax_per_turn(),
            init_point_angle_fraction: default_init_point_angle_fraction(),
            max_init_frames: 60,
            min_inliers: 20,
            ransac_px: 1.5,
            min_triangulation_deg: 1.0,
            keyframe_parallax: 0.06,
            keyframe_tracked_fraction: 0.7,
            depth_angle_deg: 2.0,
            initial_median_depth: 1.0,
            adaptive: None,
            window_ba: None,
        }
    }
}

/// One row of [`Chain::advance_all`]: where the row's pixels land under the backward flow
/// (vectorised), then each chain sampled there.
struct AdvanceRow<'a, 'b> {
    /// The row of the backward flow (interleaved) and of its confidence.
    flow: &'a [f32],
    conf: &'a [f32],
    y: usize,
    size: (usize, usize),
    /// The chains' previous states, and this row of their new ones.
    olds: &'a [&'a [f32]],
    outs: &'a mut [&'b mut [f32]],
    targets: &'a mut TargetCells,
}

impl Kernel for AdvanceRow<'_, '_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        let AdvanceRow {
            flow,
            conf,
            y,
            size,
            olds,
            outs,
            targets,
        } = self;
        let w = size.0;
        targets.fill(flow, y, size, 3);
        let TargetCells {
            cell,
            fx,
            fy,
            inside,
        } = targets;
        let (cell, fx, fy, inside) = (&cell[..w], &fx[..w], &fy[..w], &inside[..w]);
        let (flow, conf) = (&flow[..2 * w], &conf[..w]);
        let row = 3 * w;
        for (old, out) in olds.iter().zip(outs.iter_mut()) {
            let out = &mut out[..3 * w];
            for x in 0..w {
                let o = &mut out[3 * x..3 * x + 3];
                // Outside, the cell is 0 (a valid read) and the values are masked to 0.
                let [ou, ov, oc] = sample_cell(old, row, cell[x] as usize, fx[x], fy[x]);
                let keep = inside[x] != 0;
                o[0] = if keep { flow[2 * x] + ou } else { 0.0 };
                o[1] = if keep { flow[2 * x + 1] + ov } else { 0.0 };
                o[2] = if keep { conf[x] * oc } else { 0.0 };
            }
        }
    }
}

/// Bilinear sample of (Δx, Δy, confidence) of a chain's `data` in the cell whose top-left
/// value is at `i00` (`row` values a row).
#[allow(clippy::inline_always)] // inlined into dispatched kernels (`streamrecon_core::simd`)
#[inline(always)]
fn sample_cell(data: &[f32], row: usize, i00: usize, fx: f32, fy: f32) -> [f32; 3] {
    let (top, bottom) = (&data[i00..i00 + 6], &data[i00 + row..i00 + row + 6]);
    let mut out = [0.0f32; 3];
    for k in 0..3 {
        let t = top[k] + (top[k + 3] - top[k]) * fx;
        let b = bottom[k] + (bottom[k + 3] - bottom[k]) * fx;
        out[k] = t + (b - t) * fy;
    }
    out
}

struct Track {
    x: f32,
    y: f32,
    point: Option<Point3<f64>>,
    /// Ray angle the point was triangulated with (radians); grows as the baseline does.
    angle: f64,
    /// Recent observations (frame, x, y), oldest first.
    obs: VecDeque<(u64, f32, f32)>,
    /// Mapped when the current keyframe was chosen.
    mapped_at_keyframe: bool,
}

/// Dense map from the current frame's pixels to a keyframe's pixels, with chained confidence,
/// stored interleaved per pixel as (Δx, Δy, confidence) so one bilinear lookup reads all three.
struct Chain {
    key: u64,
    /// Row-major at the frames' size (the flow's, when it advances).
    data: Vec<f32>,
    /// The next state is written here, then swapped in (no allocation per frame).
    scratch: Vec<f32>,
}

impl Chain {
    fn new(key: u64, w: usize, h: usize) -> Self {
        let mut data = vec![0.0f32; w * h * 3];
        for px in data.chunks_exact_mut(3) {
            px[2] = 1.0;
        }
        Self {
            key,
            scratch: vec![0.0; data.len()],
            data,
        }
    }

    /// Extends chains by one frame with the backward flow (t → t−1) and its confidence, in one
    /// pass over the flow for all of them.
    fn advance_all(chains: &mut [&mut Chain], bwd: &FlowField, bwd_conf: &[f32]) {
        let (w, h) = (bwd.width, bwd.height);
        for c in chains.iter_mut() {
            std::mem::swap(&mut c.data, &mut c.scratch);
        }
        // `scratch` now holds the previous state; `data` receives the new one.
        let olds: Vec<Vec<f32>> = chains
            .iter_mut()
            .map(|c| std::mem::take(&mut c.scratch))
            .collect();
        if w < 2 || h < 2 {
            // No cell to sample: every pixel's target is outside.
            for c in chains.iter_mut() {
                c.data.fill(0.0);
            }
        } else {
            let old_data: Vec<&[f32]> = olds.iter().map(Vec::as_slice).collect();
            let mut outs: Vec<&mut [f32]> =
                chains.iter_mut().map(|c| c.data.as_mut_slice()).collect();
            let rows: Vec<Vec<&mut [f32]>> = {
                let mut per_chain: Vec<std::slice::ChunksMut<'_, f32>> =
                    outs.iter_mut().map(|o| o.chunks_mut(3 * w)).collect();
                (0..h)
                    .map(|_| per_chain.iter_mut().filter_map(Iterator::next).collect())
                    .collect()
            };
            rows.into_par_iter().enumerate().for_each_init(
                || TargetCells::new(w),
                |targets, (y, mut row_outs)| {
                    vectorized(AdvanceRow {
                        flow: &bwd.data[2 * w * y..2 * w * (y + 1)],
                        conf: &bwd_conf[w * y..w * (y + 1)],
                        y,
                        size: (w, h),
                        olds: &old_data,
                        outs: &mut row_outs,
                        targets,
                    });
                },
            );
        }
        for (c, old) in chains.iter_mut().zip(olds) {
            c.scratch = old;
        }
    }

    fn median_displacement(&self) -> f64 {
        let mut m: Vec<f32> = self
            .data
            .chunks_exact(3)
            .filter(|d| d[2] > 0.3)
            .step_by(7)
            .map(|d| (d[0] * d[0] + d[1] * d[1]).sqrt())
            .collect();
        if m.is_empty() {
            return 0.0;
        }
        let mid = m.len() / 2;
        let (_, v, _) = m.select_nth_unstable_by(mid, f32::total_cmp);
        f64::from(*v)
    }
}

struct Pending {
    index: u64,
    timestamp: f64,
}

enum Phase {
    Initializing {
        reference: u64,
        pending: Vec<Pending>,
    },
    Tracking,
}

/// The `flowvo` engine.
pub struct FlowVo {
    config: FlowVoConfig,
    novelty: NoveltyMeter,
    intrinsics: Option<Intrinsics>,
    tracks: Vec<Track>,
    /// world_from_cam of recent frames.
    poses: BTreeMap<u64, Pose>,
    phase: Phase,
    /// Where the current segment's reference camera sits in the world.
    segment_origin: Pose,
    segment: u32,
    /// Median depth of the last map, to match the scale of the next segment.
    median_depth: f64,
    chain_old: Option<Chain>,
    chain_new: Option<Chain>,
    last_index: Option<u64>,
    started: bool,
    /// Mapped tracks when the last keyframe was chosen.
    keyframe_base: usize,
    /// Camera displacement of the last frames, to reject implausible PnP jumps.
    recent_steps: VecDeque<f64>,
    /// Novelty weight of recent frames (pose-adaptive mode only), for the bundle adjustment.
    novelty_weights: BTreeMap<u64, f64>,
}

/// Steps remembered for the jump check.
const RECENT_STEPS: usize = 15;
/// A step this many times the recent median (and above the map's noise floor) is implausible.
const MAX_STEP_RATIO: f64 = 6.0;

/// What every row of [`FlowVo::dense_depth`] shares: rays are linear maps of the pixel
/// (world_from_cam rotation × K⁻¹, no divisions), the baseline is fixed. Plain arrays: the
/// loop vectorises over them, not over nalgebra's views.
struct DepthRow {
    /// Columns of the current frame's pixel-to-ray map.
    cur: [[f64; 3]; 3],
    /// Columns of the keyframe's pixel-to-ray map.
    key: [[f64; 3]; 3],
    /// Current − key camera centre.
    w0: [f64; 3],
    /// The current camera's optical axis in the world.
    axis: [f64; 3],
    theta0_sq: f64,
}

impl DepthRow {
    /// For the current frame at `cur` against the keyframe at `key` (both world_from_cam).
    fn new(k: &Intrinsics, cur: &Pose, key: &Pose, depth_angle_deg: f64) -> Self {
        let k_inv = Matrix3::new(
            1.0 / k.fx,
            0.0,
            -k.cx / k.fx,
            0.0,
            1.0 / k.fy,
            -k.cy / k.fy,
            0.0,
            0.0,
            1.0,
        );
        let columns = |p: &Pose| {
            let m = p.rotation.to_rotation_matrix().matrix() * k_inv;
            [0, 1, 2].map(|j| [m[(0, j)], m[(1, j)], m[(2, j)]])
        };
        let w0 = cur.translation.vector - key.translation.vector;
        let axis = cur.rotation * Vector3::z();
        let theta0 = depth_angle_deg.to_radians();
        Self {
            cur: columns(cur),
            key: columns(key),
            w0: [w0.x, w0.y, w0.z],
            axis: [axis.x, axis.y, axis.z],
            theta0_sq: theta0 * theta0,
        }
    }
}

/// Row `y` of the dense depth: `chain` is the row of (Δx, Δy, confidence) to the keyframe.
struct DepthRowAt<'a> {
    row: &'a DepthRow,
    y: usize,
    chain: &'a [f32],
    depth: &'a mut [f32],
    conf: &'a mut [f32],
}

impl Kernel for DepthRowAt<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) {
        depth_row(self.row, self.y, self.chain, self.depth, self.conf);
    }
}

/// The midpoint triangulation of `triangulate::midpoint_cos`, specialised per pixel and written
/// without branches (a failed test writes 0), so the compiler vectorises it. A function of its
/// own: as arguments, the slices are known not to overlap; as fields of the kernel they are not,
/// and the loop stayed scalar.
#[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
#[inline(always)]
fn depth_row(row: &DepthRow, y: usize, chain: &[f32], depth: &mut [f32], conf: &mut [f32]) {
    let DepthRow {
        cur: [d0, d1, d2],
        key: [c0, c1, c2],
        w0,
        axis,
        theta0_sq,
    } = *row;
    let yf = y as f64;
    let dc_row = [0, 1, 2].map(|i| d1[i] * yf + d2[i]);
    let dot = |p: &[f64; 3], q: &[f64; 3]| p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
    // Indexed, not zipped iterators: the compiler vectorises this form.
    let w = depth.len();
    let (chain, conf) = (&chain[..3 * w], &mut conf[..w]);
    for x in 0..w {
        let xf = x as f64;
        let (u, v, c) = (
            f64::from(chain[3 * x]),
            f64::from(chain[3 * x + 1]),
            f64::from(chain[3 * x + 2]),
        );
        let (kx, ky) = (xf + u, yf + v);
        let dc = [
            dc_row[0] + d0[0] * xf,
            dc_row[1] + d0[1] * xf,
            dc_row[2] + d0[2] * xf,
        ];
        let dk = [
            c0[0] * kx + c1[0] * ky + c2[0],
            c0[1] * kx + c1[1] * ky + c2[1],
            c0[2] * kx + c1[2] * ky + c2[2],
        ];
        let (a, b, cc) = (dot(&dc, &dc), dot(&dc, &dk), dot(&dk, &dk));
        let (d, e) = (dot(&dc, &w0), dot(&dk, &w0));
        let denom = a * cc - b * b;
        let inv = 1.0 / denom;
        let (s, t) = ((b * e - cc * d) * inv, (a * e - b * d) * inv);
        // Depth of the midpoint (oc + s·dc + ok + t·dk) / 2 along the optical axis.
        let mid = [0, 1, 2].map(|i| dc[i] * s + dk[i] * t - w0[i]);
        let z = 0.5 * dot(&axis, &mid);
        let cos = (b / (a * cc).sqrt()).clamp(-1.0, 1.0);
        // angle² ≈ 2(1 − cos) for small angles; a rational ramp instead of 1 − exp(−a²/θ0²).
        let a2 = 2.0 * (1.0 - cos);
        // Confident flow, rays not parallel, the point in front of both cameras (`&`, not
        // `&&`: no branch per test).
        #[allow(clippy::needless_bitwise_bool)]
        let ok = (c > 0.05) & (denom.abs() >= 1e-12 * a * cc) & (s > 0.0) & (t > 0.0) & (z > 0.0);
        depth[x] = if ok { z as f32 } else { 0.0 };
        conf[x] = if ok {
            (c * a2 / (a2 + theta0_sq)) as f32
        } else {
            0.0
        };
    }
}

fn grey_and_gradient(img: &RgbImage) -> (Vec<f32>, Vec<f32>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let grey: Vec<f32> = img
        .pixels()
        .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
        .collect();
    let mut grad = vec![0.0f32; w * h];
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let gx = 0.5 * (grey[y * w + x + 1] - grey[y * w + x - 1]);
            let gy = 0.5 * (grey[(y + 1) * w + x] - grey[(y - 1) * w + x]);
            grad[y * w + x] = (gx * gx + gy * gy).sqrt();
        }
    }
    (grey, grad)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    Some(*m)
}

impl FlowVo {
    pub fn new(config: FlowVoConfig) -> Self {
        let median_depth = config.initial_median_depth;
        Self {
            config,
            novelty: NoveltyMeter::new(NoveltyConfig::default()),
            intrinsics: None,
            tracks: Vec::new(),
            poses: BTreeMap::new(),
            phase: Phase::Tracking,
            segment_origin: Pose::identity(),
            segment: 0,
            median_depth,
            chain_old: None,
            chain_new: None,
            last_index: None,
            started: false,
            keyframe_base: 0,
            recent_steps: VecDeque::new(),
            novelty_weights: BTreeMap::new(),
        }
    }

    fn grid_cell(&self, width: usize) -> usize {
        (width / self.config.grid_cells_across.max(1)).max(4)
    }

    fn k(&self) -> Intrinsics {
        self.intrinsics
            .expect("intrinsics are set at the first frame")
    }

    /// Starts tracks in empty grid cells at their most textured pixel.
    fn spawn_tracks(&mut self, frame: &Frame) {
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        let cell = self.grid_cell(w);
        let (cw, ch) = (w.div_ceil(cell), h.div_ceil(cell));
        let mut occupied = vec![false; cw * ch];
        for t in &self.tracks {
            let (cx, cy) = (
                (t.x as usize / cell).min(cw - 1),
                (t.y as usize / cell).min(ch - 1),
            );
            occupied[cy * cw + cx] = true;
        }
        let (_, grad) = grey_and_gradient(&frame.image);
        let margin = 4;
        let mut spawned = 0usize;
        for cy in 0..ch {
            for cx in 0..cw {
                if occupied[cy * cw + cx] {
                    continue;
                }
                let mut best = (self.config.min_texture, None);
                for y in (cy * cell).max(margin)..((cy + 1) * cell).min(h - margin) {
                    for x in (cx * cell).max(margin)..((cx + 1) * cell).min(w - margin) {
                        if grad[y * w + x] > best.0 {
                            best = (grad[y * w + x], Some((x, y)));
                        }
                    }
                }
                if let (_, Some((x, y))) = best {
                    spawned += 1;
                    let mut obs = VecDeque::new();
                    obs.push_back((frame.index, x as f32, y as f32));
                    self.tracks.push(Track {
                        x: x as f32,
                        y: y as f32,
                        point: None,
                        angle: 0.0,
                        obs,
                        mapped_at_keyframe: false,
                    });
                }
            }
        }
        log::debug!(
            "flowvo: frame {}: spawned {spawned}, {} tracks",
            frame.index,
            self.tracks.len()
        );
    }

    /// Moves tracks along the forward flow of the pair ending at `index`.
    fn advance_tracks(&mut self, flow: &PairFlow, index: u64) {
        let (w, h) = (flow.fwd.width, flow.fwd.height);
        let keep_obs = self.config.max_init_frames + 2;
        let min_conf = self.config.min_track_confidence;
        self.tracks.retain_mut(|t| {
            let Some((u, v)) = flow.fwd.sample(t.x, t.y) else {
                return false;
            };
            let (xi, yi) = (
                (t.x.round() as usize).min(w - 1),
                (t.y.round() as usize).min(h - 1),
            );
            let i = yi * w + xi;
            if flow.fwd_occ[i] || flow.fwd_conf[i] < min_conf {
                return false;
            }
            let (nx, ny) = (t.x + u, t.y + v);
            if !(nx >= 1.0 && ny >= 1.0 && nx <= (w - 2) as f32 && ny <= (h - 2) as f32) {
                return false;
            }
            t.x = nx;
            t.y = ny;
            t.obs.push_back((index, nx, ny));
            while t.obs.len() > keep_obs {
                t.obs.pop_front();
            }
            true
        });
        // Tracks that converge onto the same spot carry no new information.
        let cell = (self.grid_cell(w) / 2).max(2) as f32;
        let mut seen = std::collections::HashSet::new();
        self.tracks
            .retain(|t| seen.insert(((t.x / cell) as i32, (t.y / cell) as i32)));
    }

    fn bearing(k: &Intrinsics, x: f64, y: f64) -> Vector3<f64> {
        Vector3::new((x - k.cx) / k.fx, (y - k.cy) / k.fy, 1.0)
    }

    /// Triangulates a pixel pair seen from two world_from_cam poses; checks reprojection.
    fn triangulate(
        k: &Intrinsics,
        pa: &Pose,
        xa: (f32, f32),
        pb: &Pose,
        xb: (f32, f32),
        max_px: f64,
    ) -> Option<(Point3<f64>, f64)> {
        let oa = Point3::from(pa.translation.vector);
        let ob = Point3::from(pb.translation.vector);
        let da = pa.rotation * Self::bearing(k, f64::from(xa.0), f64::from(xa.1));
        let db = pb.rotation * Self::bearing(k, f64::from(xb.0), f64::from(xb.1));
        let (p, angle) = midpoint(&oa, &da, &ob, &db)?;
        for (pose, x) in [(pa, xa), (pb, xb)] {
            let pc = pose.inverse_transform_point(&p);
            let (u, v) = k.project(&pc)?;
            if (u - f64::from(x.0)).hypot(v - f64::from(x.1)) > max_px {
                return None;
            }
        }
        Some((p, angle))
    }

    fn try_initialise(&mut self, reference: u64, index: u64) -> Result<bool> {
        let k = self.k();
        let mut idx = Vec::new();
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (i, t) in self.tracks.iter().enumerate() {
            if let Some(&(f, x, y)) = t.obs.front() {
                if f == reference {
                    idx.push(i);
                    a.push((x, y));
                    b.push((t.x, t.y));
                }
            }
        }
        if a.len() < self.config.min_inliers * 2 {
            return Ok(false);
        }
        let mut disp: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(p, q)| f64::from((p.0 - q.0).hypot(p.1 - q.1)))
            .collect();
        let md = median(&mut disp).unwrap_or(0.0);
        if md < self.config.init_parallax * f64::from(k.width) {
            log::debug!("flowvo: frame {index}: median displacement {md:.1} px from {reference}, waiting for parallax");
            return Ok(false);
        }
        let Some((cur_from_ref, inliers)) =
            cv::relative_pose(&a, &b, &k, f64::from(self.config.ransac_px))?
        else {
            return Ok(false);
        };
        let ref_pose = Pose::identity();
        let cur_pose = cur_from_ref.inverse();
        let min_angle = self.config.min_triangulation_deg.to_radians();
        let mut points = Vec::new();
        for (j, &ti) in idx.iter().enumerate() {
            if !inliers[j] {
                continue;
            }
            if let Some((p, ang)) = Self::triangulate(
                &k,
                &ref_pose,
                a[j],
                &cur_pose,
                b[j],
                2.0 * f64::from(self.config.ransac_px),
            ) {
                if ang >= min_angle * self.config.init_point_angle_fraction {
                    points.push((ti, p, ang));
                }
            }
        }
        let n_inl = inliers.iter().filter(|&&b| b).count();
        let mut angles: Vec<f64> = points.iter().map(|(_, _, a)| *a).collect();
        let median_angle = median(&mut angles).unwrap_or(0.0);
        let (bearings_a, bearings_b): (Vec<_>, Vec<_>) = a
            .iter()
            .zip(&b)
            .zip(&inliers)
            .filter(|(_, &inl)| inl)
            .map(|((p, q), _)| {
                (
                    Self::bearing(&k, f64::from(p.0), f64::from(p.1)),
                    Self::bearing(&k, f64::from(q.0), f64::from(q.1)),
                )
            })
            .unzip();
        let (parallax, turn) = parallax_beyond_rotation(&bearings_a, &bearings_b);
        log::debug!(
            "flowvo init try at {index}: {} tracks from {reference}, median disp {md:.1} px, {n_inl} E inliers, {} triangulated, median ray angle {:.2} deg, parallax beyond rotation {:.3} deg, turn {:.2} deg",
            idx.len(),
            points.len(),
            median_angle.to_degrees(),
            parallax.to_degrees(),
            turn.to_degrees()
        );
        if median_angle < self.config.init_min_angle_deg.to_radians()
            || parallax < self.config.init_parallax_per_turn * turn
        {
            return Ok(false);
        }
        if points.len() < self.config.min_inliers * 2
            || points.len() * 2 < n_inl
            || (n_inl as f64) < self.config.init_inlier_fraction * idx.len() as f64
        {
            return Ok(false);
        }
        let mut depths: Vec<f64> = points.iter().map(|(_, p, _)| p.z).collect();
        let md = median(&mut depths).unwrap_or(1.0).max(1e-9);
        let s = self.median_depth / md;
        let origin = self.segment_origin;
        let scale_pose = |p: &Pose| Pose::from_parts((p.translation.vector * s).into(), p.rotation);
        for (ti, p, ang) in points {
            self.tracks[ti].point = Some(origin * Point3::from(p.coords * s));
            self.tracks[ti].angle = ang;
        }
        self.poses.insert(reference, origin);
        self.poses.insert(index, origin * scale_pose(&cur_pose));
        log::info!(
            "flowvo: map segment {} initialised at frame {index} (reference {reference})",
            self.segment
        );
        Ok(true)
    }

    /// Pose of frame `f` by PnP against mapped tracks' observations at `f`.
    fn pose_by_pnp(&self, f: u64, guess: Option<&Pose>) -> Result<Option<(Pose, Vec<f64>, usize)>> {
        let k = self.k();
        let mut world = Vec::new();
        let mut px = Vec::new();
        let mut which = Vec::new();
        for (i, t) in self.tracks.iter().enumerate() {
            let Some(p) = t.point else { continue };
            let obs = if f == self.last_index.unwrap_or(u64::MAX) {
                Some((t.x, t.y))
            } else {
                t.obs.iter().find(|o| o.0 == f).map(|o| (o.1, o.2))
            };
            if let Some(o) = obs {
                world.push(p);
                px.push(o);
                which.push(i);
            }
        }
        let guess_cfw = guess.map(Pose::inverse);
        let Some((cam_from_world, inl)) =
            cv::pnp_ransac(&world, &px, &k, guess_cfw.as_ref(), self.config.ransac_px)?
        else {
            return Ok(None);
        };
        if inl.len() < self.config.min_inliers {
            return Ok(None);
        }
        let errs: Vec<f64> = inl
            .iter()
            .filter_map(|&j| {
                let pc = cam_from_world * world[j];
                k.project(&pc)
                    .map(|(u, v)| (u - f64::from(px[j].0)).hypot(v - f64::from(px[j].1)))
            })
            .collect();
        Ok(Some((cam_from_world.inverse(), errs, inl.len())))
    }

    fn triangulate_new_tracks(&mut self, index: u64) {
        let k = self.k();
        let Some(cur) = self.poses.get(&index).copied() else {
            return;
        };
        let min_angle = self.config.min_triangulation_deg.to_radians();
        let max_px = 2.0 * f64::from(self.config.ransac_px);
        for t in &mut self.tracks {
            // The oldest observation with a known pose gives the widest baseline; a mapped point is
            // re-triangulated once that baseline gives a clearly wider angle than it had.
            let Some(&(f, x, y)) = t.obs.iter().find(|o| self.poses.contains_key(&o.0)) else {
                continue;
            };
            if f == index {
                continue;
            }
            let pf = self.poses[&f];
            if let Some((p, ang)) = Self::triangulate(&k, &pf, (x, y), &cur, (t.x, t.y), max_px) {
                if ang >= min_angle && ang > t.angle * 1.25 {
                    t.point = Some(p);
                    t.angle = ang;
                }
            }
        }
    }

    /// Dense depth of the current frame by triangulating each pixel against the chain's keyframe.
    fn dense_depth(&self, index: u64, chain: &Chain) -> Option<(Vec<f32>, Vec<f32>)> {
        let k = self.k();
        let cur = *self.poses.get(&index)?;
        let key = *self.poses.get(&chain.key)?;
        if chain.key == index {
            return None;
        }
        let (w, h) = (k.width as usize, k.height as usize);
        let mut depth = vec![0.0f32; w * h];
        let mut conf = vec![0.0f32; w * h];
        let row = DepthRow::new(&k, &cur, &key, self.config.depth_angle_deg);
        depth
            .par_chunks_mut(w)
            .zip(conf.par_chunks_mut(w))
            .zip(chain.data.par_chunks(3 * w))
            .enumerate()
            .for_each(|(y, ((depth, conf), chain))| {
                vectorized(DepthRowAt {
                    row: &row,
                    y,
                    chain,
                    depth,
                    conf,
                });
            });
        Some((depth, conf))
    }

    fn lose_tracking(&mut self, frame: &Frame) {
        let last = self
            .poses
            .values()
            .next_back()
            .copied()
            .unwrap_or(self.segment_origin);
        self.segment += 1;
        self.segment_origin = last;
        log::warn!(
            "flowvo: tracking lost at frame {}; starting map segment {}",
            frame.index,
            self.segment
        );
        self.start_segment(frame);
    }

    fn start_segment(&mut self, frame: &Frame) {
        self.novelty.reset();
        self.tracks.clear();
        self.recent_steps.clear();
        self.poses.clear();
        self.novelty_weights.clear();
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        self.chain_old = Some(Chain::new(frame.index, w, h));
        self.chain_new = None;
        self.phase = Phase::Initializing {
            reference: frame.index,
            pending: vec![Pending {
                index: frame.index,
                timestamp: frame.timestamp,
            }],
        };
        self.spawn_tracks(frame);
    }

    fn geometry(
        &self,
        index: u64,
        timestamp: f64,
        pose: Pose,
        stats: GeometryStats,
        depth: Option<(Vec<f32>, Vec<f32>)>,
    ) -> FrameGeometry {
        let (depth, confidence) = depth.map_or((None, None), |(d, c)| (Some(d), Some(c)));
        FrameGeometry {
            index,
            timestamp,
            world_from_cam: pose,
            intrinsics: self.k(),
            depth,
            confidence,
            stats,
            memory: None,
        }
    }

    fn prune_poses(&mut self) {
        let oldest_needed = self
            .tracks
            .iter()
            .filter_map(|t| t.obs.front().map(|o| o.0))
            .chain(self.chain_old.as_ref().map(|c| c.key))
            .chain(self.chain_new.as_ref().map(|c| c.key))
            .min();
        if let Some(m) = oldest_needed {
            let last = self.last_index.unwrap_or(0);
            self.poses.retain(|&f, _| f >= m || f + 2 >= last);
            let poses = &self.poses;
            self.novelty_weights.retain(|f, _| poses.contains_key(f));
        }
    }

    fn track_frame(&mut self, frame: &Frame) -> Result<Vec<FrameGeometry>> {
        let index = frame.index;
        let guess = self.poses.values().next_back().copied();
        let mut result = self.pose_by_pnp(index, guess.as_ref())?;
        if let (Some((pose, _, _)), Some(prev)) = (&result, &guess) {
            let step = (pose.translation.vector - prev.translation.vector).norm();
            if !self.plausible_step(step) {
                log::debug!(
                    "flowvo: implausible step {step:.4} at {index}; retrying PnP without a guess"
                );
                result = self.pose_by_pnp(index, None)?.filter(|(p, _, _)| {
                    self.plausible_step((p.translation.vector - prev.translation.vector).norm())
                });
            }
        }
        let Some((pose, mut errs, n)) = result else {
            log::debug!(
                "flowvo: PnP failed at {index} with {} tracks, {} mapped",
                self.tracks.len(),
                self.tracks.iter().filter(|t| t.point.is_some()).count()
            );
            self.lose_tracking(frame);
            return Ok(Vec::new());
        };
        if let Some(prev) = guess {
            self.recent_steps
                .push_back((pose.translation.vector - prev.translation.vector).norm());
            if self.recent_steps.len() > RECENT_STEPS {
                self.recent_steps.pop_front();
            }
        }
        self.poses.insert(index, pose);
        log::debug!(
            "flowvo: frame {index}: PnP {n} inliers of {} mapped, {} tracks",
            self.tracks.iter().filter(|t| t.point.is_some()).count(),
            self.tracks.len()
        );
        self.triangulate_new_tracks(index);
        let k = self.k();
        let mapped_now = self.tracks.iter().filter(|t| t.mapped_at_keyframe).count();
        let lost_fraction = 1.0 - mapped_now as f64 / self.keyframe_base.max(1) as f64;
        let disp = self
            .chain_new
            .as_ref()
            .map_or(f64::INFINITY, Chain::median_displacement);
        let parallax_limit = self.config.keyframe_parallax * f64::from(k.width);
        let mut is_keyframe =
            disp > parallax_limit || lost_fraction > 1.0 - self.config.keyframe_tracked_fraction;
        if let Some(a) = self.config.adaptive {
            let (n, thumb) =
                self.novelty
                    .weigh(&frame.image, Some(&pose), disp.is_finite().then_some(disp))?;
            self.novelty.observe_pose(&pose);
            self.novelty_weights.insert(index, n.weight);
            let forced = n.weight >= a.force && disp > 0.5 * parallax_limit;
            is_keyframe = (is_keyframe && n.weight >= a.admit) || forced;
            if is_keyframe {
                self.novelty.admit(Some(&pose), thumb, n.hf_ratio);
            }
        }
        let pose = if is_keyframe {
            self.bundle_adjust(index).unwrap_or(pose)
        } else {
            pose
        };
        let t_depth = std::time::Instant::now();
        let depth = self
            .chain_old
            .as_ref()
            .and_then(|c| self.dense_depth(index, c));
        log::debug!(
            "flowvo: frame {index}: dense depth {:.1} ms",
            t_depth.elapsed().as_secs_f64() * 1e3
        );
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        let cell = self.grid_cell(w);
        let cells = w.div_ceil(cell) * h.div_ceil(cell);
        if !is_keyframe
            && (self.tracks.len() as f64) < self.config.min_track_coverage * cells as f64
        {
            self.spawn_tracks(frame);
        }
        if is_keyframe {
            self.spawn_tracks(frame);
            if let Some(newer) = self.chain_new.take() {
                self.chain_old = Some(newer);
            }
            self.chain_new = Some(Chain::new(index, w, h));
            self.mark_keyframe_tracks();
        }
        self.prune_poses();
        let stats = GeometryStats {
            tracked: true,
            keyframe: is_keyframe,
            segment: self.segment,
            tracked_points: n,
            reprojection_median_px: median(&mut errs),
            ..GeometryStats::default()
        };
        Ok(vec![self.geometry(
            index,
            frame.timestamp,
            pose,
            stats,
            depth,
        )])
    }
}

impl FlowVo {
    /// Windowed bundle adjustment ending at keyframe `index` (see [`WindowBaConfig`]); updates the
    /// window's poses and points and returns the keyframe's refined pose, `None` when off or
    /// when the solver did not improve the window.
    fn bundle_adjust(&mut self, index: u64) -> Option<Pose> {
        let cfg = self.config.window_ba?;
        let frames: Vec<u64> = self
            .poses
            .keys()
            .rev()
            .step_by(cfg.stride.max(1))
            .take(cfg.frames)
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if frames.len() < 3 || frames.last() != Some(&index) {
            return None;
        }
        let slot: HashMap<u64, usize> = frames.iter().enumerate().map(|(i, &f)| (f, i)).collect();
        let mapped: Vec<usize> = self
            .tracks
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                t.point.is_some() && t.obs.iter().filter(|o| slot.contains_key(&o.0)).count() >= 2
            })
            .map(|(i, _)| i)
            .collect();
        let step = mapped.len().div_ceil(cfg.max_points.max(1)).max(1);
        let chosen: Vec<usize> = mapped.into_iter().step_by(step).collect();
        let weight = |f: u64| {
            self.novelty_weights
                .get(&f)
                .map_or(1.0, |w| 0.25 + 0.75 * w.clamp(0.0, 1.0))
        };
        let mut window = Window {
            cam_from_world: frames.iter().map(|f| self.poses[f].inverse()).collect(),
            // The keyframe itself always moves.
            fixed: (0..frames.len())
                .map(|i| i < cfg.fixed_frames.max(2).min(frames.len() - 1))
                .collect(),
            weight: frames.iter().map(|&f| weight(f)).collect(),
            points: Vec::with_capacity(chosen.len()),
            observations: Vec::new(),
        };
        for (j, &ti) in chosen.iter().enumerate() {
            let t = &self.tracks[ti];
            window.points.push(t.point?);
            for &(f, x, y) in &t.obs {
                if let Some(&i) = slot.get(&f) {
                    window.observations.push(Observation {
                        frame: i,
                        point: j,
                        x: f64::from(x),
                        y: f64::from(y),
                    });
                }
            }
        }
        let k = self.k();
        let refined = window_ba::refine(&k, &mut window, cfg.huber_px, cfg.iterations)?;
        log::debug!(
            "flowvo: bundle adjustment at {index}: {} frames, {} points, median {:.3} -> {:.3} px",
            frames.len(),
            chosen.len(),
            refined.median_px_before,
            refined.median_px_after
        );
        // Each window frame's correction (new · old⁻¹, world side); frames between two window
        // frames get the correction interpolated, so the recent path stays one consistent piece.
        let corrections: Vec<Pose> = frames
            .iter()
            .enumerate()
            .map(|(i, f)| window.cam_from_world[i].inverse() * self.poses[f].inverse())
            .collect();
        for pair in 0..frames.len() - 1 {
            let (f0, f1) = (frames[pair], frames[pair + 1]);
            let between: Vec<u64> = self.poses.range(f0 + 1..=f1).map(|(&f, _)| f).collect();
            for f in between {
                let t = (f - f0) as f64 / (f1 - f0) as f64;
                let c = corrections[pair].lerp_slerp(&corrections[pair + 1], t);
                let old = self.poses[&f];
                self.poses.insert(f, c * old);
            }
        }
        for (j, &ti) in chosen.iter().enumerate() {
            self.tracks[ti].point = Some(window.points[j]);
        }
        self.poses.get(&index).copied()
    }

    fn plausible_step(&self, step: f64) -> bool {
        if self.recent_steps.len() < 3 {
            return true;
        }
        let mut v: Vec<f64> = self.recent_steps.iter().copied().collect();
        let med = median(&mut v).unwrap_or(0.0);
        // Noise floor: 1 % of the scene's median depth.
        step <= MAX_STEP_RATIO * med + 0.01 * self.median_depth
    }

    fn mark_keyframe_tracks(&mut self) {
        for t in &mut self.tracks {
            t.mapped_at_keyframe = t.point.is_some();
        }
        self.keyframe_base = self.tracks.iter().filter(|t| t.point.is_some()).count();
    }

    /// Emits the frames held back during initialisation, with the segment origin as pose.
    fn release_untracked(&self, pending: Vec<Pending>) -> Vec<FrameGeometry> {
        let stats = GeometryStats {
            tracked: false,
            segment: self.segment,
            ..GeometryStats::default()
        };
        pending
            .into_iter()
            .map(|p| self.geometry(p.index, p.timestamp, self.segment_origin, stats, None))
            .collect()
    }

    /// After a successful initialisation: poses for the held-back frames, depth for the last.
    fn release_initialised(
        &mut self,
        pending: &[Pending],
        frame: &Frame,
    ) -> Result<Vec<FrameGeometry>> {
        let mut out = Vec::with_capacity(pending.len());
        let mut last_pose = self.segment_origin;
        for p in pending {
            let (pose, stats) = if let Some(pose) = self.poses.get(&p.index).copied() {
                (
                    pose,
                    GeometryStats {
                        tracked: true,
                        keyframe: true,
                        segment: self.segment,
                        ..GeometryStats::default()
                    },
                )
            } else if let Some((pose, mut errs, n)) = self.pose_by_pnp(p.index, Some(&last_pose))? {
                self.poses.insert(p.index, pose);
                let stats = GeometryStats {
                    tracked: true,
                    keyframe: false,
                    segment: self.segment,
                    tracked_points: n,
                    reprojection_median_px: median(&mut errs),
                    ..GeometryStats::default()
                };
                (pose, stats)
            } else {
                (
                    last_pose,
                    GeometryStats {
                        tracked: false,
                        segment: self.segment,
                        ..GeometryStats::default()
                    },
                )
            };
            last_pose = pose;
            out.push((p.index, p.timestamp, pose, stats));
        }
        self.triangulate_new_tracks(frame.index);
        let depth = self
            .chain_old
            .as_ref()
            .and_then(|c| self.dense_depth(frame.index, c));
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        self.chain_new = Some(Chain::new(frame.index, w, h));
        self.spawn_tracks(frame);
        self.mark_keyframe_tracks();
        let n = out.len();
        let mut depth = Some(depth);
        Ok(out
            .into_iter()
            .enumerate()
            .map(|(i, (idx, ts, pose, stats))| {
                let d = if i + 1 == n {
                    depth.take().flatten()
                } else {
                    None
                };
                self.geometry(idx, ts, pose, stats, d)
            })
            .collect())
    }
}

/// What a flowvo snapshot keeps: enough to continue as a new map segment at the last pose with
/// the same scale (the tracks and map are not kept: a resumed stream has a gap anyway).
#[derive(Serialize, Deserialize)]
struct FlowVoState {
    next_source_index: u64,
    segment: u32,
    median_depth: f64,
    /// world_from_cam of the last posed frame: tx ty tz qx qy qz qw.
    last_pose: [f64; 7],
}

impl GeometryEngine for FlowVo {
    fn name(&self) -> &'static str {
        "flowvo"
    }

    fn snapshot(&self, path: &std::path::Path, next_source_index: u64) -> Result<bool> {
        let last = self
            .poses
            .values()
            .next_back()
            .copied()
            .unwrap_or(self.segment_origin);
        let (t, q) = (last.translation.vector, last.rotation.coords);
        let state = FlowVoState {
            next_source_index,
            segment: self.segment,
            median_depth: self.median_depth,
            last_pose: [t.x, t.y, t.z, q.x, q.y, q.z, q.w],
        };
        let owner = serde_json::to_value(&state).map_err(|e| Error::Geometry(e.to_string()))?;
        super::write_snapshot_meta(
            path,
            &serde_json::json!({ "engine": "flowvo", "owner": owner }),
        )?;
        Ok(true)
    }

    fn restore(&mut self, path: &std::path::Path) -> Result<u64> {
        let meta = super::read_snapshot_meta(path)?;
        if meta["engine"] != "flowvo" {
            return Err(Error::format(path, "not a flowvo snapshot"));
        }
        let s: FlowVoState = serde_json::from_value(meta["owner"].clone())
            .map_err(|e| Error::format(path, format!("flowvo snapshot: {e}")))?;
        let [x, y, z, qx, qy, qz, qw] = s.last_pose;
        if !(s.last_pose.iter().all(|v| v.is_finite()) && s.median_depth > 0.0) {
            return Err(Error::format(
                path,
                "flowvo snapshot with a non-finite pose",
            ));
        }
        // The next frame starts a new segment where the last one ended, at the same scale.
        self.segment_origin = Pose::from_parts(
            nalgebra::Translation3::new(x, y, z),
            nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(qw, qx, qy, qz)),
        );
        self.segment = s.segment + 1;
        self.median_depth = s.median_depth;
        self.started = false;
        log::info!(
            "flowvo: resuming as map segment {} at frame {}",
            self.segment,
            s.next_source_index
        );
        Ok(s.next_source_index)
    }

    fn push(&mut self, frame: &Frame, flow: Option<&PairFlow>) -> Result<Vec<FrameGeometry>> {
        let (w, h) = (frame.width(), frame.height());
        let k = *self.intrinsics.get_or_insert_with(|| {
            frame.intrinsics.unwrap_or_else(|| {
                Intrinsics::from_hfov(w, h, streamrecon_core::frame::DEFAULT_HFOV_DEG)
            })
        });
        if (k.width, k.height) != (w, h) {
            return Err(Error::Geometry(format!(
                "frame {} is {w}x{h}, the stream started at {}x{}",
                frame.index, k.width, k.height
            )));
        }
        if !self.started {
            self.started = true;
            self.last_index = Some(frame.index);
            self.start_segment(frame);
            return Ok(Vec::new());
        }
        let connected = flow.filter(|f| f.to == frame.index && Some(f.from) == self.last_index);
        self.last_index = Some(frame.index);
        let Some(flow) = connected else {
            // No flow links this frame to the last one: nothing to track with.
            let mut out = Vec::new();
            if let Phase::Initializing { pending, .. } =
                std::mem::replace(&mut self.phase, Phase::Tracking)
            {
                out = self.release_untracked(pending);
            }
            self.lose_tracking(frame);
            return Ok(out);
        };
        let t_start = std::time::Instant::now();
        let before = self.tracks.len();
        self.advance_tracks(flow, frame.index);
        log::debug!(
            "flowvo: frame {}: {} of {before} tracks survive",
            frame.index,
            self.tracks.len()
        );
        let mut chains: Vec<&mut Chain> = [self.chain_old.as_mut(), self.chain_new.as_mut()]
            .into_iter()
            .flatten()
            .collect();
        Chain::advance_all(&mut chains, &flow.bwd, &flow.bwd_conf);
        log::debug!(
            "flowvo: frame {}: tracks + chains {:.1} ms",
            frame.index,
            t_start.elapsed().as_secs_f64() * 1e3
        );
        match std::mem::replace(&mut self.phase, Phase::Tracking) {
            Phase::Initializing {
                reference,
                mut pending,
            } => {
                pending.push(Pending {
                    index: frame.index,
                    timestamp: frame.timestamp,
                });
                if self.try_initialise(reference, frame.index)? {
                    return self.release_initialised(&pending, frame);
                }
                if pending.len() > self.config.max_init_frames {
                    pending.pop();
                    let out = self.release_untracked(pending);
                    log::warn!(
                        "flowvo: no initialisation within {} frames; restarting at frame {}",
                        self.config.max_init_frames,
                        frame.index
                    );
                    self.start_segment(frame);
                    return Ok(out);
                }
                self.phase = Phase::Initializing { reference, pending };
                Ok(Vec::new())
            }
            Phase::Tracking => self.track_frame(frame),
        }
    }

    fn flush(&mut self) -> Result<Vec<FrameGeometry>> {
        match std::mem::replace(&mut self.phase, Phase::Tracking) {
            Phase::Initializing { pending, .. } => Ok(self.release_untracked(pending)),
            Phase::Tracking => Ok(Vec::new()),
        }
    }

    fn segments(&self) -> u32 {
        self.segment + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triangulate::midpoint_cos;
    use nalgebra::{Translation3, UnitQuaternion};

    #[test]
    fn dense_depth_row_matches_the_midpoint_triangulation() {
        // Two cameras a baseline apart and slightly turned; a chain whose offsets put some pixels
        // behind a camera, some with parallel rays and some with low confidence.
        let k = Intrinsics::from_hfov(64, 8, 60.0);
        let cur = Pose::from_parts(
            Translation3::new(0.3, -0.1, 0.05),
            UnitQuaternion::from_euler_angles(0.02, -0.05, 0.01),
        );
        let key = Pose::identity();
        let row = DepthRow::new(&k, &cur, &key, 2.0);
        let k_inv = k.matrix().try_inverse().expect("invertible");
        let ray = |p: &Pose| p.rotation.to_rotation_matrix().into_inner() * k_inv;
        let axis = cur.rotation * Vector3::z();
        let w = k.width as usize;
        let y = 5;
        let chain: Vec<f32> = (0..w)
            .flat_map(|x| {
                let t = x as f32;
                [
                    8.0 * (0.3 * t).sin() - 3.0,
                    0.5 * (0.2 * t).cos(),
                    (t * 0.037) % 1.0,
                ]
            })
            .collect();
        let (mut depth, mut conf) = (vec![f32::NAN; w], vec![f32::NAN; w]);
        vectorized(DepthRowAt {
            row: &row,
            y,
            chain: &chain,
            depth: &mut depth,
            conf: &mut conf,
        });
        let (mut found, mut rejected) = (0, 0);
        for x in 0..w {
            let (u, v, c) = (chain[3 * x], chain[3 * x + 1], chain[3 * x + 2]);
            let d1 = ray(&cur) * Vector3::new(x as f64, y as f64, 1.0);
            let d2 =
                ray(&key) * Vector3::new(x as f64 + f64::from(u), y as f64 + f64::from(v), 1.0);
            let (o1, o2) = (
                Point3::from(cur.translation.vector),
                Point3::from(key.translation.vector),
            );
            let expected = midpoint_cos(&o1, &d1, &o2, &d2)
                .map(|(p, cos)| (axis.dot(&(p - o1)), cos))
                .filter(|&(z, _)| c > 0.05 && z > 0.0);
            if let Some((z, cos)) = expected {
                found += 1;
                assert!(
                    (f64::from(depth[x]) - z).abs() <= 1e-5 * z,
                    "depth at {x}: {} vs {z}",
                    depth[x]
                );
                let a2 = 2.0 * (1.0 - cos);
                let want = f64::from(c) * a2 / (a2 + row.theta0_sq);
                assert!(
                    (f64::from(conf[x]) - want).abs() <= 1e-6,
                    "confidence at {x}"
                );
            } else {
                rejected += 1;
                assert_eq!((depth[x], conf[x]), (0.0, 0.0), "rejected pixel {x}");
            }
        }
        assert!(
            found > 10 && rejected > 5,
            "{found} found, {rejected} rejected"
        );
    }

    #[test]
    fn chains_advance_by_bilinear_composition_and_zero_outside() {
        // 23 × 17: rows of several vector blocks and a remainder; targets leave the image on
        // every side, and one flow value is NaN.
        let (w, h) = (23usize, 17usize);
        let mut bwd = FlowField::zeros(w, h);
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32, y as f32);
                bwd.set(
                    x,
                    y,
                    3.0 * (0.4 * xf + 0.2 * yf).sin(),
                    2.5 * (0.3 * xf - 0.5 * yf).cos(),
                );
            }
        }
        bwd.set(7, 4, f32::NAN, 0.0);
        let conf: Vec<f32> = (0..w * h).map(|i| (i % 11) as f32 / 10.0).collect();
        let mut chains = [Chain::new(3, w, h), Chain::new(5, w, h)];
        for (k, c) in chains.iter_mut().enumerate() {
            for (i, v) in c.data.iter_mut().enumerate() {
                *v = ((i * (7 + k)) % 13) as f32 * 0.37 - 2.0;
            }
        }
        let olds: Vec<Vec<f32>> = chains.iter().map(|c| c.data.clone()).collect();
        let [a, b] = &mut chains;
        Chain::advance_all(&mut [a, b], &bwd, &conf);
        for (c, old) in chains.iter().zip(&olds) {
            for y in 0..h {
                for x in 0..w {
                    let (bu, bv) = bwd.get(x, y);
                    let (tx, ty) = (x as f32 + bu, y as f32 + bv);
                    let inside =
                        tx >= 0.0 && ty >= 0.0 && tx <= (w - 1) as f32 && ty <= (h - 1) as f32;
                    let want = if inside {
                        let (x0, y0) = (
                            tx.floor().min((w - 2) as f32),
                            ty.floor().min((h - 2) as f32),
                        );
                        let (fx, fy) = (tx - x0, ty - y0);
                        let at = |xx: f32, yy: f32, k: usize| {
                            old[3 * (yy as usize * w + xx as usize) + k]
                        };
                        let s: Vec<f32> = (0..3)
                            .map(|k| {
                                let t = at(x0, y0, k) + (at(x0 + 1.0, y0, k) - at(x0, y0, k)) * fx;
                                let b = at(x0, y0 + 1.0, k)
                                    + (at(x0 + 1.0, y0 + 1.0, k) - at(x0, y0 + 1.0, k)) * fx;
                                t + (b - t) * fy
                            })
                            .collect();
                        [bu + s[0], bv + s[1], conf[y * w + x] * s[2]]
                    } else {
                        [0.0; 3]
                    };
                    let i = 3 * (y * w + x);
                    let got = [c.data[i], c.data[i + 1], c.data[i + 2]];
                    assert_eq!(
                        got.map(f32::to_bits),
                        want.map(f32::to_bits),
                        "at {x},{y}: {got:?} vs {want:?}"
                    );
                }
            }
        }
        // A frame one pixel wide has no cell to sample: everything is outside.
        let mut thin = Chain::new(0, 1, 4);
        for _ in 0..2 {
            Chain::advance_all(&mut [&mut thin], &FlowField::zeros(1, 4), &[1.0; 4]);
            assert!(thin.data.iter().all(|v| *v == 0.0), "{:?}", thin.data);
        }
    }
}
