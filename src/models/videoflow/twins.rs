//! `encoders.py::twins_svt_large` (timm 0.4.12 `Twins`, first two stages): patch embeds,
//! locally-grouped attention (window 7, zero-padded, pad tokens unmasked), global sub-sampled
//! attention, the PosConv generator after each stage's first block. Output `[N, C1, H/8, W/8]`.
//! StreamFlow's `Twins_CSC` is the same module tree run over its frames stacked into one image
//! ([`Twins::forward_stacked`]); timm 1.0's blocks compute the same as 0.4.12's.

use crate::ops::Linear;
use candle_core::{Module, Tensor, D};
use candle_nn::LayerNorm;

use super::config::TwinsConfig;
use crate::ops::{conv2d, depthwise_conv2d, layer_norm, linear, Conv2d};
use crate::weights::Vb;
use streamrecon_core::error::Result;

const BLOCK_NORM_EPS: f64 = 1e-6;
const PATCH_NORM_EPS: f64 = 1e-5;

/// `LocallyGroupedAttn`.
struct LocallyGroupedAttn {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    ws: usize,
}

impl LocallyGroupedAttn {
    fn forward(&self, x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let ws = self.ws;
        let x = x.reshape((b, h, w, c))?;
        let (pad_r, pad_b) = ((ws - w % ws) % ws, (ws - h % ws) % ws);
        let x = x.pad_with_zeros(2, 0, pad_r)?.pad_with_zeros(1, 0, pad_b)?;
        let (hp, wp) = (h + pad_b, w + pad_r);
        let (gh, gw) = (hp / ws, wp / ws);
        let x = x
            .reshape((b, gh, ws, gw, ws, c))?
            .transpose(2, 3)?
            .contiguous()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(&x.reshape((b * gh * gw * ws * ws, c))?)?
            .reshape((b, gh * gw, ws * ws, 3, self.heads, hd))?
            .permute((3, 0, 1, 4, 2, 5))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let out = crate::attention::sdpa_batched(&q, &k, &v, (hd as f64).powf(-0.5))?;
        let out = out
            .transpose(2, 3)?
            .reshape((b, gh, gw, ws, ws, c))?
            .transpose(2, 3)?
            .reshape((b, hp, wp, c))?;
        let out = out.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()?;
        Ok(self.proj.forward(&out.reshape((b, n, c))?)?)
    }
}

/// `GlobalSubSampleAttn`.
struct GlobalSubSampleAttn {
    q: Linear,
    kv: Linear,
    proj: Linear,
    sr: Option<(Conv2d, LayerNorm)>,
    heads: usize,
}

