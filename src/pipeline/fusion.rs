//! The fusion stage: one bounded world point cloud from per-frame geometry.
//!
//! Confident depth pixels are lifted to world points and merged into a voxel grid (confidence-
//! weighted mean position and colour). A cap on voxels keeps memory bounded for endless streams:
//! past it, the least useful voxels (least evidence, longest unseen) are evicted. The final cloud
//! gets statistical outlier removal and normals, both from k-nearest neighbours (kiddo).

use hashbrown::HashMap;
use std::num::NonZero;

use kiddo::{ImmutableKdTree, SquaredEuclidean};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use streamrecon_core::cloud::{pca_normal, PointCloud};
use streamrecon_core::frame::RgbImage;
use streamrecon_geometry::FrameGeometry;

/// Fusion parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FusionConfig {
    /// Voxel edge, world units.
    pub voxel: f32,
    /// Depth pixels below this confidence are ignored.
    pub min_confidence: f32,
    /// Use every n-th pixel in x and y.
    pub pixel_stride: usize,
    /// Most voxels kept. Bounded memory: the table is sized at the first frame for the cap plus
    /// a frame's pixels, at 2.3–4.6 buckets a voxel (a power of two) of 45 bytes; at the default
    /// 1.5 M and frames up to 1280×720, 4 Mi buckets, 180 MiB.
    pub max_points: usize,
    /// Neighbours for outlier removal and normals.
    pub neighbours: usize,
    /// Points farther than mean + ratio·std of neighbour distances are outliers.
    pub outlier_std_ratio: f32,
}

impl Default for FusionConfig {
    fn default() -> Self {
        Self {
            voxel: 0.01,
            min_confidence: 0.5,
            pixel_stride: 2,
            max_points: 1_500_000,
            neighbours: 16,
            outlier_std_ratio: 2.0,
        }
    }
}

/// The first bytes of a saved cloud ([`Fusion::to_bytes`]).
const STATE_MAGIC: &[u8; 4] = b"SRF1";
/// Bytes before the voxels in a saved cloud: magic, frame, voxel edge, evicted, count.
const STATE_HEADER: usize = 4 + 8 + 4 + 8 + 8;
/// Bytes of one voxel in a saved cloud: key 3 × i32, position, colour 3 × f32 each, weight f32,
/// last frame seen u32.
const VOXEL_BYTES: usize = 44;

#[derive(Clone, Copy)]
struct Voxel {
    pos: [f32; 3],
    color: [f32; 3],
    weight: f32,
    /// Frame index, wrapped to 32 bits: with the key, 44 bytes a voxel instead of 56; only
    /// differences matter (eviction's age), and 2^32 frames are 4.5 years at 30 frames/s.
    last_seen: u32,
}

/// The world cloud under construction.
pub struct Fusion {
    config: FusionConfig,
    /// Keyed by voxel coordinates; foldhash, not SipHash: keys are not attacker-chosen and the
    /// map is probed for every confident pixel of every frame. A fixed seed keeps eviction order
    /// the same from run to run.
    voxels: HashMap<[i32; 3], Voxel, foldhash::fast::FixedState>,
    /// The most voxels `voxels` was sized for (`size_table`).
    sized_for: usize,
    evicted: u64,
}

/// The points a frame contributed (decimated; for live display).
#[derive(Debug, Clone, Default)]
pub struct FramePoints {
    pub points: Vec<[f32; 3]>,
    pub colors: Vec<[u8; 3]>,
}

