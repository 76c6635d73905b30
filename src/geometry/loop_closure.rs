//! Loop closure over any geometry engine's output: places recognised among keyframes, verified
//! geometrically, and a Sim(3) pose graph that spreads the correction over the trajectory.
//!
//! Every `keyframe_every`-th placed frame becomes a keyframe: a 32×24 grey thumbnail (zero mean,
//! unit norm: the place descriptor), ORB features (OpenCV) and, where the engine gave depth, each
//! feature's 3D point in the camera. A new keyframe is compared with the keyframes at least
//! `min_separation` frames older: the `candidates` most similar thumbnails are matched by ORB
//! descriptors (ratio test), and PnP + RANSAC of the old keyframe's points against the new
//! keyframe's features must keep `min_inliers`. The depth of the new keyframe at the inliers gives
//! the scale between the two maps (monocular maps drift in scale), so a loop is a Sim(3) edge.
//!
//! [`LoopCloser::correct`] solves the pose graph (tiny-solver, Levenberg–Marquardt): odometry
//! edges between consecutive keyframes from the online poses, the loop edges, the first keyframe
//! fixed. The recognition database is capped at `max_keyframes` (every other old keyframe
//! dropped when full, so coverage thins rather than ends); the graph keeps every keyframe's pose.
//!
//! A loop counts once the next keyframe's loop confirms it (the same time between the two
//! visits), and where a relocalisation put both keyframes in one world it must agree with the
//! online map: repeated structure passes PnP at the wrong copy.
//!
//! The database ([`Places`]) is shared: the loops thread adds keyframes and searches it for
//! loops, and a geometry engine that lost tracking searches it through a [`Relocaliser`] to
//! place a frame in an earlier map and track on from there.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use nalgebra::{Matrix3, Point3, Similarity3, Translation3, UnitQuaternion, Vector3};
use opencv::core::{no_array, DMatch, KeyPoint, Mat, Ptr, Vector};
use opencv::features2d::{BFMatcher, ORB_ScoreType, ORB};
use opencv::prelude::*;
use serde::{Deserialize, Serialize};
use tiny_solver::factors::{na, Factor};
use tiny_solver::optimizer::{Optimizer, OptimizerOptions};
use tiny_solver::{LevenbergMarquardtOptimizer, Problem};

use crate::window_ba::rotate;
use streamrecon_core::error::Result;
use streamrecon_core::frame::{Intrinsics, Pose, RgbImage};

const THUMB_W: i32 = 32;
const THUMB_H: i32 = 24;
const FAST_THRESHOLD: i32 = 5;
/// Weight of the odometry edge between the last keyframe of a map segment and the first of the
/// next, against 1 for the others.
const SEGMENT_JOIN_WEIGHT: f64 = 0.01;
/// A verified candidate with this many times `min_inliers` ends the search for a keyframe.
const STRONG_LOOP: usize = 2;
/// A loop is confirmed by one found within this many keyframe intervals before it.
const CONFIRM_KEYFRAMES: u64 = 3;
/// A loop within one map may move the newer keyframe by this fraction of the path since the
/// older one (drift)…
const MAX_DRIFT: f64 = 0.1;
/// …plus this fraction of the scene's median depth.
const DRIFT_FLOOR: f64 = 0.25;
/// …and turn it by at most this many degrees (true loops across a relocalisation: under
/// 2 degrees on our sequences; the wrong copy of repeated structure: about 25).
const MAX_TURN_DRIFT_DEG: f64 = 10.0;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopClosureConfig {
    /// Every this many placed frames is a keyframe.
    pub keyframe_every: u64,
    /// A loop joins keyframes at least this many frames apart.
    pub min_separation: u64,
    /// Keyframes kept for place recognition (about 45 KB each at 1,000 features).
    pub max_keyframes: usize,
    /// Most similar thumbnails verified per keyframe.
    pub candidates: usize,
    /// PnP inliers a loop needs.
    pub min_inliers: usize,
    /// Thumbnail similarity (cosine of the zero-mean thumbnails) a candidate needs.
    pub min_similarity: f32,
    pub orb_features: i32,
}

impl Default for LoopClosureConfig {
    fn default() -> Self {
        Self {
            keyframe_every: 10,
            min_separation: 100,
            max_keyframes: 300,
            candidates: 3,
            min_inliers: 60,
            min_similarity: 0.6,
            orb_features: 1000,
        }
    }
}

/// A similarity transform `x ↦ s·R·x + t` (nalgebra's: composed with `*`, `inverse()`,
/// `transform_point`).
pub type Sim3 = Similarity3<f64>;

fn sim3(p: &Pose) -> Sim3 {
    Sim3::from_isometry(*p, 1.0)
}

/// The camera pose a similarity maps to: a camera at its translation turned by its rotation (the
/// scale only stretches the camera's own coordinates).
fn pose_of(s: &Sim3) -> Pose {
    s.isometry
}

/// `a` moved `f` of the way to `b` (scale in log space, rotation by slerp).
fn lerp(a: &Sim3, b: &Sim3, f: f64) -> Sim3 {
    Sim3::from_parts(
        Translation3::from(
            a.isometry
                .translation
                .vector
                .lerp(&b.isometry.translation.vector, f),
        ),
        a.isometry.rotation.slerp(&b.isometry.rotation, f),
        (a.scaling().ln() * (1.0 - f) + b.scaling().ln() * f).exp(),
    )
}

