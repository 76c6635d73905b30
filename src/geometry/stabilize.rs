//! Online trajectory stabilization of each output pose, two ways:
//! - by default a fixed-latency centred smoother: frame t's pose is output when frame t + 1 has
//!   arrived, moved 0.8 of the way to the [1, 2, 1] / 4 average of its neighbours (translation
//!   and rotation); one frame of delay, no lag;
//! - with latency 0, a causal filter: translation by a constant-velocity (alpha–beta) filter, or
//!   per axis by a One-Euro filter; rotation by a One-Euro slerp whose cutoff rises with speed,
//!   so slow jitter is smoothed and fast motion passes with little lag. Speed is measured
//!   relative to the recent median speed, so the filter does not depend on the (monocular,
//!   arbitrary) scale.
//!
//! On flowvo's output (`benches/adaptive.rs`, hand-held and noisy synthetic paths) both remove
//! well over half the trajectory's high-frequency energy with no lag; the smoother changes
//! ATE by −0.2…+0.3 %, the causal filter (gain 0.6) by −1.1…+1.9 % (on hand-held paths the
//! jitter is real motion, so removing it can only cost accuracy once the estimate follows it).
//!
//! `StabilizedEngine` wraps any geometry engine and filters the `world_from_cam` it outputs; depth
//! stays in the camera frame. The correction (filtered vs raw) is reported per frame.

use std::collections::VecDeque;
use std::path::Path;

use nalgebra::{UnitQuaternion, Vector3};
use serde::Serialize;

use super::{FrameGeometry, GeometryEngine};
use streamrecon_core::error::Result;
use streamrecon_core::frame::{Frame, Pose};
use streamrecon_flow::PairFlow;

/// Parameters of the filter.
#[derive(Debug, Clone, Serialize)]
pub struct StabilizeConfig {
    /// Cutoff (Hz) at the median speed's zero: lower smooths more and lags more.
    pub min_cutoff_hz: f64,
    /// How fast the cutoff rises with speed (relative to the recent median speed).
    pub beta: f64,
    /// Cutoff (Hz) of the speed estimate itself.
    pub speed_cutoff_hz: f64,
    /// Frame interval when timestamps do not give one, seconds.
    pub default_dt: f64,
    /// Frames in the running median of speeds.
    pub speed_window: usize,
    /// Translation by a constant-velocity filter instead of One-Euro: the steady-state Kalman
    /// gain α on position (β = α²/(2 − α) on velocity, critically damped). Its prediction
    /// removes the lag of a steady motion, which One-Euro trades against smoothing. `None` =
    /// One-Euro (`min_cutoff_hz`, `beta`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constant_velocity_gain: Option<f64>,
    /// Frames each pose waits for before it is output: 0 = the causal filter above; 1 or 2 = a
    /// centred smoother over the raw poses ([1, 2, 1] / 4 at latency 1; at latency 2 the
    /// five-point cubic Savitzky–Golay window [−3, 12, 17, 12, −3] / 35), blended with the raw
    /// pose by `smoother_blend`, frame t's pose leaving when frame t + latency arrives. Seeing
    /// later frames, it tells jitter from a change of motion, which a causal filter can only
    /// guess at.
    pub latency_frames: usize,
    /// Weight of the smoothed pose against the raw one in the fixed-latency smoother, (0, 1].
    pub smoother_blend: f64,
}

/// Most frames the fixed-latency smoother may wait for.
pub const MAX_LATENCY_FRAMES: usize = 2;
/// The default latency (see [`StabilizeConfig::latency_frames`]). At 2 the cubic window keeps
/// more of the real hand-held motion than the [1, 2, 1] / 4 of latency 1 while still removing
/// over half the high-frequency energy: on 16 synthetic sequences (`benches/adaptive.rs`) it never
/// raised ATE, where latency 1 did on 3 (by up to 0.3 %).
pub const DEFAULT_LATENCY_FRAMES: usize = 2;
/// The fixed-latency smoother's default blend.
pub const DEFAULT_SMOOTHER_BLEND: f64 = 0.8;

/// The constant-velocity filter's default gain α.
pub const DEFAULT_CONSTANT_VELOCITY_GAIN: f64 = 0.6;

