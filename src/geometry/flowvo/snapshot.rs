//! flowvo's snapshots: the whole map (tracks with their points and recent observations, recent
//! poses, the dense flow chains, keyframe and novelty state) and the last frame, so that a
//! resumed stream continues the same map segment. The last frame goes through the resumed run's
//! flow stage first, which links the first new frame to the map by flow.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use nalgebra::Point3;
use serde::{Deserialize, Serialize};

use super::{Chain, FlowVo, Phase, Track};
use crate::novelty::NoveltyState;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{pose_from_array, pose_to_array, Frame, Intrinsics, Pose};

/// The snapshot's `meta.json` owner.
#[derive(Serialize, Deserialize)]
struct FlowVoState {
    next_source_index: u64,
    segment: u32,
    median_depth: f64,
    /// world_from_cam of the last posed frame ([`pose_to_array`]).
    last_pose: [f64; 7],
    /// The map; absent before the first frame, and in snapshots of earlier versions (those
    /// resume as a new segment at `last_pose`).
    #[serde(default)]
    map: Option<MapState>,
    /// Per segment, the earlier one a relocalisation rejoined it to (absent in snapshots of
    /// earlier versions: none).
    #[serde(default)]
    joined: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct MapState {
    intrinsics: Intrinsics,
    tracks: Vec<TrackState>,
    poses: Vec<(u64, [f64; 7])>,
    /// The reference frame while the segment's map initialises. The frames held back then
    /// are not kept: a snapshot takes effect only once they are in the outputs.
    initialising_from: Option<u64>,
    segment_origin: [f64; 7],
    last_index: u64,
    keyframe_base: usize,
    recent_steps: Vec<f64>,
    novelty_weights: Vec<(u64, f64)>,
    novelty: NoveltyState,
    /// Keyframes of the two chains (their data are the `chain_old` and `chain_new` tensors).
    chain_old: Option<u64>,
    chain_new: Option<u64>,
    /// The last frame (its image is the `last_frame` tensor, H×W×3 u8).
    last_frame: Option<LastFrame>,
}

#[derive(Serialize, Deserialize)]
struct TrackState {
    x: f32,
    y: f32,
    point: Option<[f64; 3]>,
    angle: f64,
    obs: Vec<(u64, f32, f32)>,
    mapped_at_keyframe: bool,
}

#[derive(Serialize, Deserialize)]
struct LastFrame {
    index: u64,
    source_index: u64,
    timestamp: f64,
    intrinsics: Option<Intrinsics>,
}

impl FlowVo {
    pub(super) fn write_snapshot(
        &self,
        path: &std::path::Path,
        next: u64,
        last_frame: Option<&Frame>,
    ) -> Result<()> {
        let last = self.last_pose();
        let mut tensors = HashMap::new();
        let map = match (self.started, self.intrinsics, self.last_index) {
            (true, Some(intrinsics), Some(last_index)) => {
                for (name, chain) in [
                    ("chain_old", &self.chain_old),
                    ("chain_new", &self.chain_new),
                ] {
                    if let Some(c) = chain {
                        let t = Tensor::from_slice(&c.data, c.data.len(), &Device::Cpu)?;
                        tensors.insert(name.to_string(), t);
                    }
                }
                // The last frame only when it is the one the map last tracked.
                let last_frame = last_frame.filter(|f| f.index == last_index);
                let last_frame_state = last_frame.map(|f| LastFrame {
                    index: f.index,
                    source_index: f.source_index,
                    timestamp: f.timestamp,
                    intrinsics: f.intrinsics,
                });
                if let Some(f) = last_frame {
                    let (w, h) = (f.width() as usize, f.height() as usize);
                    let t = Tensor::from_slice(f.image.as_raw(), (h, w, 3), &Device::Cpu)?;
                    tensors.insert("last_frame".to_string(), t);
                }
                Some(MapState {
                    intrinsics,
                    tracks: self
                        .tracks
                        .iter()
                        .map(|t| TrackState {
                            x: t.x,
                            y: t.y,
                            point: t.point.map(|p| [p.x, p.y, p.z]),
                            angle: t.angle,
                            obs: t.obs.iter().copied().collect(),
                            mapped_at_keyframe: t.mapped_at_keyframe,
                        })
                        .collect(),
                    poses: self
                        .poses
                        .iter()
                        .map(|(&f, p)| (f, pose_to_array(p)))
                        .collect(),
                    initialising_from: match &self.phase {
                        Phase::Initializing { reference, .. } => Some(*reference),
                        Phase::Tracking => None,
                    },
                    segment_origin: pose_to_array(&self.segment_origin),
                    last_index,
                    keyframe_base: self.keyframe_base,
                    recent_steps: self.recent_steps.iter().copied().collect(),
                    novelty_weights: self.novelty_weights.iter().map(|(&f, &w)| (f, w)).collect(),
                    novelty: self.novelty.state(),
                    chain_old: self.chain_old.as_ref().map(|c| c.key),
                    chain_new: self.chain_new.as_ref().map(|c| c.key),
                    last_frame: last_frame_state,
                })
            }
            _ => None,
        };
        let state = FlowVoState {
            next_source_index: next,
            segment: self.segment,
            median_depth: self.median_depth,
            last_pose: pose_to_array(&last),
            map,
            joined: self.joined.clone(),
        };
        let owner = serde_json::to_value(&state).map_err(|e| Error::Geometry(e.to_string()))?;
        super::super::write_snapshot(
            path,
            &serde_json::json!({ "engine": "flowvo", "owner": owner }),
            tensors,
        )
    }