/// One frame after loop closure.
#[derive(Debug, Clone, Copy)]
pub struct Corrected {
    pub index: u64,
    pub world_from_cam: Pose,
    /// The online world to the corrected one, around this frame: what its points follow.
    pub correction: Sim3,
}

/// A verified loop: keyframe `older`'s camera from keyframe `newer`'s (with the scale between
/// their maps).
#[derive(Debug, Clone, Copy)]
pub struct LoopEdge {
    pub older: u64,
    pub newer: u64,
    pub older_from_newer: Sim3,
    pub inliers: usize,
}

/// What place recognition keeps of a keyframe.
struct Keyframe {
    index: u64,
    segment: u32,
    /// The engine's pose of the keyframe when it was seen (its online map).
    world_from_cam: Pose,
    thumb: Vec<f32>,
    /// ORB descriptors, `DESCRIPTOR_BYTES` a feature.
    descriptors: Vec<u8>,
    /// Each feature's point in the camera, where the depth is known.
    points: Vec<Option<Point3<f32>>>,
}

/// Bytes of one ORB descriptor.
const DESCRIPTOR_BYTES: usize = 32;

impl Keyframe {
    /// The descriptors as an OpenCV matrix over this keyframe's bytes (no copy).
    fn descriptor_mat(&self) -> Result<opencv::boxed_ref::BoxedRef<'_, Mat>> {
        Ok(Mat::new_rows_cols_with_data::<u8>(
            (self.descriptors.len() / DESCRIPTOR_BYTES) as i32,
            DESCRIPTOR_BYTES as i32,
            &self.descriptors,
        )?)
    }
}

/// The keyframes, and buffers for the ones to come: all `max_keyframes` keyframes' storage is
/// allocated and written at the first one, and a thinned keyframe's buffers are reused, so
/// the database's memory does not grow with the stream (as the fusion's table).
#[derive(Default)]
struct Db {
    keyframes: Vec<Keyframe>,
    spare: Vec<Buffers>,
    reserved: bool,
}

/// A keyframe's thumbnail, descriptors and points.
type Buffers = (Vec<f32>, Vec<u8>, Vec<Option<Point3<f32>>>);

impl Db {
    /// Empty buffers for one keyframe (their capacity kept), reserving all of them at the first
    /// call.
    fn buffers(&mut self, cfg: &LoopClosureConfig) -> Buffers {
        if !self.reserved {
            self.reserved = true;
            let features = cfg.orb_features.max(0) as usize;
            self.spare = (0..cfg.max_keyframes)
                .map(|_| {
                    // Written once, so the pages are taken now rather than as keyframes arrive.
                    (
                        vec![f32::NAN; (THUMB_W * THUMB_H) as usize],
                        vec![u8::MAX; features * DESCRIPTOR_BYTES],
                        vec![Some(Point3::new(f32::NAN, 0.0, 0.0)); features],
                    )
                })
                .collect();
        }
        let (mut thumb, mut descriptors, mut points) = self.spare.pop().unwrap_or_default();
        thumb.clear();
        descriptors.clear();
        points.clear();
        (thumb, descriptors, points)
    }
}

/// The place-recognition database: keyframes' thumbnails, ORB features and their 3D points,
/// shared by the loops thread and the geometry engine's [`Relocaliser`].
#[derive(Clone, Default)]
pub struct Places(Arc<RwLock<Db>>);

impl Places {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Db> {
        // A panic while the lock was held leaves whole keyframes: the list stays usable.
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Db> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A frame's features: where they are, their descriptors and, with depth, their points.
struct Described {
    thumb: Vec<f32>,
    pixels: Vec<(f32, f32)>,
    descriptors: Mat,
    points: Vec<Option<Point3<f32>>>,
}

/// The PnP of an older keyframe's points against a newer view's matched features.
struct Matched {
    new_from_old: Pose,
    /// The points (in the older camera), the newer view's pixels and feature numbers, of the
    /// RANSAC inliers.
    points: Vec<Point3<f64>>,
    pixels: Vec<(f32, f32)>,
    features: Vec<usize>,
}

/// A keyframe's place in the pose graph: kept for every keyframe (64 bytes), while the
/// recognition database drops old keyframes' features.
struct Node {
    index: u64,
    segment: u32,
    world_from_cam: Pose,
}

/// ORB detection and matching (each thread its own: OpenCV's objects are not shared).
struct Features {
    orb: Ptr<ORB>,
    matcher: Ptr<BFMatcher>,
}

pub struct LoopCloser {
    cfg: LoopClosureConfig,
    places: Places,
    nodes: Vec<Node>,
    edges: Vec<LoopEdge>,
    features: Features,
    /// Segments a relocalisation rejoined to an earlier one: (segment, earlier).
    rejoined: HashMap<u32, u32>,
    /// The last verified loop, and whether it counts yet ([`LoopCloser::confirm`]).
    last_verified: Option<(LoopEdge, bool)>,
}

impl Features {
    fn new(cfg: &LoopClosureConfig) -> Result<Self> {
        let orb = ORB::create(
            cfg.orb_features,
            1.2,
            8,
            31,
            0,
            2,
            ORB_ScoreType::HARRIS_SCORE,
            31,
            // Low: smooth surfaces (our synthetic world, indoor walls) give few corners at
            // OpenCV's default of 20.
            FAST_THRESHOLD,
        )?;
        Ok(Self {
            orb,
            matcher: BFMatcher::create(opencv::core::NORM_HAMMING, false)?,
        })
    }