impl Default for StabilizeConfig {
    fn default() -> Self {
        Self {
            min_cutoff_hz: 4.0,
            beta: 1.0,
            speed_cutoff_hz: 2.0,
            default_dt: 1.0 / 30.0,
            speed_window: 30,
            constant_velocity_gain: Some(DEFAULT_CONSTANT_VELOCITY_GAIN),
            latency_frames: DEFAULT_LATENCY_FRAMES,
            smoother_blend: DEFAULT_SMOOTHER_BLEND,
        }
    }
}

fn alpha(cutoff_hz: f64, dt: f64) -> f64 {
    let tau = 1.0 / (2.0 * std::f64::consts::PI * cutoff_hz.max(1e-6));
    1.0 / (1.0 + tau / dt)
}

/// The filter state.
pub struct Stabilizer {
    config: StabilizeConfig,
    last: Option<(f64, Pose)>,
    speed_t: f64,
    speed_r: f64,
    recent_t: VecDeque<f64>,
    recent_r: VecDeque<f64>,
    /// Velocity of the constant-velocity filter (world units per second).
    velocity: Vector3<f64>,
}

/// What the filter changed for one frame.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Correction {
    /// |filtered − raw| camera centre, world units.
    pub translation: f64,
    /// Angle between filtered and raw orientation, degrees.
    pub rotation_deg: f64,
}

fn median(v: &VecDeque<f64>) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

impl Stabilizer {
    pub fn new(config: StabilizeConfig) -> Self {
        Self {
            config,
            last: None,
            speed_t: 0.0,
            speed_r: 0.0,
            recent_t: VecDeque::new(),
            recent_r: VecDeque::new(),
            velocity: Vector3::zeros(),
        }
    }

    /// Filters the pose of the frame at `timestamp`.
    pub fn filter(&mut self, timestamp: f64, raw: &Pose) -> (Pose, Correction) {
        let Some((t_prev, prev)) = self.last else {
            self.last = Some((timestamp, *raw));
            return (*raw, Correction::default());
        };
        let c = &self.config;
        let dt = {
            let d = timestamp - t_prev;
            if d.is_finite() && d > 1e-6 {
                d
            } else {
                c.default_dt
            }
        };
        let dp = raw.translation.vector - prev.translation.vector;
        let dq = prev.rotation.inverse() * raw.rotation;
        let (v_t, v_r) = (dp.norm() / dt, dq.angle() / dt);
        let a_s = alpha(c.speed_cutoff_hz, dt);
        self.speed_t += a_s * (v_t - self.speed_t);
        self.speed_r += a_s * (v_r - self.speed_r);
        for (q, v) in [(&mut self.recent_t, v_t), (&mut self.recent_r, v_r)] {
            q.push_back(v);
            while q.len() > c.speed_window.max(1) {
                q.pop_front();
            }
        }
        let rel = |speed: f64, recent: &VecDeque<f64>| {
            let m = median(recent);
            if m > 1e-12 {
                speed / m
            } else {
                0.0
            }
        };
        let a_t = alpha(
            c.min_cutoff_hz * (1.0 + c.beta * rel(self.speed_t, &self.recent_t)),
            dt,
        );
        let a_r = alpha(
            c.min_cutoff_hz * (1.0 + c.beta * rel(self.speed_r, &self.recent_r)),
            dt,
        );
        let t: Vector3<f64> = if let Some(gain) = c.constant_velocity_gain {
            let g = gain.clamp(1e-3, 1.0);
            let predicted = prev.translation.vector + self.velocity * dt;
            let innovation = raw.translation.vector - predicted;
            self.velocity += (g * g / (2.0 - g) / dt) * innovation;
            predicted + g * innovation
        } else {
            prev.translation.vector + a_t * dp
        };
        let r: UnitQuaternion<f64> = prev
            .rotation
            .try_slerp(&raw.rotation, a_r, 1e-9)
            .unwrap_or(raw.rotation);
        let out = Pose::from_parts(t.into(), r);
        self.last = Some((timestamp, out));
        let corr = Correction {
            translation: (t - raw.translation.vector).norm(),
            rotation_deg: (r.inverse() * raw.rotation).angle().to_degrees(),
        };
        (out, corr)
    }

