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
//!   parallax suffices, each from every observation of it with a pose (the point nearest to all
//!   their rays; the two-view angle decides only when). Too few inliers = tracking lost: a new
//!   map segment starts at the last pose (scale matched to the previous segment's median depth)
//!   and is reported.
//! - Keyframes by parallax and tracked fraction; two dense flow chains map each new frame's pixels
//!   back to the last two keyframes, and per-pixel triangulation against the older one gives depth,
//!   with confidence from the parallax angle and the chained flow confidence.
//!
//! - Relocalisation (with loop closure's place database, [`GeometryEngine::relocalise_with`]):
//!   after tracking loss, each frame is first looked up among the keyframes; one that matches
//!   an earlier map is placed in it by PnP, the points it matched become its mapped tracks, and
//!   tracking goes on in that map's world and scale (the new segment counts as part of it).
//!   While tracking, the keyframes lend their points when the mapped ones run low (a young
//!   relocalised map in a turn), and overrule weak tracking that they place elsewhere (a jump
//!   tracked onto look-alike structure).
//!
//! Scale is that of the first segment's initialisation, normalised to a median depth of 1.

use std::collections::{BTreeMap, VecDeque};

use nalgebra::{Matrix3, Point3, Vector3};
use rayon::prelude::*;

use super::cv;
use super::loop_closure::{Relocalised, Relocaliser};
use super::novelty::{NoveltyConfig, NoveltyMeter};
use super::triangulate::{midpoint, nearest_to_rays};
use super::window_ba;
use super::{untracked, FrameGeometry, GeometryEngine, GeometryStats};
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{Frame, Intrinsics, Pose};
use streamrecon_core::simd::vectorized;
use streamrecon_flow::PairFlow;

mod chain;
mod config;
mod dense;
mod mapping;
mod snapshot;
#[cfg(test)]
mod tests;

use chain::Chain;
pub use config::{AdaptiveKeyframes, FlowVoConfig, WindowBaConfig};
use dense::{grey_and_gradient, DepthRow, DepthRowAt};

/// Median angle (radians) between the bearings `b` and the best pure rotation of the bearings
/// `a` (Wahba's problem, by SVD): the parallax a camera turn cannot explain; and that rotation's
/// angle. Unlike the ray angles of a triangulation it needs no essential-matrix decomposition,
/// which a pure turn leaves undetermined.
fn parallax_beyond_rotation(a: &[Vector3<f64>], b: &[Vector3<f64>]) -> (f64, f64) {
    let Some(r) = best_rotation(a, b) else {
        return (0.0, 0.0);
    };
    let mut angles: Vec<f64> = a.iter().zip(b).map(|(p, q)| (r * p).angle(q)).collect();
    let turn = nalgebra::Rotation3::from_matrix_unchecked(r).angle();
    (median(&mut angles).unwrap_or(0.0), turn)
}

/// The rotation that best maps the bearings `a` onto `b` (Wahba's problem, by SVD): `b ≈ R a`.
fn best_rotation(a: &[Vector3<f64>], b: &[Vector3<f64>]) -> Option<Matrix3<f64>> {
    let mut m = Matrix3::zeros();
    for (p, q) in a.iter().zip(b) {
        m += q.normalize() * p.normalize().transpose();
    }
    let svd = m.svd(true, true);
    let (u, v_t) = (svd.u?, svd.v_t?);
    let d = (u * v_t).determinant().signum();
    Some(u * Matrix3::from_diagonal(&Vector3::new(1.0, 1.0, d)) * v_t)
}

struct Track {
    x: f32,
    y: f32,
    point: Option<Point3<f64>>,
    /// Ray angle the point was triangulated with (radians); grows as the baseline does.
    angle: f64,
    /// Recent observations (frame, x, y), oldest first: where the point was at each frame's
    /// time (with a rolling shutter, not where the flow found it; see [`FlowVo::advance_tracks`]).
    obs: VecDeque<(u64, f32, f32)>,
    /// Mapped when the current keyframe was chosen.
    mapped_at_keyframe: bool,
}