impl GlobalSubSampleAttn {
    fn forward(&self, x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let q = self
            .q
            .forward(x)?
            .reshape((b, n, self.heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let src = match &self.sr {
            Some((conv, norm)) => {
                let img = x.transpose(1, 2)?.reshape((b, c, h, w))?;
                let t = conv.forward(&img)?.flatten_from(2)?.transpose(1, 2)?;
                norm.forward(&t.contiguous()?)?
            }
            None => x.clone(),
        };
        let kv = self
            .kv
            .forward(&src)?
            .reshape((b, (), 2, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (k, v) = (kv.get(0)?.contiguous()?, kv.get(1)?.contiguous()?);
        let out = crate::attention::sdpa_batched(&q, &k, &v, (hd as f64).powf(-0.5))?;
        let out = out.transpose(1, 2)?.reshape((b, n, c))?;
        Ok(self.proj.forward(&out)?)
    }
}

enum Attn {
    Local(LocallyGroupedAttn),
    Global(GlobalSubSampleAttn),
}

/// Twins `Block`.
struct Block {
    norm1: LayerNorm,
    attn: Attn,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn forward(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        let y = self.norm1.forward(x)?;
        let a = match &self.attn {
            Attn::Local(l) => l.forward(&y, size)?,
            Attn::Global(g) => g.forward(&y, size)?,
        };
        let x = (x + a)?;
        let m = self
            .fc2
            .forward(&self.fc1.forward_gelu(&self.norm2.forward(&x)?)?)?;
        Ok((x + m)?)
    }
}

/// One stage: patch embed, two blocks, PosConv after the first.
struct Stage {
    patch_proj: Conv2d,
    patch_norm: LayerNorm,
    patch: usize,
    blocks: Vec<Block>,
    pos_weight: Tensor,
    pos_bias: Tensor,
}

/// The encoder (`svt.*`).
pub struct Twins {
    stages: Vec<Stage>,
}

impl Twins {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, cfg: &TwinsConfig) -> Result<Self> {
        let mut stages = Vec::new();
        let mut cin = 3;
        for s in 0..2 {
            let dim = cfg.embed_dims[s];
            let patch = if s == 0 { 4 } else { 2 };
            let pe = vb.pp("patch_embeds").pp(s);
            let mut blocks = Vec::new();
            for j in 0..cfg.depths[s] {
                let bv = vb.pp("blocks").pp(s).pp(j);
                let av = bv.pp("attn");
                let heads = cfg.num_heads[s];
                let attn = if j % 2 == 0 {
                    Attn::Local(LocallyGroupedAttn {
                        qkv: linear(&av.pp("qkv"), dim, 3 * dim, true)?,
                        proj: linear(&av.pp("proj"), dim, dim, true)?,
                        heads,
                        ws: cfg.wss[s],
                    })
                } else {
                    let sr = cfg.sr_ratios[s];
                    Attn::Global(GlobalSubSampleAttn {
                        q: linear(&av.pp("q"), dim, dim, true)?,
                        kv: linear(&av.pp("kv"), dim, 2 * dim, true)?,
                        proj: linear(&av.pp("proj"), dim, dim, true)?,
                        sr: if sr > 1 {
                            Some((
                                conv2d(&av.pp("sr"), dim, dim, sr, sr, 0, true)?,
                                layer_norm(&av.pp("norm"), dim, PATCH_NORM_EPS)?,
                            ))
                        } else {
                            None
                        },
                        heads,
                    })
                };
                let hidden = (dim as f64 * cfg.mlp_ratios[s]) as usize;
                blocks.push(Block {
                    norm1: layer_norm(&bv.pp("norm1"), dim, BLOCK_NORM_EPS)?,
                    attn,
                    norm2: layer_norm(&bv.pp("norm2"), dim, BLOCK_NORM_EPS)?,
                    fc1: linear(&bv.pp("mlp").pp("fc1"), dim, hidden, true)?,
                    fc2: linear(&bv.pp("mlp").pp("fc2"), hidden, dim, true)?,
                });
            }
            let pos = vb.pp("pos_block").pp(s).pp("proj").pp(0);
            stages.push(Stage {
                patch_proj: conv2d(&pe.pp("proj"), cin, dim, patch, patch, 0, true)?,
                patch_norm: layer_norm(&pe.pp("norm"), dim, PATCH_NORM_EPS)?,
                patch,
                blocks,
                pos_weight: pos.get("weight", (dim, 1, 3, 3))?,
                pos_bias: pos.get("bias", dim)?,
            });
            cin = dim;
        }
        // In the checkpoint but unused by VideoFlow: the final norm of the full Twins.
        let last = *cfg.embed_dims.last().unwrap_or(&0);
        vb.pp("norm").get("weight", last)?;
        vb.pp("norm").get("bias", last)?;
        Ok(Self { stages })
    }

    /// `x [N, 3, H, W]` (in [−1, 1]) → `[N, C1, H/8, W/8]`, each frame on its own; `taps` sees
    /// the token sequences of each stage.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(&self, x: &Tensor, taps: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        self.run(x, false, taps)
    }

    /// As [`Self::forward`], but the blocks see the N frames as one image stacked vertically
    /// (StreamFlow's ISC): windows, sub-sampled keys and the PosConv cross frame borders. The
    /// patch embeddings still run per frame, and the tokens are in (frame, row, column) order,
    /// which is the stacked image's row-major order.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward_stacked(
        &self,
        x: &Tensor,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        self.run(x, true, taps)
    }

    fn run(
        &self,
        x: &Tensor,
        stacked: bool,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, st) in self.stages.iter().enumerate() {
            let (n, _, h, w) = x.dims4()?;
            let (fh, fw) = (h / st.patch, w / st.patch);
            // The blocks' batch and image: each frame, or all frames as one tall image.
            let (b, size) = if stacked {
                (1, (n * fh, fw))
            } else {
                (n, (fh, fw))
            };
            let t = st
                .patch_proj
                .forward(&x)?
                .flatten_from(2)?
                .transpose(1, 2)?;
            let c = t.dim(D::Minus1)?;
            let mut t = st
                .patch_norm
                .forward(&t.contiguous()?.reshape((b, (), c))?)?;
            taps(&format!("stage{i}.patch_embed"), &t);
            for (j, blk) in st.blocks.iter().enumerate() {
                t = blk.forward(&t, size)?;
                if j == 0 {
                    taps(&format!("stage{i}.block0"), &t);
                    // PosConv: depthwise 3×3 plus the input (stride 1).
                    let img = t.transpose(1, 2)?.reshape((b, c, size.0, size.1))?;
                    let conv = depthwise_conv2d(&img, &st.pos_weight, Some(&st.pos_bias))?;
                    t = (conv + img)?
                        .flatten_from(2)?
                        .transpose(1, 2)?
                        .contiguous()?;
                    taps(&format!("stage{i}.after_block0_peg"), &t);
                }
            }
            taps(&format!("stage{i}.out"), &t);
            x = t
                .reshape((n, fh, fw, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
        }
        Ok(x)
    }
}
