//! Procedural, tileable, mipmapped surface textures.
//!
//! Textures are generated once per scene and sampled trilinearly with a mip level chosen from the
//! pixel's footprint on the surface, so distant surfaces are band-limited (no aliasing) at the cost
//! of four texel reads per level.

use rand::{Rng, SeedableRng};

/// Texels per tile side.
const TILE: usize = 512;
/// Metres covered by one tile side.
const TILE_METRES: f32 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Noise,
    Stripes,
    Checker,
    Gradient,
    Marble,
}

pub const PATTERNS: [Pattern; 5] = [
    Pattern::Noise,
    Pattern::Stripes,
    Pattern::Checker,
    Pattern::Gradient,
    Pattern::Marble,
];

/// Frequency of the detail layer relative to the base layer.
const DETAIL_SCALE: f32 = 9.0;
/// Contrast of the detail layer.
const DETAIL_GAIN: f32 = 1.2;

/// A mipmapped RGB texture, level 0 = `TILE`×`TILE`.
pub struct Texture {
    /// RGB in 1/255 steps, padded to 4 bytes per texel.
    levels: Vec<Vec<[u8; 4]>>,
    /// Mean luminance (the 1×1 mip level).
    mean: f32,
}

/// `floor` without a libm call (the baseline x86-64 target has no SSE4.1 `roundss`).
#[inline]
fn fast_floor(x: f32) -> f32 {
    let i = x as i64 as f32;
    if i > x {
        i - 1.0
    } else {
        i
    }
}

#[inline]
fn hash(x: u32, y: u32, seed: u32) -> f32 {
    let mut h =
        x.wrapping_mul(0x8da6_b343) ^ y.wrapping_mul(0xd816_3841) ^ seed.wrapping_mul(0xcb1a_b31f);
    h ^= h >> 13;
    h = h.wrapping_mul(0x5bd1_e995);
    h ^= h >> 15;
    (h & 0x00ff_ffff) as f32 / 16_777_216.0
}

/// Tileable value noise with `cells` lattice cells across the tile; (u, v) in [0, 1).
#[inline]
fn value_noise(u: f32, v: f32, cells: u32, seed: u32) -> f32 {
    let x = u * cells as f32;
    let y = v * cells as f32;
    let (xi, yi) = (x.floor(), y.floor());
    let (fx, fy) = (x - xi, y - yi);
    let sx = fx * fx * (3.0 - 2.0 * fx);
    let sy = fy * fy * (3.0 - 2.0 * fy);
    let x0 = (xi as i64).rem_euclid(i64::from(cells)) as u32;
    let y0 = (yi as i64).rem_euclid(i64::from(cells)) as u32;
    let x1 = (x0 + 1) % cells;
    let y1 = (y0 + 1) % cells;
    let a = hash(x0, y0, seed);
    let b = hash(x1, y0, seed);
    let c = hash(x0, y1, seed);
    let d = hash(x1, y1, seed);
    let top = a + (b - a) * sx;
    let bot = c + (d - c) * sx;
    top + (bot - top) * sy
}