    /// The grey image at the engine's resolution (where its depth and intrinsics are) and its
    /// thumbnail: 32×24, zero mean, unit norm.
    fn grey_and_thumbnail(image: &RgbImage, k: &Intrinsics) -> Result<(Mat, Vec<f32>)> {
        let rgb = Mat::new_rows_cols_with_bytes::<opencv::core::Vec3b>(
            image.height() as i32,
            image.width() as i32,
            image.as_raw(),
        )?;
        let mut grey = Mat::default();
        opencv::imgproc::cvt_color_def(&rgb, &mut grey, opencv::imgproc::COLOR_RGB2GRAY)?;
        if (grey.cols(), grey.rows()) != (k.width as i32, k.height as i32) {
            let mut resized = Mat::default();
            opencv::imgproc::resize(
                &grey,
                &mut resized,
                opencv::core::Size::new(k.width as i32, k.height as i32),
                0.0,
                0.0,
                opencv::imgproc::INTER_AREA,
            )?;
            grey = resized;
        }
        let mut small = Mat::default();
        opencv::imgproc::resize(
            &grey,
            &mut small,
            opencv::core::Size::new(THUMB_W, THUMB_H),
            0.0,
            0.0,
            opencv::imgproc::INTER_AREA,
        )?;
        let mut thumb: Vec<f32> = small.data_bytes()?.iter().map(|&v| f32::from(v)).collect();
        let mean = thumb.iter().sum::<f32>() / thumb.len() as f32;
        for v in &mut thumb {
            *v -= mean;
        }
        let norm = thumb.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        for v in &mut thumb {
            *v /= norm;
        }
        Ok((grey, thumb))
    }

    /// ORB features of `grey` and, with `depth`, each one's point in the camera.
    fn describe(
        &mut self,
        grey: &Mat,
        thumb: Vec<f32>,
        k: &Intrinsics,
        depth: Option<&[f32]>,
    ) -> Result<Described> {
        // Features on the contrast-equalised image: the same place under another exposure.
        let mut equalised = Mat::default();
        opencv::imgproc::equalize_hist(grey, &mut equalised)?;
        let mut keypoints = Vector::<KeyPoint>::new();
        let mut descriptors = Mat::default();
        self.orb.detect_and_compute(
            &equalised,
            &no_array(),
            &mut keypoints,
            &mut descriptors,
            false,
        )?;
        let pixels: Vec<(f32, f32)> = keypoints.iter().map(|p| (p.pt().x, p.pt().y)).collect();
        let points = pixels
            .iter()
            .map(|&(x, y)| {
                let d = depth?;
                let (u, v) = (x.round() as usize, y.round() as usize);
                let z = *d.get(v * k.width as usize + u)?;
                (z.is_finite() && z > 0.0).then(|| {
                    k.unproject(f64::from(x), f64::from(y), f64::from(z))
                        .cast::<f32>()
                })
            })
            .collect();
        Ok(Described {
            thumb,
            pixels,
            descriptors,
            points,
        })
    }

    /// Matches `new`'s features to `old`'s (ratio test) and solves PnP + RANSAC of `old`'s
    /// points against them; `None` below `min_inliers`.
    fn match_pnp(
        &self,
        old: &Keyframe,
        new: &Described,
        k: &Intrinsics,
        min_inliers: usize,
    ) -> Result<Option<Matched>> {
        if old.descriptors.len() < 2 * DESCRIPTOR_BYTES || new.descriptors.rows() < 2 {
            return Ok(None);
        }
        let mut knn = Vector::<Vector<DMatch>>::new();
        self.matcher.knn_train_match(
            &new.descriptors,
            &old.descriptor_mat()?,
            &mut knn,
            2,
            &no_array(),
            false,
        )?;
        let (mut points, mut pixels, mut features) = (Vec::new(), Vec::new(), Vec::new());
        for m in &knn {
            if m.len() < 2 {
                continue;
            }
            let (a, b) = (m.get(0)?, m.get(1)?);
            if a.distance > 0.8 * b.distance {
                continue;
            }
            let Some(Some(p)) = old.points.get(a.train_idx as usize) else {
                continue;
            };
            points.push(p.cast::<f64>());
            pixels.push(new.pixels[a.query_idx as usize]);
            features.push(a.query_idx as usize);
        }
        log::debug!(
            "view against keyframe {}: {} matches with depth",
            old.index,
            points.len()
        );
        if points.len() < min_inliers {
            return Ok(None);
        }
        let Some((new_from_old, inliers)) = crate::cv::pnp_ransac(&points, &pixels, k, None, 3.0)?
        else {
            return Ok(None);
        };
        log::debug!("  PnP inliers {}", inliers.len());
        if inliers.len() < min_inliers {
            return Ok(None);
        }
        Ok(Some(Matched {
            new_from_old,
            points: inliers.iter().map(|&i| points[i]).collect(),
            pixels: inliers.iter().map(|&i| pixels[i]).collect(),
            features: inliers.iter().map(|&i| features[i]).collect(),
        }))
    }
}

/// The `candidates` keyframes of `places` most similar to `thumb` (over the similarity bar) that
/// `eligible` admits, most similar first.
fn candidates(
    places: &[Keyframe],
    thumb: &[f32],
    cfg: &LoopClosureConfig,
    eligible: impl Fn(&Keyframe) -> bool,
) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = places
        .iter()
        .enumerate()
        .filter(|(_, o)| eligible(o))
        .map(|(i, o)| (dot(&o.thumb, thumb), i))
        .filter(|(s, _)| *s >= cfg.min_similarity)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.truncate(cfg.candidates);
    scored.into_iter().map(|(_, i)| i).collect()
}

impl LoopCloser {
    /// A loop closer adding its keyframes to `places`.
    ///
    /// # Errors
    /// OpenCV cannot make the feature detector.
    pub fn new(cfg: LoopClosureConfig, places: Places) -> Result<Self> {
        Ok(Self {
            features: Features::new(&cfg)?,
            cfg,
            places,
            nodes: Vec::new(),
            edges: Vec::new(),
            rejoined: HashMap::new(),
            last_verified: None,
        })
    }