    pub fn reset(&mut self) {
        *self = Self::new(self.config.clone());
    }
}

/// A centred smoother with a fixed latency: each pose is output once the `latency` poses after
/// it have arrived (or the stream, or its map segment, ends), moved towards the weighted
/// average of its neighbours: [1, 2, 1] / 4 over one neighbour a side, the cubic
/// Savitzky–Golay window [−3, 12, 17, 12, −3] / 35 over two (it keeps cubic motion and damps
/// only the fastest wiggles, where a binomial window also flattens real motion). Near a
/// segment's ends the window shrinks to the neighbours present on both sides, so it stays
/// centred (a steady motion passes unchanged).
pub struct FixedLagSmoother<T> {
    latency: usize,
    blend: f64,
    /// Raw poses of the last `latency` items output, oldest first.
    past: VecDeque<Pose>,
    /// Items waiting for their later neighbours, with their raw poses.
    pending: VecDeque<(Pose, T)>,
}

/// The smoothing window of half-width `h` (2h + 1 weights summing to 1).
fn window(h: usize) -> &'static [f64] {
    match h {
        0 => &[1.0],
        1 => &[0.25, 0.5, 0.25],
        _ => &[
            -3.0 / 35.0,
            12.0 / 35.0,
            17.0 / 35.0,
            12.0 / 35.0,
            -3.0 / 35.0,
        ],
    }
}

impl<T> FixedLagSmoother<T> {
    /// `latency` is clamped to [`MAX_LATENCY_FRAMES`], `blend` to [0, 1].
    pub fn new(latency: usize, blend: f64) -> Self {
        let latency = latency.min(MAX_LATENCY_FRAMES);
        Self {
            latency,
            blend: if blend.is_finite() {
                blend.clamp(0.0, 1.0)
            } else {
                0.0
            },
            past: VecDeque::new(),
            pending: VecDeque::new(),
        }
    }

    /// Adds an item with its raw pose; returns the items now complete, in order, with their
    /// smoothed poses and corrections.
    pub fn push(&mut self, raw: Pose, item: T) -> Vec<(Pose, Correction, T)> {
        self.pending.push_back((raw, item));
        let mut out = Vec::new();
        while self.pending.len() > self.latency {
            out.extend(self.emit_front());
        }
        out
    }

    /// Outputs everything waiting (end of stream or of a segment) and forgets the past.
    pub fn finish(&mut self) -> Vec<(Pose, Correction, T)> {
        let mut out = Vec::with_capacity(self.pending.len());
        while let Some(o) = self.emit_front() {
            out.push(o);
        }
        self.past.clear();
        out
    }

    fn emit_front(&mut self) -> Option<(Pose, Correction, T)> {
        let (raw, item) = self.pending.pop_front()?;
        let h = self.latency.min(self.past.len()).min(self.pending.len());
        let kernel = window(h);
        let n = self.past.len();
        let mut centre = Vector3::zeros();
        let mut turn = Vector3::zeros();
        let raw_inv = raw.rotation.inverse();
        for (k, w) in kernel.iter().enumerate() {
            // k − h frames from this one.
            let p = match k.cmp(&h) {
                std::cmp::Ordering::Less => &self.past[n - (h - k)],
                std::cmp::Ordering::Equal => &raw,
                std::cmp::Ordering::Greater => &self.pending[k - h - 1].0,
            };
            centre += p.translation.vector * *w;
            turn += (raw_inv * p.rotation).scaled_axis() * *w;
        }
        let t = raw.translation.vector + (centre - raw.translation.vector) * self.blend;
        let r = raw.rotation * UnitQuaternion::from_scaled_axis(turn * self.blend);
        let corr = Correction {
            translation: (t - raw.translation.vector).norm(),
            rotation_deg: (r.inverse() * raw.rotation).angle().to_degrees(),
        };
        self.past.push_back(raw);
        while self.past.len() > self.latency {
            self.past.pop_front();
        }
        Some((Pose::from_parts(t.into(), r), corr, item))
    }
}

/// How a [`StabilizedEngine`] smooths.
enum Smoothing {
    Causal(Stabilizer),
    FixedLag(FixedLagSmoother<FrameGeometry>),
}