/// Fractal sum of value noise over `octaves` octaves starting at `cells` cells per tile, in [0, 1].
fn fbm(u: f32, v: f32, cells: u32, octaves: u32, seed: u32) -> f32 {
    let (mut sum, mut amp, mut norm, mut c) = (0.0, 1.0, 0.0, cells);
    for o in 0..octaves {
        sum += amp * value_noise(u, v, c, seed.wrapping_add(o * 7919));
        norm += amp;
        amp *= 0.55;
        c *= 2;
    }
    sum / norm
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

impl Texture {
    /// Generates a texture of `pattern` with colours drawn from `seed`.
    pub fn generate(pattern: Pattern, seed: u64) -> Self {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
        let mut colour = || -> [f32; 3] {
            [
                rng.random_range(0.1..0.95),
                rng.random_range(0.1..0.95),
                rng.random_range(0.1..0.95),
            ]
        };
        let (c0, c1, c2) = (colour(), colour(), colour());
        let s = seed as u32;
        let mut base = vec![[0.0f32; 3]; TILE * TILE];
        for y in 0..TILE {
            for x in 0..TILE {
                let u = (x as f32 + 0.5) / TILE as f32;
                let v = (y as f32 + 0.5) / TILE as f32;
                // Fine detail everywhere so no surface is textureless.
                let fine = fbm(u, v, 16, 5, s ^ 0x55);
                let c = match pattern {
                    Pattern::Noise => mix(c0, c1, fbm(u, v, 4, 6, s)),
                    Pattern::Stripes => {
                        let w = fbm(u, v, 4, 3, s);
                        let t = 0.5 + 0.5 * (std::f32::consts::TAU * (6.0 * u + 1.5 * w)).sin();
                        mix(c0, c1, t)
                    }
                    Pattern::Checker => {
                        let k = ((u * 8.0) as u32 + (v * 8.0) as u32) % 2;
                        let t = if k == 0 { 0.2 } else { 0.8 };
                        mix(c0, c1, t + 0.2 * (fbm(u, v, 8, 3, s) - 0.5))
                    }
                    Pattern::Gradient => {
                        let g = 0.5 - 0.5 * (std::f32::consts::TAU * u).cos();
                        mix(mix(c0, c1, g), c2, 0.6 * fbm(u, v, 8, 4, s))
                    }
                    Pattern::Marble => {
                        let w = fbm(u, v, 4, 5, s);
                        let t =
                            0.5 + 0.5 * (std::f32::consts::TAU * (3.0 * (u + v) + 4.0 * w)).sin();
                        mix(mix(c0, c2, t), c1, 0.3 * w)
                    }
                };
                let m = 0.75 + 0.5 * fine;
                base[y * TILE + x] = [
                    (c[0] * m).min(1.0),
                    (c[1] * m).min(1.0),
                    (c[2] * m).min(1.0),
                ];
            }
        }
        let mut levels = vec![base];
        let mut size = TILE;
        while size > 1 {
            let prev = levels.last().expect("at least one level");
            let half = size / 2;
            let mut next = vec![[0.0f32; 3]; half * half];
            for y in 0..half {
                for x in 0..half {
                    let mut acc = [0.0f32; 3];
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let p = prev[(2 * y + dy) * size + 2 * x + dx];
                        for k in 0..3 {
                            acc[k] += 0.25 * p[k];
                        }
                    }
                    next[y * half + x] = acc;
                }
            }
            levels.push(next);
            size = half;
        }
        let top = levels.last().expect("at least one level")[0];
        let mean = (top[0] + top[1] + top[2]) / 3.0;
        let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
        let levels = levels
            .into_iter()
            .map(|l| {
                l.into_iter()
                    .map(|c| [q(c[0]), q(c[1]), q(c[2]), 0])
                    .collect()
            })
            .collect();
        Self { levels, mean }
    }

    #[inline]
    fn bilinear(&self, level: usize, u: f32, v: f32) -> [f32; 3] {
        let size = TILE >> level;
        // Sizes are powers of two: wrap with a mask, not a division.
        let mask = size as i64 - 1;
        let tex = &self.levels[level];
        let x = u * size as f32 - 0.5;
        let y = v * size as f32 - 0.5;
        let (xf, yf) = (fast_floor(x), fast_floor(y));
        let (fx, fy) = (x - xf, y - yf);
        let x0 = ((xf as i64) & mask) as usize;
        let y0 = ((yf as i64) & mask) as usize;
        let x1 = ((xf as i64 + 1) & mask) as usize;
        let y1 = ((yf as i64 + 1) & mask) as usize;
        let (a, b, c, d) = (
            tex[y0 * size + x0],
            tex[y0 * size + x1],
            tex[y1 * size + x0],
            tex[y1 * size + x1],
        );
        let mut out = [0.0; 3];
        for k in 0..3 {
            let (a, b, c, d) = (
                f32::from(a[k]),
                f32::from(b[k]),
                f32::from(c[k]),
                f32::from(d[k]),
            );
            let top = a + (b - a) * fx;
            let bot = c + (d - c) * fx;
            out[k] = (top + (bot - top) * fy) * (1.0 / 255.0);
        }
        out
    }

    /// Colour at surface coordinates (metres) for a pixel footprint of `footprint` metres: the
    /// base layer modulated by a detail layer at `DETAIL_SCALE`× the frequency, so surfaces seen
    /// close up stay textured; both layers are mip-filtered, so far surfaces do not alias.
    #[inline]
    pub fn sample(&self, su: f32, sv: f32, footprint: f32) -> [f32; 3] {
        let base = self.sample_layer(su, sv, footprint);
        let d = self.sample_nearest_level(
            su * DETAIL_SCALE + 0.37,
            sv * DETAIL_SCALE + 0.71,
            footprint * DETAIL_SCALE,
        );
        let m = 1.0 + DETAIL_GAIN * ((d[0] + d[1] + d[2]) / 3.0 - self.mean);
        [
            (base[0] * m).clamp(0.0, 1.0),
            (base[1] * m).clamp(0.0, 1.0),
            (base[2] * m).clamp(0.0, 1.0),
        ]
    }

    /// One bilinear lookup at the nearest mip level (for the detail layer, where popping is invisible).
    #[inline]
    fn sample_nearest_level(&self, su: f32, sv: f32, footprint: f32) -> [f32; 3] {
        let texel = TILE_METRES / TILE as f32;
        let ratio = (footprint / texel).max(1.0);
        // Level = round(log2(ratio)) from the float's exponent, no libm call.
        let level = ((ratio * std::f32::consts::SQRT_2).to_bits() >> 23) as usize - 127;
        self.bilinear(
            level.min(self.levels.len() - 1),
            su / TILE_METRES,
            sv / TILE_METRES,
        )
    }

    #[inline]
    fn sample_layer(&self, su: f32, sv: f32, footprint: f32) -> [f32; 3] {
        let u = su / TILE_METRES;
        let v = sv / TILE_METRES;
        let texel = TILE_METRES / TILE as f32;
        let lod = (footprint / texel)
            .max(1.0)
            .log2()
            .min((self.levels.len() - 1) as f32);
        let l0 = lod as usize; // lod ≥ 0: truncation is floor
        let t = lod - l0 as f32;
        let a = self.bilinear(l0, u, v);
        if t < 1e-3 || l0 + 1 >= self.levels.len() {
            return a;
        }
        let b = self.bilinear(l0 + 1, u, v);
        [
            a[0] + (b[0] - a[0]) * t,
            a[1] + (b[1] - a[1]) * t,
            a[2] + (b[2] - a[2]) * t,
        ]
    }
}
