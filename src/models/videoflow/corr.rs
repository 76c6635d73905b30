//! `MOFNetStack/corr.py::CorrBlock`: the all-pairs correlation volume, its average-pooled
//! pyramid, and the (2r+1)² window lookup per level (bilinear, align_corners=True, zeros).

use candle_core::{Device, Tensor};

use crate::ops::grid_sample_pixels;
use streamrecon_core::error::Result;

pub struct CorrBlock {
    /// Per level `[B·h1·w1, 1, h2ₗ, w2ₗ]`.
    pyramid: Vec<Tensor>,
    radius: usize,
    batch: usize,
    h1: usize,
    w1: usize,
}

impl CorrBlock {
    /// `fmap1, fmap2 [B, C, H, W]`.
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn new(fmap1: &Tensor, fmap2: &Tensor, levels: usize, radius: usize) -> Result<Self> {
        let (b, c, h, w) = fmap1.dims4()?;
        let f1 = fmap1
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let f2 = fmap2.reshape((b, c, h * w))?.contiguous()?;
        let corr = (f1.matmul(&f2)? / (c as f64).sqrt())?;
        let mut level = corr.reshape((b * h * w, 1, h, w))?;
        let mut pyramid = vec![level.clone()];
        for _ in 1..levels {
            level = level.avg_pool2d(2)?;
            pyramid.push(level.clone());
        }
        Ok(Self {
            pyramid,
            radius,
            batch: b,
            h1: h,
            w1: w,
        })
    }

    /// The volume's levels, each `[B·h1·w1, 1, h2ₗ, w2ₗ]`.
    pub fn pyramid(&self) -> &[Tensor] {
        &self.pyramid
    }

    /// `coords [B, 2, h1, w1]` (x, y) → `[B, L·(2r+1)², h1, w1]`; channel `level·81 + a·9 + b`,
    /// where window axis `a` offsets x and `b` offsets y.
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn lookup(&self, coords: &Tensor) -> Result<Tensor> {
        let r = self.radius as i64;
        let win = (2 * r + 1) as usize;
        let n = self.batch * self.h1 * self.w1;
        let xy: Vec<f32> = coords.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1()?;
        let mut levels = Vec::with_capacity(self.pyramid.len());
        for (i, corr) in self.pyramid.iter().enumerate() {
            let scale = (1u32 << i) as f32;
            let mut grid = Vec::with_capacity(n * win * win * 2);
            for p in 0..n {
                let (cx, cy) = (xy[2 * p] / scale, xy[2 * p + 1] / scale);
                for a in -r..=r {
                    for b in -r..=r {
                        grid.push(cx + a as f32);
                        grid.push(cy + b as f32);
                    }
                }
            }
            let grid = Tensor::from_vec(grid, (n, win, win, 2), &Device::Cpu)?;
            let sampled = grid_sample_pixels(corr, &grid)?;
            levels.push(sampled.reshape((self.batch, self.h1, self.w1, win * win))?);
        }
        let out = Tensor::cat(&levels, 3)?;
        Ok(out.permute((0, 3, 1, 2))?.contiguous()?)
    }
}
