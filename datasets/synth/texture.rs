//! Procedural, tileable, mipmapped surface textures.
//!
//! Textures are generated once per scene and sampled trilinearly with a mip level chosen from the
//! pixel's footprint on the surface, so distant surfaces are band-limited (no aliasing) at the cost
//! of four texel reads per level.

// Packet code indexes several lane arrays in step and combines conditions with `&`: both
// keep the lane loops branch-free, which is what lets them vectorise.
#![allow(clippy::needless_range_loop, clippy::needless_bitwise_bool)]

use rand::{Rng, SeedableRng};

use super::scene::{Lanes, LANES};
use streamrecon_core::simd::small_int;

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
    /// RGB in 1/255 steps, the bytes of a little-endian `u32` per texel (the fourth is 0).
    levels: Vec<Vec<u32>>,
    /// Mean luminance (the 1×1 mip level).
    mean: f32,
}

/// Lattice hash constants: the hash of cell (x, y) is `finish(x·HASH_X ^ y·HASH_Y ^ seed·HASH_SEED)`.
const HASH_X: u32 = 0x8da6_b343;
const HASH_Y: u32 = 0xd816_3841;
const HASH_SEED: u32 = 0xcb1a_b31f;

/// The last mixing steps of the lattice hash, to a value in [0, 1).
#[allow(clippy::inline_always)] // per-texel code of `BaseLevel`
#[inline(always)]
fn finish(mut h: u32) -> f32 {
    h ^= h >> 13;
    h = h.wrapping_mul(0x5bd1_e995);
    h ^= h >> 15;
    // Exact: the value has 24 bits (and i32 → f32 converts in one instruction, u32 does not).
    (h & 0x00ff_ffff) as i32 as f32 * (1.0 / 16_777_216.0)
}

/// One row (v in [0, 1) fixed) of tileable fractal value noise: the sum over `octaves`
/// octaves, starting at `cells` lattice cells across the tile (a power of two) and doubling,
/// with amplitudes falling by 0.55, normalised to [0, 1]. The row is the inner loop, so it
/// vectorises.
#[allow(clippy::inline_always)] // per-row code of `BaseLevel`
#[inline(always)]
fn fbm_row(v: f32, cells: u32, octaves: u32, seed: u32) -> [f32; TILE] {
    debug_assert!(cells.is_power_of_two());
    let mut sum = [0.0f32; TILE];
    let (mut amp, mut norm, mut c) = (1.0f32, 0.0f32, cells);
    for o in 0..octaves {
        let seed_part = seed.wrapping_add(o * 7919).wrapping_mul(HASH_SEED);
        // Wrapping with a mask (the cell counts are powers of two).
        let mask = c - 1;
        let y = v * c as f32;
        let yi = y.floor();
        let fy = y - yi;
        let sy = fy * fy * (3.0 - 2.0 * fy);
        let y0 = yi as u32 & mask;
        let y1 = (y0 + 1) & mask;
        let (row0, row1) = (
            y0.wrapping_mul(HASH_Y) ^ seed_part,
            y1.wrapping_mul(HASH_Y) ^ seed_part,
        );
        for (x, acc) in sum.iter_mut().enumerate() {
            let u = (x as f32 + 0.5) / TILE as f32;
            let xx = u * c as f32;
            let xi = xx.floor();
            let fx = xx - xi;
            let sx = fx * fx * (3.0 - 2.0 * fx);
            let x0 = xi as i32 as u32 & mask;
            let x1 = (x0 + 1) & mask;
            let (h0, h1) = (x0.wrapping_mul(HASH_X), x1.wrapping_mul(HASH_X));
            let (a, b) = (finish(h0 ^ row0), finish(h1 ^ row0));
            let (cc, d) = (finish(h0 ^ row1), finish(h1 ^ row1));
            let top = a + (b - a) * sx;
            let bot = cc + (d - cc) * sx;
            *acc += amp * (top + (bot - top) * sy);
        }
        norm += amp;
        amp *= 0.55;
        c *= 2;
    }
    for acc in &mut sum {
        *acc /= norm;
    }
    sum
}