    /// The engine placed map `segment` in the `earlier` one (a relocalisation): their poses
    /// are in one world from now on.
    pub fn rejoin(&mut self, segment: u32, earlier: u32) {
        self.rejoined.insert(segment, earlier);
    }

    /// The earliest map segment `s` was rejoined to.
    fn map_of(&self, mut s: u32) -> u32 {
        while let Some(&e) = self.rejoined.get(&s) {
            if e >= s {
                break;
            }
            s = e;
        }
        s
    }

    /// Whether a verified loop agrees with the online map where a relocalisation put its two
    /// keyframes' segments in one world: the pose it gives the newer keyframe is at most
    /// [`MAX_DRIFT`] of the path between them (jumps between segments not counted) plus
    /// [`DRIFT_FLOOR`] of the scene's depth from the engine's, turned at most
    /// [`MAX_TURN_DRIFT_DEG`]. Repeated structure (a texture
    /// every 2 m, identical objects) passes PnP at the wrong copy, and drift since the
    /// relocalisation's anchor cannot explain that. Within one segment the online poses carry
    /// the drift loops are there to fix (a monocular map's scale can drift twenty-fold, and its
    /// heading by over 100 degrees, over a lap of our camera-like sequences), and segments not
    /// joined are in unrelated worlds: those loops stand.
    fn agrees_with_map(
        &self,
        e: &LoopEdge,
        world_from_newer: &Pose,
        segment: u32,
        scene_depth: f64,
    ) -> bool {
        let Some(start) = self.nodes.iter().position(|n| n.index == e.older) else {
            return true;
        };
        let older = &self.nodes[start];
        if older.segment == segment || self.map_of(older.segment) != self.map_of(segment) {
            return true;
        }
        let implied = sim3(&older.world_from_cam) * e.older_from_newer;
        let turn = implied
            .isometry
            .rotation
            .angle_to(&world_from_newer.rotation)
            .to_degrees();
        if turn > MAX_TURN_DRIFT_DEG {
            log::info!(
                "loop: frame {} against frame {} refused: it turns the frame {turn:.1} degrees from the map",
                e.newer,
                e.older,
            );
            return false;
        }
        let gap =
            (implied.isometry.translation.vector - world_from_newer.translation.vector).norm();
        let step = |a: &Node, b: (&Pose, u32)| {
            if a.segment == b.1 {
                (a.world_from_cam.translation.vector - b.0.translation.vector).norm()
            } else {
                0.0
            }
        };
        let path: f64 = self.nodes[start..]
            .windows(2)
            .map(|w| step(&w[0], (&w[1].world_from_cam, w[1].segment)))
            .sum::<f64>()
            + self
                .nodes
                .last()
                .map_or(0.0, |n| step(n, (world_from_newer, segment)));
        let ok = gap <= MAX_DRIFT * path + DRIFT_FLOOR * scene_depth;
        if !ok {
            log::info!(
                "loop: frame {} against frame {} refused: it moves the frame {gap:.3} from the map, after a path of {path:.3} (scene depth {scene_depth:.3})",
                e.newer,
                e.older,
            );
        }
        ok
    }

    /// A verified loop with fewer than `STRONG_LOOP` times `min_inliers` counts once the one
    /// before it confirms it: found by a keyframe at most `CONFIRM_KEYFRAMES` keyframe
    /// intervals earlier with the same time between the two visits, give or take as much. A
    /// true revisit is seen from one keyframe to the next; repeated structure gives isolated,
    /// weak matches at the wrong copy. (Strong loops count at once: after many laps the best
    /// match of consecutive keyframes is often on different laps.) The first loop of a run of
    /// agreeing ones is added when the second confirms it. Returns `e` when it counts.
    fn confirm(&mut self, e: LoopEdge) -> Option<LoopEdge> {
        let window = CONFIRM_KEYFRAMES * self.cfg.keyframe_every;
        let shift = |l: &LoopEdge| l.newer.abs_diff(l.older);
        let confirmed = e.inliers >= STRONG_LOOP * self.cfg.min_inliers
            || self.last_verified.as_ref().is_some_and(|(p, _)| {
                e.newer - p.newer <= window && shift(&e).abs_diff(shift(p)) <= window
            });
        if confirmed {
            if let Some((p, false)) = self.last_verified {
                self.edges.push(p);
            }
            self.edges.push(e);
        } else {
            log::debug!(
                "loop: frame {} against frame {} waits for the next keyframe to confirm it",
                e.newer,
                e.older
            );
        }
        self.last_verified = Some((e, confirmed));
        confirmed.then_some(e)
    }

