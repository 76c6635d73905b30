//! The shapes each kernel is launched with: buffer lengths checked before any launch (a kernel
//! reads and writes by index), thread counts, and the sizes as the kernels' `int`s.

use crate::{Error, Result};

fn check_len(kernel: &str, buffer: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{kernel}: {buffer} has {got} values, the shape needs {want}"
        )))
    }
}

/// Sizes as kernel arguments (the kernels index with 64-bit products of 32-bit sizes).
fn ints<const N: usize>(kernel: &str, sizes: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0; N];
    for (o, v) in out.iter_mut().zip(sizes) {
        *o = i32::try_from(v)
            .map_err(|_| Error::Shape(format!("{kernel}: size {v} exceeds a 32-bit int")))?;
    }
    Ok(out)
}

/// `grid_sample_pixels_f32`: `img [n, c, h, w]`, `coords [n, ho, wo, 2]`, `out [n, c, ho, wo]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridSample {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
}

impl GridSample {
    pub(crate) fn check(&self, img: usize, coords: usize, out: usize) -> Result<[i32; 6]> {
        let k = "grid_sample";
        check_len(k, "img", img, self.n * self.c * self.h * self.w)?;
        check_len(k, "coords", coords, self.n * self.ho * self.wo * 2)?;
        check_len(k, "out", out, self.n * self.c * self.ho * self.wo)?;
        ints(k, [self.n, self.c, self.h, self.w, self.ho, self.wo])
    }

    pub(crate) fn threads(&self) -> usize {
        self.n * self.ho * self.wo
    }
}

/// `depthwise_conv2d_f32`: `x, out [n, c, h, w]`, `weight [c, 1, k, k]` (k odd), `bias [c]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depthwise {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
}

impl Depthwise {
    pub(crate) fn check(
        &self,
        x: usize,
        weight: usize,
        bias: usize,
        out: usize,
    ) -> Result<[i32; 5]> {
        let kn = "depthwise_conv2d";
        if self.k.is_multiple_of(2) {
            return Err(Error::Shape(format!(
                "{kn}: kernel size {} is even",
                self.k
            )));
        }
        let len = self.n * self.c * self.h * self.w;
        check_len(kn, "x", x, len)?;
        check_len(kn, "weight", weight, self.c * self.k * self.k)?;
        check_len(kn, "bias", bias, self.c)?;
        check_len(kn, "out", out, len)?;
        ints(kn, [self.n, self.c, self.h, self.w, self.k])
    }

    pub(crate) fn threads(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
}

/// `corr_lookup_f32`, one pyramid level: `corr [batch·h1·w1, hl, wl]`, `coords [batch, 2, h1, w1]`
/// (level-0 pixels), `out [batch, channels, h1, w1]` written at channels `channel0 ..
/// channel0 + (2·radius + 1)²`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorrLookup {
    pub batch: usize,
    pub h1: usize,
    pub w1: usize,
    pub hl: usize,
    pub wl: usize,
    pub radius: usize,
    /// `2^level`: coordinates are divided by it.
    pub scale: f32,
    pub channel0: usize,
    pub channels: usize,
}

impl CorrLookup {
    pub(crate) fn window(&self) -> usize {
        (2 * self.radius + 1) * (2 * self.radius + 1)
    }

    pub(crate) fn check(&self, corr: usize, coords: usize, out: usize) -> Result<[i32; 8]> {
        let k = "corr_lookup";
        let pixels = self.batch * self.h1 * self.w1;
        check_len(k, "corr", corr, pixels * self.hl * self.wl)?;
        check_len(k, "coords", coords, pixels * 2)?;
        check_len(k, "out", out, pixels * self.channels)?;
        if self.channel0 + self.window() > self.channels {
            return Err(Error::Shape(format!(
                "{k}: channels {}..{} of {}",
                self.channel0,
                self.channel0 + self.window(),
                self.channels
            )));
        }
        ints(
            k,
            [
                self.batch,
                self.h1,
                self.w1,
                self.hl,
                self.wl,
                self.radius,
                self.channel0,
                self.channels,
            ],
        )
    }

    pub(crate) fn threads(&self) -> usize {
        self.batch * self.h1 * self.w1 * self.window()
    }
}

/// The pruning kernels of `kv_prune.cu`: a `[heads, cap, d]` cache whose rows
/// `anchor..anchor + cand` are candidates, of which each head keeps `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPrune {
    pub heads: usize,
    pub cap: usize,
    pub d: usize,
    pub anchor: usize,
    pub cand: usize,
    pub keep: usize,
}

impl KvPrune {
    /// `[heads, cap, d, anchor, cand, keep]` as ints, after checking the cache and the
    /// priority (`[heads, cand]`) lengths.
    pub(crate) fn check(&self, cache: usize, priority: usize) -> Result<[i32; 6]> {
        let k = "kv_prune";
        check_len(k, "cache", cache, self.heads * self.cap * self.d)?;
        check_len(k, "priority", priority, self.heads * self.cand)?;
        if self.anchor + self.cand > self.cap || self.keep > self.cand {
            return Err(Error::Shape(format!(
                "{k}: {} anchors + {} candidates in {} rows, keeping {}",
                self.anchor, self.cand, self.cap, self.keep
            )));
        }
        ints(
            k,
            [
                self.heads,
                self.cap,
                self.d,
                self.anchor,
                self.cand,
                self.keep,
            ],
        )
    }
}

/// `attention_f32`: `q, out [heads, n, d]`, `k, v [heads, cap, d]` of which rows `0..m` are
/// attended to; `d` at most 256.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub cap: usize,
    pub d: usize,
    pub scale: f32,
}

impl Attention {
    pub(crate) fn check(&self, q: usize, k: usize, v: usize, out: usize) -> Result<[i32; 5]> {
        let kn = "attention";
        if self.d == 0 || self.d > 256 || self.m == 0 || self.m > self.cap {
            return Err(Error::Shape(format!(
                "{kn}: head size {} (1..=256), {} of {} cache rows (at least 1)",
                self.d, self.m, self.cap
            )));
        }
        check_len(kn, "q", q, self.heads * self.n * self.d)?;
        check_len(kn, "k", k, self.heads * self.cap * self.d)?;
        check_len(kn, "v", v, self.heads * self.cap * self.d)?;
        check_len(kn, "out", out, self.heads * self.n * self.d)?;
        ints(kn, [self.heads, self.n, self.m, self.cap, self.d])
    }

    pub(crate) fn threads(&self) -> usize {
        self.heads * self.n
    }
}