#[allow(clippy::inline_always)] // per-texel code of `BaseLevel`
#[inline(always)]
fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// The finest level of a texture, generated row by row (compiled for the CPU it runs on:
/// `floor` is an instruction there, a libm call on baseline x86-64).
struct BaseLevel {
    pattern: Pattern,
    colours: [[f32; 3]; 3],
    seed: u32,
}

impl streamrecon_core::simd::Kernel for BaseLevel {
    type Output = Vec<[f32; 3]>;

    #[allow(clippy::inline_always)] // inlined into the dispatched function (`streamrecon_core::simd`)
    #[inline(always)]
    fn run(self) -> Vec<[f32; 3]> {
        let BaseLevel {
            pattern,
            colours: [c0, c1, c2],
            seed: s,
        } = self;
        let mut base = vec![[0.0f32; 3]; TILE * TILE];
        for (y, row) in base.chunks_exact_mut(TILE).enumerate() {
            let v = (y as f32 + 0.5) / TILE as f32;
            // Fine detail everywhere so no surface is textureless.
            let fine = fbm_row(v, 16, 5, s ^ 0x55);
            let noise = match pattern {
                Pattern::Noise => fbm_row(v, 4, 6, s),
                Pattern::Stripes => fbm_row(v, 4, 3, s),
                Pattern::Checker => fbm_row(v, 8, 3, s),
                Pattern::Gradient => fbm_row(v, 8, 4, s),
                Pattern::Marble => fbm_row(v, 4, 5, s),
            };
            for (x, texel) in row.iter_mut().enumerate() {
                let u = (x as f32 + 0.5) / TILE as f32;
                let w = noise[x];
                let c = match pattern {
                    Pattern::Noise => mix(c0, c1, w),
                    Pattern::Stripes => {
                        let t = 0.5 + 0.5 * (std::f32::consts::TAU * (6.0 * u + 1.5 * w)).sin();
                        mix(c0, c1, t)
                    }
                    Pattern::Checker => {
                        let k = ((u * 8.0) as u32 + (v * 8.0) as u32) % 2;
                        let t = if k == 0 { 0.2 } else { 0.8 };
                        mix(c0, c1, t + 0.2 * (w - 0.5))
                    }
                    Pattern::Gradient => {
                        let g = 0.5 - 0.5 * (std::f32::consts::TAU * u).cos();
                        mix(mix(c0, c1, g), c2, 0.6 * w)
                    }
                    Pattern::Marble => {
                        let t =
                            0.5 + 0.5 * (std::f32::consts::TAU * (3.0 * (u + v) + 4.0 * w)).sin();
                        mix(mix(c0, c2, t), c1, 0.3 * w)
                    }
                };
                let m = 0.75 + 0.5 * fine[x];
                *texel = [
                    (c[0] * m).min(1.0),
                    (c[1] * m).min(1.0),
                    (c[2] * m).min(1.0),
                ];
            }
        }
        base
    }
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
        let base = streamrecon_core::simd::vectorized(BaseLevel {
            pattern,
            colours: [c0, c1, c2],
            seed: seed as u32,
        });
        Self::from_base(base)
    }

    /// A photograph as a texture: scaled to half a tile and mirrored into the other three
    /// quarters, so it tiles without seams (a real surface's statistics, not a procedural
    /// pattern's). Its bytes are taken as linear intensities.
    pub fn from_photo(photo: &image::RgbImage) -> Self {
        let half = TILE / 2;
        let small = image::imageops::resize(
            photo,
            half as u32,
            half as u32,
            image::imageops::FilterType::Triangle,
        );
        let mut base = vec![[0.0f32; 3]; TILE * TILE];
        for y in 0..TILE {
            // Mirrored: texel `TILE − 1 − y` repeats texel `y`.
            let sy = if y < half { y } else { TILE - 1 - y };
            for x in 0..TILE {
                let sx = if x < half { x } else { TILE - 1 - x };
                let p = small.get_pixel(sx as u32, sy as u32).0;
                base[y * TILE + x] = p.map(|v| f32::from(v) / 255.0);
            }
        }
        Self::from_base(base)
    }

    /// The mip chain of a base level of `TILE`×`TILE` texels.
    fn from_base(base: Vec<[f32; 3]>) -> Self {
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
        let q = super::quantise;
        let levels = levels
            .into_iter()
            .map(|l| {
                l.into_iter()
                    .map(|c| u32::from_le_bytes([q(c[0]), q(c[1]), q(c[2]), 0]))
                    .collect()
            })
            .collect();
        Self { levels, mean }
    }
}