    /// Loops found so far.
    pub fn loops(&self) -> &[LoopEdge] {
        &self.edges
    }

    /// Map segments among the keyframes once loops and relocalisations ([`LoopCloser::rejoin`])
    /// join them: segments a chain of loops links count as one.
    pub fn segments_after_loops(&self) -> usize {
        fn root(p: &mut HashMap<u32, u32>, s: u32) -> u32 {
            let mut r = s;
            while p[&r] != r {
                r = p[&r];
            }
            p.insert(s, r);
            r
        }
        let segment_of: HashMap<u64, u32> =
            self.nodes.iter().map(|k| (k.index, k.segment)).collect();
        let mut parent: HashMap<u32, u32> = segment_of.values().map(|&s| (s, s)).collect();
        let links = self
            .edges
            .iter()
            .filter_map(|e| Some((*segment_of.get(&e.older)?, *segment_of.get(&e.newer)?)))
            .chain(
                self.rejoined
                    .iter()
                    .map(|(&a, &b)| (a, b))
                    .filter(|(a, b)| parent.contains_key(a) && parent.contains_key(b)),
            )
            .collect::<Vec<_>>();
        for (a, b) in links {
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            parent.insert(ra.max(rb), ra.min(rb));
        }
        let segments: Vec<u32> = parent.keys().copied().collect();
        let mut roots: Vec<u32> = segments.into_iter().map(|s| root(&mut parent, s)).collect();
        roots.sort_unstable();
        roots.dedup();
        roots.len()
    }

    /// A keyframe: a frame the engine placed (callers pick every `keyframe_every`-th) in map
    /// `segment` (a new one starts after tracking was lost), with its `depth` (camera z,
    /// row-major at `intrinsics`' size, 0 = unknown) as the engine gave it. Returns the loop it
    /// closed, if any.
    ///
    /// # Errors
    /// OpenCV failures.
    pub fn observe(
        &mut self,
        index: u64,
        segment: u32,
        image: &RgbImage,
        world_from_cam: &Pose,
        intrinsics: &Intrinsics,
        depth: Option<&[f32]>,
    ) -> Result<Option<LoopEdge>> {
        let (grey, thumb) = Features::grey_and_thumbnail(image, intrinsics)?;
        let d = self.features.describe(&grey, thumb, intrinsics, depth)?;
        let found = self.find_loop(index, segment, world_from_cam, &d, intrinsics)?;
        let edge = found.and_then(|e| self.confirm(e));
        let mut places = self.places.write();
        if places.keyframes.len() >= self.cfg.max_keyframes {
            // Thin the older half: every other one goes, its buffers kept for the next.
            let half = places.keyframes.len() / 2;
            let old = std::mem::take(&mut places.keyframes);
            for (i, kf) in old.into_iter().enumerate() {
                if i >= half || i % 2 == 1 {
                    places.keyframes.push(kf);
                } else {
                    places.spare.push((kf.thumb, kf.descriptors, kf.points));
                }
            }
        }
        let (mut thumb, mut descriptors, mut points) = places.buffers(&self.cfg);
        thumb.extend_from_slice(&d.thumb);
        descriptors.extend_from_slice(d.descriptors.data_bytes()?);
        points.extend_from_slice(&d.points);
        places.keyframes.push(Keyframe {
            index,
            segment,
            world_from_cam: *world_from_cam,
            thumb,
            descriptors,
            points,
        });
        drop(places);
        self.nodes.push(Node {
            index,
            segment,
            world_from_cam: *world_from_cam,
        });
        Ok(edge)
    }

    fn find_loop(
        &self,
        index: u64,
        segment: u32,
        world_from_cam: &Pose,
        kf: &Described,
        k: &Intrinsics,
    ) -> Result<Option<LoopEdge>> {
        log::debug!(
            "keyframe {index}: {} features, {} with depth",
            kf.descriptors.rows(),
            kf.points.iter().flatten().count()
        );
        if kf.descriptors.rows() < self.cfg.min_inliers as i32 {
            return Ok(None);
        }
        let places = self.places.read();
        let found = candidates(&places.keyframes, &kf.thumb, &self.cfg, |o| {
            o.index + self.cfg.min_separation <= index
        });
        log::debug!(
            "keyframe {index}: {} candidates over the similarity bar",
            found.len()
        );
        let mut depths: Vec<f64> = kf.points.iter().flatten().map(|p| f64::from(p.z)).collect();
        depths.sort_by(f64::total_cmp);
        let scene_depth = depths.get(depths.len() / 2).copied().unwrap_or(0.0);
        let mut best: Option<LoopEdge> = None;
        for i in found {
            let verified = self
                .verify(&places.keyframes[i], index, kf, k)?
                .filter(|e| self.agrees_with_map(e, world_from_cam, segment, scene_depth));
            if let Some(e) = verified {
                if best.is_none_or(|b| e.inliers > b.inliers) {
                    best = Some(e);
                }
            }
            // A match this strong is the place: the weaker candidates' matching (most of this
            // thread's time) would not replace it.
            if best.is_some_and(|b| b.inliers >= STRONG_LOOP * self.cfg.min_inliers) {
                break;
            }
        }
        Ok(best)
    }

