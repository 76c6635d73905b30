//! Keyframe bookkeeping, the windowed bundle adjustment and the release of frames held back
//! while a map initialises.

use std::collections::HashMap;

use super::window_ba::{self, Observation, Window};
use super::{best_rotation, median, Chain, FlowVo, Pending, Track, MAX_STEP_RATIO};
use crate::{untracked, FrameGeometry, GeometryStats};
use streamrecon_core::error::Result;
use streamrecon_core::frame::{Frame, Pose};

impl FlowVo {
    /// Windowed bundle adjustment ending at keyframe `index` (see [`WindowBaConfig`]); updates the
    /// window's poses and points and returns the keyframe's refined pose, `None` when off or
    /// when the solver did not improve the window.
    pub(super) fn bundle_adjust(&mut self, index: u64) -> Option<Pose> {
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

    pub(super) fn plausible_step(&self, step: f64) -> bool {
        if self.recent_steps.len() < 3 {
            return true;
        }
        let mut v: Vec<f64> = self.recent_steps.iter().copied().collect();
        let med = median(&mut v).unwrap_or(0.0);
        // Noise floor: 1 % of the scene's median depth.
        step <= MAX_STEP_RATIO * med + 0.01 * self.median_depth
    }

    pub(super) fn mark_keyframe_tracks(&mut self) {
        for t in &mut self.tracks {
            t.mapped_at_keyframe = t.point.is_some();
        }
        self.keyframe_base = self.tracks.iter().filter(|t| t.point.is_some()).count();
    }

    /// Emits the frames held back during initialisation, with the segment origin as pose and
    /// `why` they have no tracked one; a camera that only turned (`why` is
    /// [`untracked::ROTATION`]) keeps its orientation since the segment's `reference` frame.
    pub(super) fn release_untracked(
        &self,
        pending: Vec<Pending>,
        why: &'static str,
        reference: u64,
    ) -> Vec<FrameGeometry> {
        let stats = GeometryStats {
            tracked: false,
            segment: self.segment,
            untracked_reason: Some(why),
            ..GeometryStats::default()
        };
        pending
            .into_iter()
            .map(|p| {
                let turned = (why == untracked::ROTATION)
                    .then(|| self.turned_pose(reference, p.index))
                    .flatten();
                let stats = GeometryStats {
                    orientation_only: turned.is_some(),
                    ..stats
                };
                let pose = turned.unwrap_or(self.segment_origin);
                self.geometry(p.index, p.timestamp, pose, stats, None)
            })
            .collect()
    }

    /// world_from_cam of frame `f` for a camera that only turned since the segment's
    /// `reference` frame: the segment's origin turned by the rotation that best maps the tracks'
    /// bearings at the reference onto theirs at `f`. `None` with too few tracks seen in both.
    pub(super) fn turned_pose(&self, reference: u64, f: u64) -> Option<Pose> {
        if f == reference {
            return Some(self.segment_origin);
        }
        let k = self.intrinsics?;
        let at = |t: &Track, frame: u64| {
            t.obs
                .iter()
                .find(|o| o.0 == frame)
                .map(|o| Self::bearing(&k, f64::from(o.1), f64::from(o.2)))
        };
        let (a, b): (Vec<_>, Vec<_>) = self
            .tracks
            .iter()
            .filter_map(|t| Some((at(t, reference)?, at(t, f)?)))
            .unzip();
        if a.len() < self.config.min_inliers {
            return None;
        }
        // Bearings at f ≈ R · bearings at the reference: R is cam_f_from_cam_ref's rotation.
        let r = best_rotation(&a, &b)?;
        let ref_from_f = nalgebra::UnitQuaternion::from_matrix(&r.transpose());
        Some(self.segment_origin * Pose::from_parts(nalgebra::Translation3::identity(), ref_from_f))
    }

    /// After a successful initialisation: poses for the held-back frames, depth for the last.
    pub(super) fn release_initialised(
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
                        untracked_reason: Some(untracked::LOST),
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