impl Track {
    /// Where the point was at the last frame's time (its last observation).
    fn seen(&self) -> (f32, f32) {
        self.obs.back().map_or((self.x, self.y), |o| (o.1, o.2))
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
    /// After a restore, the snapshot's last frame, until the pipeline takes it.
    resume_frame: Option<Frame>,
    /// Why the last attempt to start a map failed (reported with the frames it leaves
    /// untracked).
    init_blocker: Option<&'static str>,
    /// Finds lost frames in earlier maps (with loop closure).
    relocaliser: Option<Relocaliser>,
    /// Per map segment, the earlier segment a relocalisation rejoined it to (itself if none;
    /// segments past the end are their own).
    joined: Vec<u32>,
}

/// Below this many times `min_inliers` mapped points, the place database lends its points.
const REINFORCE_BELOW: usize = 10;
/// …if it places the frame within this fraction of the scene's median depth…
const REINFORCE_AGREE: f64 = 0.05;
/// …and this many degrees of where tracking did.
const REINFORCE_AGREE_DEG: f64 = 2.0;

/// Keyframes that place a frame elsewhere than weak tracking did, with this many times its PnP
/// inliers, overrule it.
const OVERRULE_RATIO: usize = 4;

/// Steps remembered for the jump check.
const RECENT_STEPS: usize = 15;
/// A step this many times the recent median (and above the map's noise floor) is implausible.
const MAX_STEP_RATIO: f64 = 6.0;

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
            resume_frame: None,
            init_blocker: None,
            relocaliser: None,
            joined: Vec::new(),
        }
    }

    /// The map segment `s` is part of: the earliest one relocalisations rejoined it to.
    fn map_of(&self, mut s: u32) -> u32 {
        while let Some(&p) = self.joined.get(s as usize) {
            if p == s {
                break;
            }
            s = p;
        }
        s
    }

    /// After tracking loss: the frame placed in an earlier map through the place database, and
    /// tracking resumed there ([`FlowVo::resume_at`]).
    fn relocalise(&mut self, frame: &Frame) -> Result<Option<FrameGeometry>> {
        Ok(self
            .find_in_places(frame)?
            .map(|found| self.resume_at(frame, found)))
    }

    /// When the mapped points run low (a relocalised map, whose matched points leave the view
    /// before new ones can be triangulated from its short baselines; a turn), the keyframes of
    /// this place lend theirs, if they put the frame where tracking (`pose`, from `inliers`
    /// PnP inliers) did. When they put it elsewhere with many times the inliers, tracking
    /// went wrong (a jump it followed onto look-alike structure): that placement is returned.
    fn reinforce_from_places(
        &mut self,
        frame: &Frame,
        pose: &Pose,
        inliers: usize,
    ) -> Result<Option<Relocalised>> {
        if self.relocaliser.is_none() {
            return Ok(None);
        }
        let mapped = self.tracks.iter().filter(|t| t.point.is_some()).count();
        if mapped >= REINFORCE_BELOW * self.config.min_inliers {
            return Ok(None);
        }
        let Some(found) = self.find_in_places(frame)? else {
            return Ok(None);
        };
        let moved = (found.world_from_cam.translation.vector - pose.translation.vector).norm();
        let turned = found.world_from_cam.rotation.angle_to(&pose.rotation);
        if moved > REINFORCE_AGREE * self.median_depth || turned > REINFORCE_AGREE_DEG.to_radians()
        {
            log::debug!(
                "flowvo: frame {}: the keyframes place it {moved:.3} and {:.1} deg from tracking; not lending their points",
                frame.index,
                turned.to_degrees()
            );
            let overrules = found.matches.len() >= OVERRULE_RATIO * inliers;
            return Ok(overrules.then_some(found));
        }
        let index = frame.index;
        log::debug!(
            "flowvo: frame {index}: {mapped} mapped points; keyframe {} lends {}",
            found.keyframe,
            found.matches.len()
        );
        // Points of the map this segment is part of: not re-triangulated from the new views.
        self.tracks
            .extend(found.matches.iter().map(|&((x, y), p)| Track {
                x,
                y,
                point: Some(p),
                angle: f64::INFINITY,
                obs: VecDeque::from([(index, x, y)]),
                mapped_at_keyframe: false,
            }));
        Ok(None)
    }

    fn find_in_places(&mut self, frame: &Frame) -> Result<Option<Relocalised>> {
        let k = self.k();
        match self.relocaliser.as_mut() {
            Some(r) => r.relocalise(&frame.image, &k),
            None => Ok(None),
        }
    }

    /// Tracking resumed at a relocalised frame: the points it matched become its mapped tracks
    /// (in that map's world and scale), the grid fills in around them, and the frame is the new
    /// keyframe.
    fn resume_at(&mut self, frame: &Frame, found: Relocalised) -> FrameGeometry {
        let index = frame.index;
        let pose = found.world_from_cam;
        // Points of the earlier map: never re-triangulated from the new views' short baselines
        // (which let a relocalised map's scale collapse in a turn).
        let angle = f64::INFINITY;
        self.tracks = found
            .matches
            .iter()
            .map(|&((x, y), p)| Track {
                x,
                y,
                point: Some(p),
                angle,
                obs: VecDeque::from([(index, x, y)]),
                mapped_at_keyframe: true,
            })
            .collect();
        self.spawn_tracks(frame);
        self.poses.clear();
        self.poses.insert(index, pose);
        self.recent_steps.clear();
        self.novelty_weights.clear();
        self.novelty.reset();
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        self.chain_old = Some(Chain::new(index, w, h));
        self.chain_new = Some(Chain::new(index, w, h));
        self.mark_keyframe_tracks();
        let mut depths: Vec<f64> = found
            .matches
            .iter()
            .map(|(_, p)| pose.inverse_transform_point(p).z)
            .collect();
        if let Some(d) = median(&mut depths).filter(|d| *d > 0.0) {
            self.median_depth = d;
        }
        self.segment_origin = pose;
        self.phase = Phase::Tracking;
        self.init_blocker = None;
        let earlier = self.map_of(found.segment);
        if earlier != self.segment {
            let n = self.segment as usize + 1;
            if self.joined.len() < n {
                self.joined.extend(self.joined.len() as u32..n as u32);
            }
            self.joined[self.segment as usize] = earlier;
        }
        log::info!(
            "flowvo: frame {index} relocalised in map segment {earlier} (keyframe {}, {} inliers); segment {} continues it",
            found.keyframe,
            found.matches.len(),
            self.segment
        );
        let mut errs = found.reprojection_px;
        let stats = GeometryStats {
            tracked: true,
            keyframe: true,
            segment: self.segment,
            tracked_points: found.matches.len(),
            reprojection_median_px: median(&mut errs),
            rejoined: (earlier != self.segment).then_some(earlier),
            ..GeometryStats::default()
        };
        self.geometry(index, frame.timestamp, pose, stats, None)
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

    /// Moves tracks along the forward flow of the pair ending at `index`. With a rolling
    /// shutter, row y is read `rolling_shutter` · ((y + ½) / h − ½) frame intervals after the
    /// frame's time: each observation is moved back along the point's image motion over that
    /// delay (its flow this frame; a first observation by the same flow once it has one), so
    /// that geometry sees one instant per frame.
    fn advance_tracks(&mut self, flow: &PairFlow, index: u64) {
        let (w, h) = (flow.fwd.width, flow.fwd.height);
        let keep_obs = self.config.max_init_frames + 2;
        let min_conf = self.config.min_track_confidence;
        let rolling = self.config.rolling_shutter as f32;
        let rows = h as f32;
        let at_frame_time = |x: f32, y: f32, u: f32, v: f32| {
            let delay = rolling * ((y + 0.5) / rows - 0.5);
            (x - delay * u, y - delay * v)
        };
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
            if rolling != 0.0 && t.obs.len() == 1 {
                if let Some(first) = t.obs.front_mut() {
                    (first.1, first.2) = at_frame_time(t.x, t.y, u, v);
                }
            }
            t.x = nx;
            t.y = ny;
            let (sx, sy) = at_frame_time(nx, ny, u, v);
            t.obs.push_back((index, sx, sy));
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
                    b.push(t.seen());
                }
            }
        }
        if a.len() < self.config.min_inliers * 2 {
            self.init_blocker = Some(untracked::TEXTURE);
            return Ok(false);
        }
        let mut disp: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(p, q)| f64::from((p.0 - q.0).hypot(p.1 - q.1)))
            .collect();
        let md = median(&mut disp).unwrap_or(0.0);
        if md < self.config.init_parallax * f64::from(k.width) {
            self.init_blocker = Some(untracked::STATIC);
            log::debug!("flowvo: frame {index}: median displacement {md:.1} px from {reference}, waiting for parallax");
            return Ok(false);
        }
        let Some((cur_from_ref, inliers)) =
            cv::relative_pose(&a, &b, &k, f64::from(self.config.ransac_px))?
        else {
            self.init_blocker = Some(self.why_no_geometry(&k, &a, &b));
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
            self.init_blocker = Some(untracked::ROTATION);
            return Ok(false);
        }
        if points.len() < self.config.min_inliers * 2
            || points.len() * 2 < n_inl
            || (n_inl as f64) < self.config.init_inlier_fraction * idx.len() as f64
        {
            self.init_blocker = Some(self.why_no_geometry(&k, &a, &b));
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

    /// Why two views gave no usable two-view geometry: a turn explains their tracks (an
    /// essential matrix is undetermined then), or they do not fit one rigid scene. Only a
    /// report: initialisation's own checks are unchanged.
    fn why_no_geometry(&self, k: &Intrinsics, a: &[(f32, f32)], b: &[(f32, f32)]) -> &'static str {
        let bearings = |v: &[(f32, f32)]| -> Vec<Vector3<f64>> {
            v.iter()
                .map(|p| Self::bearing(k, f64::from(p.0), f64::from(p.1)))
                .collect()
        };
        let (parallax, turn) = parallax_beyond_rotation(&bearings(a), &bearings(b));
        if parallax < self.config.init_parallax_per_turn * turn {
            untracked::ROTATION
        } else {
            untracked::GEOMETRY
        }
    }

    /// Pose of frame `f` by PnP against mapped tracks' observations at `f`.
    fn pose_by_pnp(&self, f: u64, guess: Option<&Pose>) -> Result<Option<(Pose, Vec<f64>, usize)>> {
        let k = self.k();
        let mut world = Vec::new();
        let mut px = Vec::new();
        let mut which = Vec::new();
        for (i, t) in self.tracks.iter().enumerate() {
            let Some(p) = t.point else { continue };
            // The current frame's is the last.
            let obs = t.obs.iter().rev().find(|o| o.0 == f).map(|o| (o.1, o.2));
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
        // With `new_points_by_baseline`: the mapped points' median depth in this frame.
        let scene_depth = if self.config.new_points_by_baseline {
            let mut depths: Vec<f64> = self
                .tracks
                .iter()
                .filter_map(|t| t.point.map(|p| cur.inverse_transform_point(&p).z))
                .filter(|z| *z > 0.0)
                .collect();
            median(&mut depths)
        } else {
            None
        };
        let all_views = self.config.triangulate_all_views;
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
            // By baseline, a new point waits for the pair's baseline to give the minimum angle
            // at the scene's depth; its own angle then need only reach half of it.
            let least_angle = match scene_depth {
                Some(d) if t.point.is_none() => {
                    if (cur.translation.vector - pf.translation.vector).norm() / d < min_angle {
                        continue;
                    }
                    0.5 * min_angle
                }
                _ => min_angle,
            };
            if let Some((p, ang)) = Self::triangulate(&k, &pf, (x, y), &cur, t.seen(), max_px) {
                if ang >= least_angle && ang > t.angle * 1.25 {
                    let all = all_views
                        .then(|| {
                            nearest_to_rays(t.obs.iter().filter_map(|&(f, x, y)| {
                                let pose = self.poses.get(&f)?;
                                let d = Self::bearing(&k, f64::from(x), f64::from(y));
                                Some((Point3::from(pose.translation.vector), pose.rotation * d))
                            }))
                        })
                        .flatten();
                    t.point = Some(all.unwrap_or(p));
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

    /// world_from_cam of the last posed frame (the segment's origin before any).
    fn last_pose(&self) -> Pose {
        self.poses
            .values()
            .next_back()
            .copied()
            .unwrap_or(self.segment_origin)
    }

    fn lose_tracking(&mut self, frame: &Frame) {
        let last = self.last_pose();
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
        self.init_blocker = None;
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
            return Ok(self.relocalise(frame)?.into_iter().collect());
        };
        if let Some(prev) = guess {
            self.recent_steps
                .push_back((pose.translation.vector - prev.translation.vector).norm());
            if self.recent_steps.len() > RECENT_STEPS {
                self.recent_steps.pop_front();
            }
        }
        if let Some(found) = self.reinforce_from_places(frame, &pose, n)? {
            log::info!(
                "flowvo: frame {index}: {n} PnP inliers, and the keyframes place it elsewhere with {}",
                found.matches.len()
            );
            self.lose_tracking(frame);
            return Ok(vec![self.resume_at(frame, found)]);
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

impl GeometryEngine for FlowVo {
    fn name(&self) -> &'static str {
        "flowvo"
    }

    fn snapshot(
        &self,
        path: &std::path::Path,
        next_source_index: u64,
        last_frame: Option<&Frame>,
    ) -> Result<bool> {
        self.write_snapshot(path, next_source_index, last_frame)?;
        Ok(true)
    }

    fn restore(&mut self, path: &std::path::Path) -> Result<u64> {
        self.restore_snapshot(path)
    }

    fn take_resume_frame(&mut self) -> Option<Frame> {
        self.resume_frame.take()
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
            if let Phase::Initializing { pending, reference } =
                std::mem::replace(&mut self.phase, Phase::Tracking)
            {
                out = self.release_untracked(pending, untracked::GAP, reference);
            }
            self.lose_tracking(frame);
            out.extend(self.relocalise(frame)?);
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
                // An earlier map is better than a new one: its world and scale go on.
                if let Some(found) = self.find_in_places(frame)? {
                    pending.pop();
                    let why = self.init_blocker.unwrap_or(untracked::LOST);
                    let mut out = self.release_untracked(pending, why, reference);
                    out.push(self.resume_at(frame, found));
                    return Ok(out);
                }
                if self.try_initialise(reference, frame.index)? {
                    return self.release_initialised(&pending, frame);
                }
                if pending.len() > self.config.max_init_frames {
                    pending.pop();
                    let why = self.init_blocker.unwrap_or(untracked::STATIC);
                    let out = self.release_untracked(pending, why, reference);
                    // A camera that only turned starts its next segment turned as far.
                    if why == untracked::ROTATION {
                        if let Some(p) = self.turned_pose(reference, frame.index) {
                            self.segment_origin = p;
                        }
                    }
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
            Phase::Initializing { pending, reference } => {
                let why = self.init_blocker.unwrap_or(untracked::ENDED);
                Ok(self.release_untracked(pending, why, reference))
            }
            Phase::Tracking => Ok(Vec::new()),
        }
    }

    fn segments(&self) -> u32 {
        (0..=self.segment).filter(|&s| self.map_of(s) == s).count() as u32
    }

    fn relocalise_with(&mut self, relocaliser: Relocaliser) {
        self.relocaliser = Some(relocaliser);
    }
}