impl Fusion {
    pub fn new(config: FusionConfig) -> Self {
        Self {
            config,
            voxels: HashMap::with_hasher(foldhash::fast::FixedState::default()),
            sized_for: 0,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.voxels.len()
    }

    /// Bytes the voxel table holds (memory benchmarks and tests).
    pub fn table_bytes(&self) -> usize {
        self.voxels.allocation_size()
    }

    pub fn is_empty(&self) -> bool {
        self.voxels.is_empty()
    }

    /// Voxels evicted so far to stay under the cap.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// The cloud's state as bytes, for a snapshot taken when the frames before `next` are in
    /// it: a header (magic, `next`, voxel edge, voxels evicted, count), then each voxel's key,
    /// position, colour, weight and last frame seen, little-endian.
    pub fn to_bytes(&self, next: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_HEADER + self.voxels.len() * VOXEL_BYTES);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&next.to_le_bytes());
        out.extend_from_slice(&self.config.voxel.to_le_bytes());
        out.extend_from_slice(&self.evicted.to_le_bytes());
        out.extend_from_slice(&(self.voxels.len() as u64).to_le_bytes());
        for (k, v) in &self.voxels {
            for c in k {
                out.extend_from_slice(&c.to_le_bytes());
            }
            for f in v.pos.iter().chain(&v.color).chain([&v.weight]) {
                out.extend_from_slice(&f.to_le_bytes());
            }
            out.extend_from_slice(&v.last_seen.to_le_bytes());
        }
        out
    }

    /// The frame a saved cloud ([`Fusion::to_bytes`]) was saved at, if these are such bytes.
    pub fn saved_at(bytes: &[u8]) -> Option<u64> {
        if bytes.len() < 12 || &bytes[..4] != STATE_MAGIC {
            return None;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[4..12]);
        Some(u64::from_le_bytes(b))
    }

    /// Takes back a cloud saved by [`Fusion::to_bytes`] at `next` with the same voxel edge;
    /// returns its voxels.
    ///
    /// # Errors
    /// Not such a state, another frame or voxel edge, or cut short: the message says which.
    pub fn restore(&mut self, bytes: &[u8], next: u64) -> Result<usize, String> {
        let header = STATE_HEADER;
        let saved_next = Self::saved_at(bytes)
            .filter(|_| bytes.len() >= header)
            .ok_or("not a saved cloud")?;
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let f32_at =
            |i: usize| f32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if saved_next != next {
            return Err(format!("saved at frame {saved_next}, not {next}"));
        }
        // The same edge, bit for bit: a cloud from another grid would merge wrongly.
        if f32_at(12).to_bits() != self.config.voxel.to_bits() {
            return Err(format!(
                "voxel edge {} against {}",
                f32_at(12),
                self.config.voxel
            ));
        }
        let evicted = u64_at(16);
        let count = usize::try_from(u64_at(24)).map_err(|e| e.to_string())?;
        if count
            .checked_mul(VOXEL_BYTES)
            .and_then(|n| n.checked_add(header))
            != Some(bytes.len())
        {
            return Err(format!(
                "{count} voxels need {} bytes, got {}",
                count.saturating_mul(VOXEL_BYTES).saturating_add(header),
                bytes.len()
            ));
        }
        self.voxels.clear();
        self.voxels.reserve(count);
        for r in bytes[header..].chunks_exact(VOXEL_BYTES) {
            let i32_at = |i: usize| i32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            let f = |i: usize| f32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            self.voxels.insert(
                [i32_at(0), i32_at(4), i32_at(8)],
                Voxel {
                    pos: [f(12), f(16), f(20)],
                    color: [f(24), f(28), f(32)],
                    weight: f(36),
                    last_seen: u32::from_le_bytes([r[40], r[41], r[42], r[43]]),
                },
            );
        }
        self.evicted = evicted;
        Ok(count)
    }

    /// Merges a frame's confident depth into the cloud; returns its new points for display.
    pub fn integrate(&mut self, geom: &FrameGeometry, image: &RgbImage) -> FramePoints {
        let (Some(depth), Some(conf)) = (&geom.depth, &geom.confidence) else {
            return FramePoints::default();
        };
        let intr = &geom.intrinsics;
        let (w, h) = (intr.width as usize, intr.height as usize);
        if depth.len() != w * h || image.width() as usize != w || image.height() as usize != h {
            return FramePoints::default();
        }
        let s = self.config.pixel_stride.max(1);
        self.size_table(w.div_ceil(s) * h.div_ceil(s));
        // Wrapped (see `Voxel::last_seen`).
        let now = geom.index as u32;
        let inv = 1.0 / self.config.voxel;
        // Two passes: the points (arithmetic), then the voxel updates. Kept apart, the update
        // loop is small enough for the CPU to overlap its cache misses into the table.
        let mut out = FramePoints::default();
        let mut weights = Vec::new();
        let rot = geom
            .world_from_cam
            .rotation
            .to_rotation_matrix()
            .into_inner();
        let t = geom.world_from_cam.translation.vector;
        let (ifx, ify) = (1.0 / intr.fx, 1.0 / intr.fy);
        for y in (0..h).step_by(s) {
            let yn = (y as f64 - intr.cy) * ify;
            for x in (0..w).step_by(s) {
                let i = y * w + x;
                let (z, c) = (depth[i], conf[i]);
                if !(z > 0.0 && z.is_finite() && c >= self.config.min_confidence) {
                    continue;
                }
                let z = f64::from(z);
                let p = rot * nalgebra::Vector3::new((x as f64 - intr.cx) * ifx * z, yn * z, z) + t;
                out.points.push([p.x as f32, p.y as f32, p.z as f32]);
                out.colors.push(image.get_pixel(x as u32, y as u32).0);
                weights.push(c);
            }
        }
        for ((p, rgb), &c) in out.points.iter().zip(&out.colors).zip(&weights) {
            let key = [
                (p[0] * inv).floor() as i32,
                (p[1] * inv).floor() as i32,
                (p[2] * inv).floor() as i32,
            ];
            let col = [f32::from(rgb[0]), f32::from(rgb[1]), f32::from(rgb[2])];
            let v = self.voxels.entry(key).or_insert(Voxel {
                pos: [0.0; 3],
                color: [0.0; 3],
                weight: 0.0,
                last_seen: now,
            });
            let nw = v.weight + c;
            let r = 1.0 / nw;
            for k in 0..3 {
                v.pos[k] = (v.pos[k] * v.weight + p[k] * c) * r;
                v.color[k] = (v.color[k] * v.weight + col[k] * c) * r;
            }
            v.weight = nw;
            v.last_seen = now;
        }
        self.enforce_cap(now);
        out
    }

    /// Sizes the table, once, for the most voxels it will ever hold: the cap plus one frame
    /// of new ones, the point at which `enforce_cap` evicts.
    ///
    /// Evictions leave tombstones, and a table that runs out of room rehashes in place only
    /// while at most 7/16 full (half its capacity); fuller, it doubles, at a random later frame
    /// (seen in benches/pipeline.rs, and at frame 250 of `the_voxel_table_never_grows` in
    /// tests/fusion.rs when the table was sized only as eviction began). So it
    /// gets that much room from the start: its memory is then the same from the first frame to
    /// the last, and a stream that outgrows the machine fails at once, not hours in.
    fn size_table(&mut self, frame_voxels: usize) {
        let most = self.config.max_points.max(1).saturating_add(frame_voxels);
        if most > self.sized_for {
            let room = most.saturating_mul(2);
            // A cap beyond this machine's memory: the table grows as the cloud does instead.
            if let Err(e) = self
                .voxels
                .try_reserve(room.saturating_sub(self.voxels.len()))
            {
                log::warn!(
                    "fusion: no memory for a table of {room} voxels ({e:?}); it will grow as needed"
                );
            }
            self.sized_for = most;
        }
    }

    /// Evicts a tenth of the cap once it is exceeded: lowest weight, discounted by time unseen.
    fn enforce_cap(&mut self, now: u32) {
        let cap = self.config.max_points.max(1);
        if self.voxels.len() <= cap {
            return;
        }
        let target = cap - cap / 10;
        // Frames since last seen; across the 32-bit wrap too, and 0 for a frame integrated out
        // of order.
        let age = |v: &Voxel| (now.wrapping_sub(v.last_seen) as i32).max(0);
        let score = |v: &Voxel| v.weight / (1.0 + age(v) as f32 / 100.0);
        let mut scores: Vec<f32> = self.voxels.values().map(score).collect();
        let drop = self.voxels.len() - target;
        let (_, &mut threshold, _) = scores.select_nth_unstable_by(drop, f32::total_cmp);
        let before = self.voxels.len();
        self.voxels.retain(|_, v| score(v) >= threshold);
        // Ties at the threshold may keep a few too many; trim them arbitrarily but deterministically.
        if self.voxels.len() > target {
            let mut keys: Vec<[i32; 3]> = self
                .voxels
                .iter()
                .filter(|(_, v)| score(v).total_cmp(&threshold).is_eq())
                .map(|(k, _)| *k)
                .collect();
            keys.sort_unstable();
            for k in keys.into_iter().take(self.voxels.len() - target) {
                self.voxels.remove(&k);
            }
        }
        self.evicted += (before - self.voxels.len()) as u64;
    }

    /// At most `max` of the cloud's points, evenly taken in the table's order (which is stable
    /// between calls while the cloud does not change), with their colours: a view of the whole
    /// map for the viewer, cheaper than [`Fusion::cloud`] (no sort).
    pub fn sample(&self, max: usize) -> FramePoints {
        let step = self.voxels.len().div_ceil(max.max(1)).max(1);
        let (points, colors) = self
            .voxels
            .values()
            .step_by(step)
            .map(|v| (v.pos, v.color.map(|c| c.round() as u8)))
            .unzip();
        FramePoints { points, colors }
    }

    /// The current cloud (sorted by voxel for deterministic output), with confidence = weight.
    pub fn cloud(&self) -> PointCloud {
        self.cloud_moved(None)
    }

    /// [`Self::cloud`] with each point moved by `moved(frame, point)`, `frame` the last frame
    /// that saw its voxel (wrapped to 32 bits).
    fn cloud_moved(&self, moved: Option<&dyn Fn(u32, [f32; 3]) -> [f32; 3]>) -> PointCloud {
        let mut entries: Vec<(&[i32; 3], &Voxel)> = self.voxels.iter().collect();
        entries.sort_unstable_by_key(|(k, _)| **k);
        PointCloud {
            points: entries
                .iter()
                .map(|(_, v)| moved.map_or(v.pos, |m| m(v.last_seen, v.pos)))
                .collect(),
            colors: Some(
                entries
                    .iter()
                    .map(|(_, v)| {
                        [
                            v.color[0].round() as u8,
                            v.color[1].round() as u8,
                            v.color[2].round() as u8,
                        ]
                    })
                    .collect(),
            ),
            confidence: Some(entries.iter().map(|(_, v)| v.weight).collect()),
            normals: None,
        }
    }

    /// The final cloud: outliers removed and normals estimated, from one k-nearest-neighbour
    /// query per point (see [`without_outliers_with_normals`]).
    pub fn finished_cloud(&self) -> PointCloud {
        self.finished_from(&self.cloud())
    }

    /// [`Self::finished_cloud`] of the points moved by `moved(frame, point)` first (loop
    /// closure's corrections: each point follows the last frame that saw it).
    pub fn finished_cloud_moved(&self, moved: &dyn Fn(u32, [f32; 3]) -> [f32; 3]) -> PointCloud {
        self.finished_from(&self.cloud_moved(Some(moved)))
    }

    fn finished_from(&self, cloud: &PointCloud) -> PointCloud {
        without_outliers_with_normals(cloud, self.config.neighbours, self.config.outlier_std_ratio)
    }
}