    /// PnP of `old`'s 3D features against `new`'s matched pixels; the scale from `new`'s depth.
    fn verify(
        &self,
        old: &Keyframe,
        index: u64,
        new: &Described,
        k: &Intrinsics,
    ) -> Result<Option<LoopEdge>> {
        let Some(m) = self.features.match_pnp(old, new, k, self.cfg.min_inliers)? else {
            return Ok(None);
        };
        // Scale: the new map's depth of the inliers over the depth PnP puts them at.
        let mut ratios: Vec<f64> = m
            .points
            .iter()
            .zip(&m.features)
            .filter_map(|(p, &f)| {
                let z_pnp = (m.new_from_old * p).z;
                let z_new = f64::from(new.points[f]?.z);
                (z_pnp > 1e-9).then(|| z_new / z_pnp)
            })
            .collect();
        if ratios.len() < self.cfg.min_inliers / 2 {
            return Ok(None);
        }
        ratios.sort_by(f64::total_cmp);
        let r = ratios[ratios.len() / 2];
        // x_new (new units) = r · new_from_old(x_old); so older_from_newer = new_from_old⁻¹ ∘ (1/r).
        let older_from_newer = Sim3::from_isometry(m.new_from_old.inverse(), 1.0 / r);
        Ok(Some(LoopEdge {
            older: old.index,
            newer: index,
            older_from_newer,
            inliers: m.points.len(),
        }))
    }

    /// The trajectory corrected by the pose graph: for each of `online` (frame index,
    /// world_from_cam, in frame order) the map from its online world to the corrected one (its
    /// neighbouring keyframes' corrections blended by position, only from keyframes of its own
    /// map segment) and its corrected pose. `online` holds (frame index, segment,
    /// world_from_cam). `None` without loops, or when the solver fails.
    pub fn correct(&self, online: &[(u64, u32, Pose)]) -> Option<Vec<Corrected>> {
        if self.edges.is_empty() || self.nodes.len() < 2 {
            return None;
        }
        let kfs = &self.nodes;
        let slot: HashMap<u64, usize> = kfs.iter().enumerate().map(|(i, k)| (k.index, i)).collect();
        let name = |i: usize| format!("k{i}");
        let mut problem = Problem::new();
        let initial: Vec<Sim3> = kfs.iter().map(|k| sim3(&k.world_from_cam)).collect();
        let add = |i: usize, j: usize, z: Sim3, weight: f64, problem: &mut Problem| {
            let factor = Between {
                older_from_newer_online: Affine::of(&(initial[i].inverse() * initial[j])),
                measured: Affine::of(&z),
                free: [i != 0, j != 0],
                weight,
            };
            let vars: Vec<String> = [i, j].into_iter().filter(|&k| k != 0).map(name).collect();
            let refs: Vec<&str> = vars.iter().map(String::as_str).collect();
            problem.add_residual_block(12, &refs, Box::new(factor), None);
        };
        for i in 1..kfs.len() {
            let z = initial[i - 1].inverse() * initial[i];
            // Where the engine started a new map segment its poses there say little: the
            // loops place the new segment (relocalisation), this edge only keeps it from
            // floating when none does.
            let weight = if kfs[i].segment == kfs[i - 1].segment {
                1.0
            } else {
                SEGMENT_JOIN_WEIGHT
            };
            add(i - 1, i, z, weight, &mut problem);
        }
        for e in &self.edges {
            if let (Some(&i), Some(&j)) = (slot.get(&e.older), slot.get(&e.newer)) {
                add(i, j, e.older_from_newer, 1.0, &mut problem);
            }
        }
        let values: HashMap<String, na::DVector<f64>> = (1..kfs.len())
            .map(|i| (name(i), na::DVector::zeros(7)))
            .collect();
        let options = OptimizerOptions {
            max_iteration: 50,
            ..OptimizerOptions::default()
        };
        let solved =
            LevenbergMarquardtOptimizer::default().optimize(&problem, &values, Some(options))?;
        // Keyframe k's correction: the map from its online world to the corrected one.
        let corrections: Vec<Sim3> = (0..kfs.len())
            .map(|i| {
                let d = if i == 0 {
                    None
                } else {
                    solved
                        .get(&name(i))
                        .filter(|d| d.iter().all(|v| v.is_finite()))
                };
                let delta = d.map_or(Sim3::identity(), |d| {
                    Sim3::from_parts(
                        Translation3::new(d[3], d[4], d[5]),
                        UnitQuaternion::from_scaled_axis(Vector3::new(d[0], d[1], d[2])),
                        d[6].exp(),
                    )
                });
                initial[i] * delta * initial[i].inverse()
            })
            .collect();
        Some(
            online
                .iter()
                .map(|&(index, segment, pose)| {
                    let n = kfs.partition_point(|k| k.index <= index);
                    let same = |i: usize| kfs.get(i).filter(|k| k.segment == segment).map(|_| i);
                    let (before, after) = (n.checked_sub(1).and_then(same), same(n));
                    let c = match (before, after) {
                        (Some(a), Some(b)) => {
                            let f = (index - kfs[a].index) as f64
                                / (kfs[b].index - kfs[a].index) as f64;
                            lerp(&corrections[a], &corrections[b], f)
                        }
                        (Some(a), None) => corrections[a],
                        (None, Some(b)) => corrections[b],
                        (None, None) => corrections[n.min(kfs.len() - 1)],
                    };
                    Corrected {
                        index,
                        world_from_cam: pose_of(&(c * sim3(&pose))),
                        correction: c,
                    }
                })
                .collect(),
        )
    }
}

/// A frame placed in an earlier map by [`Relocaliser::relocalise`].
#[derive(Debug, Clone)]
pub struct Relocalised {
    pub world_from_cam: Pose,
    /// The keyframe the frame matched, and that keyframe's map segment.
    pub keyframe: u64,
    pub segment: u32,
    /// The PnP inliers: the feature's pixel in the frame and the earlier map's point (world).
    pub matches: Vec<((f32, f32), Point3<f64>)>,
    /// Each inlier's reprojection error, pixels.
    pub reprojection_px: Vec<f64>,
}

/// Places a frame in an earlier map: its thumbnail picks the most similar keyframes of the shared
/// [`Places`], and the one whose points PnP + RANSAC fits with the most inliers (at least
/// `min_inliers`, as a loop) gives the frame's pose in that keyframe's map and scale.
pub struct Relocaliser {
    cfg: LoopClosureConfig,
    places: Places,
    features: Features,
}

impl Relocaliser {
    /// # Errors
    /// OpenCV cannot make the feature detector.
    pub fn new(cfg: LoopClosureConfig, places: Places) -> Result<Self> {
        Ok(Self {
            features: Features::new(&cfg)?,
            cfg,
            places,
        })
    }