/// Mip levels per texture.
const LEVELS: u32 = TILE.trailing_zeros() + 1;

/// Lanes of texel indices.
type Indices = [u32; LANES];

/// Every material's mip levels in one texel array (RGB bytes of a `u32`, level after level,
/// material after material), sampled a packet of [`LANES`] surface points at a time: the
/// coordinate and filter arithmetic runs across lanes, only the texel reads are per lane.
pub struct Materials {
    texels: Vec<u32>,
    means: Vec<f32>,
}

/// First texel of `level` within a texture: the sizes of the levels before it,
/// Σₖ₍₌₀…level−1₎ 4^(LEVELS−1−k) = (4^LEVELS − 4^(LEVELS−level)) / 3.
#[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
#[inline(always)]
fn level_offset(level: u32) -> u32 {
    ((1 << (2 * LEVELS)) - (1 << (2 * (LEVELS - level)))) / 3
}

impl Materials {
    pub fn new(textures: Vec<Texture>) -> Self {
        let means = textures.iter().map(|t| t.mean).collect();
        let texels = textures
            .into_iter()
            .flat_map(|t| t.levels.into_iter().flatten())
            .collect();
        Self { texels, means }
    }

    /// Colour of material `material[l]` at surface coordinates (metres) for a pixel footprint
    /// of `footprint[l]` metres: the base layer, trilinear between mip levels, modulated by a
    /// detail layer at `DETAIL_SCALE`× the frequency (nearest mip level, where popping is
    /// invisible), so surfaces seen close up stay textured and far ones do not alias.
    /// Materials out of range read as black.
    #[allow(clippy::inline_always)] // per-pixel code of the dispatched render kernels
    #[inline(always)]
    pub fn sample(
        &self,
        material: &Indices,
        su: &Lanes,
        sv: &Lanes,
        footprint: &Lanes,
    ) -> [Lanes; 3] {
        let texel = TILE_METRES / TILE as f32;
        let per_texture = level_offset(LEVELS);
        let (mut u, mut v, mut base) = ([0.0; LANES], [0.0; LANES], [0; LANES]);
        let (mut level0, mut level1, mut blend) = ([0; LANES], [0; LANES], [0.0; LANES]);
        let (mut du, mut dv, mut detail_level) = ([0.0; LANES], [0.0; LANES], [0; LANES]);
        for l in 0..LANES {
            u[l] = su[l] / TILE_METRES;
            v[l] = sv[l] / TILE_METRES;
            base[l] = material[l].wrapping_mul(per_texture);
            let lod = log2_at_least_one(footprint[l] / texel).min((LEVELS - 1) as f32);
            let l0 = lod as u32; // lod ≥ 0: truncation is floor
            level0[l] = l0;
            level1[l] = (l0 + 1).min(LEVELS - 1);
            blend[l] = lod - l0 as f32;
            du[l] = (su[l] * DETAIL_SCALE + 0.37) / TILE_METRES;
            dv[l] = (sv[l] * DETAIL_SCALE + 0.71) / TILE_METRES;
            // Nearest level: round(log2(ratio)) from the float's exponent.
            let ratio = (footprint[l] * DETAIL_SCALE / texel).max(1.0);
            detail_level[l] =
                (((ratio * std::f32::consts::SQRT_2).to_bits() >> 23) - 127).min(LEVELS - 1);
        }
        let a = self.bilinear(&base, &level0, &u, &v);
        let b = self.bilinear(&base, &level1, &u, &v);
        let d = self.bilinear(&base, &detail_level, &du, &dv);
        let mut mean = [0.0; LANES];
        for l in 0..LANES {
            mean[l] = self.means.get(material[l] as usize).copied().unwrap_or(0.0);
        }
        let mut out = [[0.0; LANES]; 3];
        for l in 0..LANES {
            let lum = (d[0][l] + d[1][l] + d[2][l]) / 3.0;
            let m = 1.0 + DETAIL_GAIN * (lum - mean[l]);
            for k in 0..3 {
                let c = a[k][l] + (b[k][l] - a[k][l]) * blend[l];
                out[k][l] = (c * m).clamp(0.0, 1.0);
            }
        }
        out
    }