/// Drops points whose mean distance to their `k` nearest neighbours exceeds mean + `std_ratio`·std.
pub fn remove_statistical_outliers(cloud: &PointCloud, k: usize, std_ratio: f32) -> PointCloud {
    if cloud.len() <= k + 1 {
        return cloud.clone();
    }
    let mean_d = knn_mean_distances(&cloud.points, k);
    let limit = outlier_limit(&mean_d, std_ratio);
    let keep: Vec<usize> = (0..cloud.len())
        .filter(|&i| f64::from(mean_d[i]) <= limit)
        .collect();
    cloud.retain_indices(&keep)
}

/// Mean + `std_ratio`·std of the neighbour distances: the outlier threshold.
fn outlier_limit(mean_d: &[f32], std_ratio: f32) -> f64 {
    let n = mean_d.len() as f64;
    let mu = mean_d.iter().map(|&d| f64::from(d)).sum::<f64>() / n;
    let var = mean_d
        .iter()
        .map(|&d| (f64::from(d) - mu).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    mu + f64::from(std_ratio) * var.sqrt()
}

/// [`remove_statistical_outliers`] then [`with_normals`], from one k-d tree and one query of the
/// `k` + 1 nearest points each (the final cloud of a long run has ~10⁵ points; two trees and two
/// queries took ~0.4 s, 5 % of a 200-frame run). A kept point's normal comes from the kept
/// points among its `k` nearest, itself included: the points [`with_normals`] would use
/// unless an outlier is among them.
pub fn without_outliers_with_normals(cloud: &PointCloud, k: usize, std_ratio: f32) -> PointCloud {
    if cloud.len() <= k + 1 {
        return with_normals(cloud.clone(), k);
    }
    let pts = &cloud.points;
    let Some((neighbours, mean_d)) = neighbours_and_mean_distances(pts, k) else {
        return with_normals(cloud.clone(), k);
    };
    let limit = outlier_limit(&mean_d, std_ratio);
    let kept: Vec<bool> = mean_d.iter().map(|&d| f64::from(d) <= limit).collect();
    let keep: Vec<usize> = (0..pts.len()).filter(|&i| kept[i]).collect();
    let normals = keep
        .par_iter()
        .map(|&i| {
            // The k nearest, itself included, as `with_normals` takes them.
            let near = neighbours[i][..k.min(neighbours[i].len())]
                .iter()
                .map(|&j| j as usize)
                .filter(|&j| kept[j]);
            pca_normal(near.map(|j| pts[j].map(f64::from))).map(|v| v as f32)
        })
        .collect();
    let mut out = cloud.retain_indices(&keep);
    out.normals = Some(normals);
    out
}

/// Mean Euclidean distance of each point to its `k` nearest other points.
pub fn knn_mean_distances(points: &[[f32; 3]], k: usize) -> Vec<f32> {
    neighbours_and_mean_distances(points, k).map_or_else(|| vec![0.0; points.len()], |(_, d)| d)
}

/// Per point: the indices of its `k` + 1 nearest points (itself first) and its mean distance to
/// the `k` others; `None` when no k-d tree can be built.
fn neighbours_and_mean_distances(
    points: &[[f32; 3]],
    k: usize,
) -> Option<(Vec<Vec<u32>>, Vec<f32>)> {
    let tree = ImmutableKdTree::<f32, 3>::new_from_slice(points).ok()?;
    let kk = NonZero::new(k + 1).expect("k + 1 > 0");
    Some(
        points
            .par_iter()
            .map(|p| {
                let nn = tree
                    .query(p)
                    .nearest_n::<SquaredEuclidean<f32>>(kk)
                    .execute();
                let ds: Vec<f32> = nn.iter().skip(1).map(|r| r.distance.sqrt()).collect();
                let mean = if ds.is_empty() {
                    0.0
                } else {
                    ds.iter().sum::<f32>() / ds.len() as f32
                };
                (nn.iter().map(|r| r.item).collect(), mean)
            })
            .unzip(),
    )
}

/// Estimates normals by PCA over the `k` nearest neighbours (smallest-eigenvalue direction).
pub fn with_normals(mut cloud: PointCloud, k: usize) -> PointCloud {
    if cloud.len() < 3 {
        cloud.normals = Some(vec![[0.0, 0.0, 1.0]; cloud.len()]);
        return cloud;
    }
    // The k nearest, the point itself included.
    let Some((neighbours, _)) =
        neighbours_and_mean_distances(&cloud.points, k.min(cloud.len()).saturating_sub(1))
    else {
        return cloud;
    };
    let pts = &cloud.points;
    let normals = neighbours
        .par_iter()
        .map(|near| {
            let n = pca_normal(near.iter().map(|&j| pts[j as usize].map(f64::from)));
            n.map(|v| v as f32)
        })
        .collect();
    cloud.normals = Some(normals);
    cloud
}