    /// The pose of a frame (`image` at `k`'s size) in the earlier map it shows, if any.
    ///
    /// # Errors
    /// OpenCV failures.
    pub fn relocalise(&mut self, image: &RgbImage, k: &Intrinsics) -> Result<Option<Relocalised>> {
        // One read of the database throughout (the loops thread only waits to add a keyframe).
        let places = self.places.read();
        if places.keyframes.is_empty() {
            return Ok(None);
        }
        let (grey, thumb) = Features::grey_and_thumbnail(image, k)?;
        let found = candidates(&places.keyframes, &thumb, &self.cfg, |_| true);
        // ORB only for a frame that looks like some keyframe.
        if found.is_empty() {
            return Ok(None);
        }
        let d = self.features.describe(&grey, thumb, k, None)?;
        let mut best: Option<(Matched, &Keyframe)> = None;
        for i in found {
            if let Some(m) =
                self.features
                    .match_pnp(&places.keyframes[i], &d, k, self.cfg.min_inliers)?
            {
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| m.points.len() > b.points.len())
                {
                    best = Some((m, &places.keyframes[i]));
                }
            }
        }
        let Some((m, old)) = best else {
            return Ok(None);
        };
        let reprojection_px = m
            .points
            .iter()
            .zip(&m.pixels)
            .filter_map(|(p, px)| {
                let (u, v) = k.project(&(m.new_from_old * p))?;
                Some((u - f64::from(px.0)).hypot(v - f64::from(px.1)))
            })
            .collect();
        Ok(Some(Relocalised {
            world_from_cam: old.world_from_cam * m.new_from_old.inverse(),
            keyframe: old.index,
            segment: old.segment,
            matches: m
                .pixels
                .iter()
                .zip(&m.points)
                .map(|(&px, p)| (px, old.world_from_cam * p))
                .collect(),
            reprojection_px,
        }))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A similarity as `x ↦ L·x + t` (L = s·R), made once per edge rather than at every residual
/// evaluation.
struct Affine {
    linear: Matrix3<f64>,
    translation: Vector3<f64>,
}

impl Affine {
    fn of(s: &Sim3) -> Self {
        Self {
            linear: s.isometry.rotation.to_rotation_matrix().into_inner() * s.scaling(),
            translation: s.isometry.translation.vector,
        }
    }
}

/// A pose-graph edge between keyframes i (older) and j (newer), whose poses are their online
/// ones moved by perturbations D = (ω, v, σ): S = S⁰ ∘ D. The residual compares where the
/// measured relative transform and the graph's put four reference points (the origin and the
/// unit axes, about the scene's depth in map units), in i's online camera:
/// A(D_j(p)) − D_i(Z(p)), with A = (S_i⁰)⁻¹ S_j⁰.
struct Between {
    older_from_newer_online: Affine,
    measured: Affine,
    /// Whether i's and j's perturbations are parameters (the first keyframe is fixed).
    free: [bool; 2],
    weight: f64,
}

impl<T: na::RealField> Factor<T> for Between {
    fn residual_func(&self, params: &[na::DVector<T>]) -> na::DVector<T> {
        let f = |v: f64| T::from_f64(v).expect("f64 constant");
        let mut it = params.iter();
        let di = if self.free[0] { it.next() } else { None };
        let dj = if self.free[1] { it.next() } else { None };
        let perturb = |d: Option<&na::DVector<T>>, p: [T; 3]| -> [T; 3] {
            let Some(d) = d else { return p };
            let s = d[6].clone().exp();
            let r = rotate(&[d[0].clone(), d[1].clone(), d[2].clone()], &p);
            [
                r[0].clone() * s.clone() + d[3].clone(),
                r[1].clone() * s.clone() + d[4].clone(),
                r[2].clone() * s + d[5].clone(),
            ]
        };
        let constant = |t: &Affine, p: [T; 3]| -> [T; 3] {
            std::array::from_fn(|r| {
                f(t.linear[(r, 0)]) * p[0].clone()
                    + f(t.linear[(r, 1)]) * p[1].clone()
                    + f(t.linear[(r, 2)]) * p[2].clone()
                    + f(t.translation[r])
            })
        };
        let mut out = Vec::with_capacity(12);
        for k in 0..4 {
            let p: [T; 3] = std::array::from_fn(|a| {
                if k > 0 && a == k - 1 {
                    T::one()
                } else {
                    T::zero()
                }
            });
            let lhs = constant(&self.older_from_newer_online, perturb(dj, p.clone()));
            let rhs = perturb(di, constant(&self.measured, p));
            for a in 0..3 {
                out.push((lhs[a].clone() - rhs[a].clone()) * f(self.weight));
            }
        }
        na::DVector::from_vec(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_join_the_segments_they_link() {
        let mut c = LoopCloser::new(LoopClosureConfig::default(), Places::default()).unwrap();
        for (index, segment) in [(0, 0), (10, 0), (20, 1), (30, 2), (40, 3)] {
            c.nodes.push(Node {
                index,
                segment,
                world_from_cam: Pose::identity(),
            });
        }
        assert_eq!(c.segments_after_loops(), 4);
        let edge = |older, newer| LoopEdge {
            older,
            newer,
            older_from_newer: Sim3::identity(),
            inliers: 100,
        };
        // Segment 2 to 0, then 3 to 2: a chain of loops makes one segment of three.
        c.edges.push(edge(10, 30));
        assert_eq!(c.segments_after_loops(), 3);
        c.edges.push(edge(30, 40));
        assert_eq!(c.segments_after_loops(), 2);
        // A relocalisation that rejoined segment 1 to 0 makes one.
        c.rejoin(1, 0);
        assert_eq!(c.segments_after_loops(), 1);
    }

    #[test]
    fn thinned_keyframes_buffers_come_back_empty_and_keep_their_room() {
        let cfg = LoopClosureConfig {
            max_keyframes: 2,
            orb_features: 4,
            ..LoopClosureConfig::default()
        };
        let mut db = Db::default();
        let (thumb, mut descriptors, points) = db.buffers(&cfg);
        assert!(thumb.is_empty() && descriptors.is_empty() && points.is_empty());
        assert_eq!(db.spare.len(), 1);
        let room = descriptors.capacity();
        assert!(room >= 4 * DESCRIPTOR_BYTES);
        // A keyframe's full buffers go back when it is thinned, and come out empty.
        descriptors.extend_from_slice(&[7; 4 * DESCRIPTOR_BYTES]);
        db.spare.push((thumb, descriptors, points));
        let (_, again, _) = db.buffers(&cfg);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
    }

    #[test]
    fn a_loop_counts_once_the_next_keyframe_confirms_it() {
        let mut c = LoopCloser::new(LoopClosureConfig::default(), Places::default()).unwrap();
        let edge = |older, newer| LoopEdge {
            older,
            newer,
            older_from_newer: Sim3::identity(),
            inliers: 100,
        };
        // A strong loop counts at once.
        let strong = LoopEdge {
            inliers: 500,
            ..edge(10, 300)
        };
        assert!(c.confirm(strong).is_some());
        c.edges.clear();
        c.last_verified = None;
        // Alone, a weak loop waits; the next keyframe's, with the same time between the visits,
        // confirms both.
        assert!(c.confirm(edge(100, 400)).is_none());
        assert!(c.loops().is_empty());
        assert!(c.confirm(edge(110, 410)).is_some());
        assert_eq!(c.loops().len(), 2);
        assert!(c.confirm(edge(120, 420)).is_some());
        assert_eq!(c.loops().len(), 3);
        // An isolated match elsewhere (another time shift) waits, and one after it that agrees
        // with neither is not confirmed either.
        assert!(c.confirm(edge(300, 430)).is_none());
        assert!(c.confirm(edge(50, 440)).is_none());
        assert_eq!(c.loops().len(), 3);
        // Nor is one too many keyframes after the last.
        assert!(c.confirm(edge(90, 480)).is_none());
        assert!(c.confirm(edge(100, 520)).is_none());
        assert_eq!(c.loops().len(), 3);
    }

    #[test]
    fn corrections_blend_in_log_scale_and_apply_as_similarities() {
        let a = Sim3::from_parts(
            Translation3::new(1.0, -2.0, 0.5),
            UnitQuaternion::from_euler_angles(0.3, -0.2, 1.1),
            1.7,
        );
        let b = Sim3::from_parts(
            Translation3::new(0.2, 0.3, -1.0),
            UnitQuaternion::from_euler_angles(-0.4, 0.1, 0.2),
            0.6,
        );
        let mid = lerp(&a, &b, 0.5);
        assert!((mid.scaling() - (1.7f64 * 0.6).sqrt()).abs() < 1e-12);
        let x = Point3::new(0.3, 0.7, -0.2);
        let e = Affine::of(&a);
        assert!(
            (e.linear * x.coords + e.translation - a.transform_point(&x).coords).norm() < 1e-12
        );
        // A corrected pose keeps its rotation and moves its centre as a point.
        let p = Pose::from_parts(Translation3::new(0.1, 0.2, 0.3), UnitQuaternion::identity());
        let q = pose_of(&(a * sim3(&p)));
        assert!(
            (q.translation.vector - a.transform_point(&Point3::new(0.1, 0.2, 0.3)).coords).norm()
                < 1e-12
        );
    }
}