/// A geometry engine whose output trajectory is stabilized. The filter starts afresh at each
/// new map segment (the poses before and after are in different frames) and lets frames
/// without a tracked pose through unchanged.
pub struct StabilizedEngine {
    inner: Box<dyn GeometryEngine>,
    smoothing: Smoothing,
    config: StabilizeConfig,
    segment: Option<u32>,
}

impl StabilizedEngine {
    pub fn new(inner: Box<dyn GeometryEngine>, config: StabilizeConfig) -> Self {
        Self {
            inner,
            smoothing: Self::smoothing(&config),
            config,
            segment: None,
        }
    }

    fn smoothing(config: &StabilizeConfig) -> Smoothing {
        if config.latency_frames == 0 {
            Smoothing::Causal(Stabilizer::new(config.clone()))
        } else {
            Smoothing::FixedLag(FixedLagSmoother::new(
                config.latency_frames,
                config.smoother_blend,
            ))
        }
    }

    fn set(g: &mut FrameGeometry, pose: Pose, corr: Correction) {
        g.world_from_cam = pose;
        g.stats.stabilize_translation = corr.translation;
        g.stats.stabilize_rotation_deg = corr.rotation_deg;
    }

    /// The smoother's finished items with their smoothed poses applied.
    fn released(
        items: Vec<(Pose, Correction, FrameGeometry)>,
    ) -> impl Iterator<Item = FrameGeometry> {
        items.into_iter().map(|(pose, corr, mut g)| {
            Self::set(&mut g, pose, corr);
            g
        })
    }

    fn apply(&mut self, geos: Vec<FrameGeometry>, end: bool) -> Vec<FrameGeometry> {
        let mut out = Vec::with_capacity(geos.len());
        for mut g in geos {
            let restart = !g.stats.tracked || self.segment != Some(g.stats.segment);
            if restart {
                match &mut self.smoothing {
                    Smoothing::Causal(f) => f.reset(),
                    Smoothing::FixedLag(s) => out.extend(Self::released(s.finish())),
                }
                self.segment = g.stats.tracked.then_some(g.stats.segment);
            }
            if !g.stats.tracked {
                out.push(g);
                continue;
            }
            match &mut self.smoothing {
                Smoothing::Causal(f) => {
                    let (pose, corr) = f.filter(g.timestamp, &g.world_from_cam);
                    Self::set(&mut g, pose, corr);
                    out.push(g);
                }
                Smoothing::FixedLag(s) => {
                    let raw = g.world_from_cam;
                    out.extend(Self::released(s.push(raw, g)));
                }
            }
        }
        if end {
            if let Smoothing::FixedLag(s) = &mut self.smoothing {
                out.extend(Self::released(s.finish()));
            }
        }
        out
    }
}