    /// Bilinear lookups, one per lane, at mip `level[l]` of the texture starting at `base[l]`;
    /// (u, v) wrap (textures tile).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn bilinear(&self, base: &Indices, level: &Indices, u: &Lanes, v: &Lanes) -> [Lanes; 3] {
        let mut corners = [[0u32; LANES]; 4];
        let (mut fx, mut fy) = ([0.0; LANES], [0.0; LANES]);
        for l in 0..LANES {
            let shift = LEVELS - 1 - level[l];
            let size = 1u32 << shift;
            let x = u[l] * size as f32 - 0.5;
            let y = v[l] * size as f32 - 0.5;
            let (xf, yf) = (x.floor(), y.floor());
            fx[l] = x - xf;
            fy[l] = y - yf;
            // Sizes are powers of two: wrap with a mask (two's complement wraps negatives).
            let mask = size - 1;
            // Larger coordinates than `small_int` takes occur only at the coarsest levels, where
            // the mask leaves few bits, so their texel is as good.
            let (xi, yi) = (small_int(xf), small_int(yf));
            let (x0, x1) = (xi & mask, xi.wrapping_add(1) & mask);
            let (y0, y1) = ((yi & mask) << shift, (yi.wrapping_add(1) & mask) << shift);
            let first = base[l].wrapping_add(level_offset(level[l]));
            corners[0][l] = first + y0 + x0;
            corners[1][l] = first + y0 + x1;
            corners[2][l] = first + y1 + x0;
            corners[3][l] = first + y1 + x1;
        }
        let mut texels = [[0u32; LANES]; 4];
        for (c, i) in texels.iter_mut().zip(&corners) {
            for l in 0..LANES {
                c[l] = self.texels.get(i[l] as usize).copied().unwrap_or(0);
            }
        }
        let mut out = [[0.0; LANES]; 3];
        for (k, o) in out.iter_mut().enumerate() {
            for l in 0..LANES {
                // Not `array::map`: its closure may be compiled out of line.
                let channel = |j: usize| ((texels[j][l] >> (8 * k)) & 0xff) as f32;
                let (a, b, c, d) = (channel(0), channel(1), channel(2), channel(3));
                let top = a + (b - a) * fx[l];
                let bot = c + (d - c) * fx[l];
                o[l] = (top + (bot - top) * fy[l]) * (1.0 / 255.0);
            }
        }
        out
    }
}

/// log2(max(x, 1)) to within 2e-5, without a libm call (so it vectorises): the float's
/// exponent plus a polynomial in its mantissa.
#[allow(clippy::inline_always)]
#[inline(always)]
fn log2_at_least_one(x: f32) -> f32 {
    let bits = x.max(1.0).to_bits();
    let exponent = ((bits >> 23) - 127) as f32;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000) - 1.0;
    // Near-minimax fit of log2(1 + m) on [0, 1), error 1.5e-5.
    let p = m
        * (1.441_966
            + m * (-0.709_666_3 + m * (0.417_608_8 + m * (-0.196_288_2 + m * 0.046_394_19))));
    exponent + p
}
