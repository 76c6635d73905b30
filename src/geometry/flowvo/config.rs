//! flowvo's parameters.

use serde::{Deserialize, Serialize};

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
    /// New points let in by their frame pair's baseline over the mapped points' median depth
    /// reaching `min_triangulation_deg` (and their own ray angle half of it), instead of by their
    /// own ray angle alone. A threshold on a point's own noisy angle lets in the points whose
    /// noise widened it, so near depths, and the map's scale shrinks. Off by default: on the
    /// realistic world (`benches/flowvo_seeds.rs --variants=default,baseline`) it brought all 12
    /// smooth sequences within 1 % of the path (default: 11) but three hand-held ones further out
    /// (9: 2.54 → 6.27 %, 10: 1.04 → 2.57–2.78 %, 11: 1.11 → 1.58 %), measured with points
    /// from two views (before `triangulate_all_views`).
    #[serde(default)]
    pub new_points_by_baseline: bool,
    /// A point's position from every observation of its track with a pose (the point nearest
    /// to all their rays), not from its oldest and newest alone; which points enter the map,
    /// and when, is still decided on those two. Chained flow drifts, and a threshold on the
    /// two-view angle lets in the points whose drift widened it, so near ones: under motion
    /// blur (flow errors of 0.2–1.1 px a frame against the exposure's mid-point) batches of new
    /// points came in at 0.56–0.82 of the map's scale in fast turns, and the map shrank. On
    /// the realistic world (`benches/flowvo_seeds.rs --variants=default,twoview`, 24
    /// sequences) 24 are within 1 % of the path (two views: 19), the worst 0.90 % (5.17 %);
    /// hand-held 3, 9, 10 and 11 went from 5.17, 2.54, 1.04 and 1.11 % to 0.88, 0.42, 0.59 and
    /// 0.88 %, while the smooth ones moved both ways (means 0.34 and 0.35 %).
    #[serde(default = "default_true")]
    pub triangulate_all_views: bool,
    /// Rolling shutter: the rows are read top to bottom over this fraction of the frame
    /// interval, the middle row at the frame's time (0 = a global shutter). Each track's
    /// observation is moved to where the point was at the frame's time, along its flow.
    #[serde(default)]
    pub rolling_shutter: f64,
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

fn default_true() -> bool {
    true
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
            new_points_by_baseline: false,
            triangulate_all_views: true,
            rolling_shutter: 0.0,
        }
    }
}