impl GeometryEngine for StabilizedEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn push(&mut self, frame: &Frame, flow: Option<&PairFlow>) -> Result<Vec<FrameGeometry>> {
        let geos = self.inner.push(frame, flow)?;
        Ok(self.apply(geos, false))
    }

    fn flush(&mut self) -> Result<Vec<FrameGeometry>> {
        let geos = self.inner.flush()?;
        Ok(self.apply(geos, true))
    }

    fn segments(&self) -> u32 {
        self.inner.segments()
    }

    fn relocalise_with(&mut self, relocaliser: crate::loop_closure::Relocaliser) {
        self.inner.relocalise_with(relocaliser);
    }

    fn snapshot(
        &self,
        path: &Path,
        next_source_index: u64,
        last_frame: Option<&Frame>,
    ) -> Result<bool> {
        self.inner.snapshot(path, next_source_index, last_frame)
    }

    fn take_resume_frame(&mut self) -> Option<Frame> {
        self.inner.take_resume_frame()
    }

    fn restore(&mut self, path: &Path) -> Result<u64> {
        self.smoothing = Self::smoothing(&self.config);
        self.segment = None;
        self.inner.restore(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GeometryStats;
    use nalgebra::Translation3;

    /// Filters a steady ramp (0.1 m/s along x, 30 fps, 300 frames) with ±4 mm alternating
    /// jitter: (raw squared-step energy, filtered squared-step energy, last filtered x).
    fn jittered_ramp(config: StabilizeConfig) -> (f64, f64, f64) {
        let mut f = Stabilizer::new(config);
        let (mut raw_hf, mut out_hf) = (0.0, 0.0);
        let mut prev: Option<(Vector3<f64>, Vector3<f64>)> = None;
        let mut last_out = Vector3::zeros();
        for i in 0..300 {
            let t = f64::from(i) / 30.0;
            let jitter = if i % 2 == 0 { 0.004 } else { -0.004 };
            let raw = Vector3::new(0.1 * t + jitter, 0.0, 0.0);
            let pose = Pose::from_parts(Translation3::from(raw), UnitQuaternion::identity());
            let o = f.filter(t, &pose).0.translation.vector;
            if let Some((pr, po)) = prev {
                raw_hf += (raw - pr).norm_squared();
                out_hf += (o - po).norm_squared();
            }
            prev = Some((raw, o));
            last_out = o;
        }
        (raw_hf, out_hf, last_out.x)
    }

    #[test]
    fn one_euro_damps_jitter_and_a_steady_motion_passes_with_little_lag() {
        let (raw_hf, out_hf, last_x) = jittered_ramp(StabilizeConfig {
            constant_velocity_gain: None,
            ..StabilizeConfig::default()
        });
        assert!(out_hf < 0.5 * raw_hf, "{out_hf} vs {raw_hf}");
        // Lag at the end: how many frames behind the steady motion the output is.
        let lag_frames = (0.1 * 299.0 / 30.0 - last_x) / (0.1 / 30.0);
        assert!(lag_frames < 2.0, "lag {lag_frames} frames");
    }

    #[test]
    fn constant_velocity_filter_follows_a_steady_motion_without_lag() {
        let (raw_hf, out_hf, last_x) = jittered_ramp(StabilizeConfig {
            constant_velocity_gain: Some(0.4),
            ..StabilizeConfig::default()
        });
        assert!(out_hf < 0.5 * raw_hf, "{out_hf} vs {raw_hf}");
        let lag_frames = (0.1 * 299.0 / 30.0 - last_x).abs() / (0.1 / 30.0);
        assert!(lag_frames < 0.5, "lag {lag_frames} frames");
    }

    #[test]
    fn fixed_lag_smoother_damps_jitter_and_follows_a_steady_motion_exactly() {
        for latency in [1, 2] {
            let mut s = FixedLagSmoother::new(latency, DEFAULT_SMOOTHER_BLEND);
            let (mut raw_hf, mut out_hf) = (0.0, 0.0);
            let mut raws = Vec::new();
            let mut outs = Vec::new();
            for i in 0..300 {
                let jitter = if i % 2 == 0 { 0.004 } else { -0.004 };
                let raw = Vector3::new(0.1 * f64::from(i) / 30.0 + jitter, 0.0, 0.0);
                raws.push(raw);
                let pose = Pose::from_parts(Translation3::from(raw), UnitQuaternion::identity());
                outs.extend(s.push(pose, i).into_iter().map(|(p, _, i)| (i, p)));
            }
            outs.extend(s.finish().into_iter().map(|(p, _, i)| (i, p)));
            assert_eq!(outs.len(), 300);
            assert!(outs.iter().enumerate().all(|(k, (i, _))| *i == k as i32));
            for k in 1..300 {
                raw_hf += (raws[k] - raws[k - 1]).norm_squared();
                out_hf += (outs[k].1.translation.vector - outs[k - 1].1.translation.vector)
                    .norm_squared();
            }
            assert!(
                out_hf < 0.5 * raw_hf,
                "latency {latency}: {out_hf} vs {raw_hf}"
            );
        }
        // Without jitter, a steady motion (and a steady turn) passes unchanged: no lag.
        let mut s = FixedLagSmoother::new(2, 1.0);
        let mut out = Vec::new();
        let path = |i: u32| {
            let t = f64::from(i);
            Pose::from_parts(
                Translation3::new(0.01 * t, 0.0, 0.02 * t),
                UnitQuaternion::from_scaled_axis(Vector3::y() * 0.01 * t),
            )
        };
        for i in 0..20 {
            out.extend(s.push(path(i), i));
        }
        out.extend(s.finish());
        for (p, _, i) in &out[2..18] {
            let d = p.inverse() * path(*i);
            assert!(d.translation.vector.norm() < 1e-12 && d.rotation.angle() < 1e-12);
        }
        // The two-frame window keeps a cubic path (a hand-held camera's real sway) where a
        // binomial window would round it off.
        let mut s = FixedLagSmoother::new(2, 1.0);
        let cubic = |i: u32| {
            let t = f64::from(i) - 10.0;
            Pose::from_parts(
                Translation3::new(1e-3 * t * t * t, 0.01 * t * t, 0.0),
                UnitQuaternion::identity(),
            )
        };
        let mut out = Vec::new();
        for i in 0..20 {
            out.extend(s.push(cubic(i), i));
        }
        out.extend(s.finish());
        for (p, _, i) in &out[2..18] {
            let err = (p.translation.vector - cubic(*i).translation.vector).norm();
            assert!(err < 1e-12, "frame {i}: {err}");
        }
    }

    /// Replays prepared geometry, one item per push.
    struct Replay(VecDeque<FrameGeometry>);

    impl GeometryEngine for Replay {
        fn name(&self) -> &'static str {
            "replay"
        }
        fn push(&mut self, _: &Frame, _: Option<&PairFlow>) -> Result<Vec<FrameGeometry>> {
            Ok(self.0.pop_front().into_iter().collect())
        }
        fn flush(&mut self) -> Result<Vec<FrameGeometry>> {
            Ok(self.0.drain(..).collect())
        }
        fn segments(&self) -> u32 {
            2
        }
    }

    #[test]
    fn stabilized_engine_restarts_at_each_segment_and_lets_untracked_frames_through() {
        // Segment 0 walks along x; frame 5 is untracked (pose far away); segment 1 walks along
        // z from a distant origin. Each piece is a straight line, so nothing may move unless
        // poses of different pieces are mixed.
        let geo = |index: u64, x: f64, z: f64, tracked: bool, segment: u32| FrameGeometry {
            index,
            timestamp: index as f64 / 30.0,
            world_from_cam: Pose::from_parts(
                Translation3::new(x, 0.0, z),
                UnitQuaternion::identity(),
            ),
            intrinsics: streamrecon_core::frame::Intrinsics::from_hfov(64, 48, 60.0),
            depth: None,
            confidence: None,
            stats: GeometryStats {
                tracked,
                segment,
                ..GeometryStats::default()
            },
            memory: None,
        };
        let mut items = VecDeque::new();
        for i in 0..5 {
            items.push_back(geo(i, 0.1 * i as f64, 0.0, true, 0));
        }
        items.push_back(geo(5, 50.0, 50.0, false, 0));
        for i in 6..12 {
            items.push_back(geo(i, 10.0, 0.1 * i as f64, true, 1));
        }
        let expected: Vec<Pose> = items.iter().map(|g| g.world_from_cam).collect();
        for latency in [0, 1, 2] {
            let mut e = StabilizedEngine::new(
                Box::new(Replay(items.clone())),
                StabilizeConfig {
                    latency_frames: latency,
                    ..StabilizeConfig::default()
                },
            );
            let frame = Frame {
                index: 0,
                source_index: 0,
                timestamp: 0.0,
                image: streamrecon_core::frame::RgbImage::new(64, 48),
                intrinsics: None,
                gt: None,
            };
            let mut out = Vec::new();
            for _ in 0..items.len() {
                out.extend(e.push(&frame, None).expect("push"));
            }
            out.extend(e.flush().expect("flush"));
            let order: Vec<u64> = out.iter().map(|g| g.index).collect();
            assert_eq!(order, (0..12).collect::<Vec<u64>>(), "latency {latency}");
            for g in &out {
                let d = g.world_from_cam.inverse() * expected[g.index as usize];
                // The causal filter needs a few frames to learn a segment's velocity.
                let tol = if latency == 0 { 0.05 } else { 1e-9 };
                assert!(
                    d.translation.vector.norm() <= tol,
                    "latency {latency}, frame {}: moved {}",
                    g.index,
                    d.translation.vector.norm()
                );
            }
        }
    }
}