    pub(super) fn restore_snapshot(&mut self, path: &std::path::Path) -> Result<u64> {
        let (meta, tensors) = super::super::read_snapshot(path)?;
        if meta["engine"] != "flowvo" {
            return Err(Error::format(path, "not a flowvo snapshot"));
        }
        let bad = |what: &str| Error::format(path, format!("flowvo snapshot: {what}"));
        let s: FlowVoState =
            serde_json::from_value(meta["owner"].clone()).map_err(|e| bad(&e.to_string()))?;
        let last = pose_from_array(s.last_pose).ok_or_else(|| bad("a non-finite pose"))?;
        if !(s.median_depth.is_finite() && s.median_depth > 0.0) {
            return Err(bad("a median depth that is not positive"));
        }
        self.median_depth = s.median_depth;
        // Each segment rejoined to an earlier one (or itself), so following them ends.
        if s.joined.iter().enumerate().any(|(i, &p)| p as usize > i) {
            return Err(bad("a segment rejoined to a later one"));
        }
        self.joined = s.joined;
        let Some(map) = s.map else {
            // No map kept: the next frame starts a new segment where the last one ended, at
            // the same scale.
            self.segment_origin = last;
            self.segment = s.segment + 1;
            self.started = false;
            log::info!(
                "flowvo: resuming as map segment {} at frame {}",
                self.segment,
                s.next_source_index
            );
            return Ok(s.next_source_index);
        };
        self.restore_map(map, &tensors, &bad)?;
        self.segment = s.segment;
        log::info!(
            "flowvo: resuming map segment {} at frame {} ({} tracks)",
            self.segment,
            s.next_source_index,
            self.tracks.len()
        );
        Ok(s.next_source_index)
    }

    fn restore_map(
        &mut self,
        map: MapState,
        tensors: &HashMap<String, Tensor>,
        bad: &dyn Fn(&str) -> Error,
    ) -> Result<()> {
        let k = map.intrinsics;
        let (w, h) = (k.width as usize, k.height as usize);
        let pose = |a: [f64; 7]| pose_from_array(a).ok_or_else(|| bad("a non-finite pose"));
        let chain = |name: &str, key: Option<u64>| -> Result<Option<Chain>> {
            let Some(key) = key else { return Ok(None) };
            let data: Vec<f32> = tensors
                .get(name)
                .ok_or_else(|| bad(&format!("no {name}")))?
                .to_vec1()
                .map_err(|e| bad(&e.to_string()))?;
            if data.len() != w * h * 3 {
                return Err(bad(&format!("{name} is not {w}x{h}")));
            }
            Ok(Some(Chain::from_data(key, data)))
        };
        let last_frame = match (map.last_frame, tensors.get("last_frame")) {
            (Some(f), Some(t)) => {
                let bytes: Vec<u8> = t
                    .flatten_all()
                    .and_then(|t| t.to_vec1())
                    .map_err(|e| bad(&e.to_string()))?;
                let image = image::RgbImage::from_raw(k.width, k.height, bytes)
                    .ok_or_else(|| bad("the last frame is not the stream's size"))?;
                Some(Frame {
                    index: f.index,
                    source_index: f.source_index,
                    timestamp: f.timestamp,
                    image,
                    intrinsics: f.intrinsics,
                    gt: None,
                })
            }
            _ => None,
        };
        let mut tracks = Vec::with_capacity(map.tracks.len());
        for t in map.tracks {
            let point = t.point.map(Point3::from);
            if !(t.x.is_finite() && t.y.is_finite())
                || point.is_some_and(|p| !p.coords.iter().all(|v| v.is_finite()))
            {
                return Err(bad("a track that is not finite"));
            }
            tracks.push(Track {
                x: t.x,
                y: t.y,
                point,
                angle: t.angle,
                obs: t.obs.into(),
                mapped_at_keyframe: t.mapped_at_keyframe,
            });
        }
        let poses: BTreeMap<u64, Pose> = map
            .poses
            .into_iter()
            .map(|(f, a)| Ok((f, pose(a)?)))
            .collect::<Result<_>>()?;
        self.chain_old = chain("chain_old", map.chain_old)?;
        self.chain_new = chain("chain_new", map.chain_new)?;
        self.intrinsics = Some(k);
        self.tracks = tracks;
        self.poses = poses;
        self.phase = match map.initialising_from {
            Some(reference) => Phase::Initializing {
                reference,
                pending: Vec::new(),
            },
            None => Phase::Tracking,
        };
        self.segment_origin = pose(map.segment_origin)?;
        self.last_index = Some(map.last_index);
        self.keyframe_base = map.keyframe_base;
        self.recent_steps = map.recent_steps.into();
        self.novelty_weights = map.novelty_weights.into_iter().collect();
        self.novelty.restore(map.novelty);
        self.started = true;
        self.resume_frame = last_frame.filter(|f| f.index == map.last_index);
        if self.resume_frame.is_none() {
            log::warn!("flowvo snapshot without its last frame: the map continues without flow into the next frame");
        }
        Ok(())
    }
}
