//! `layers/vision_transformer.py::DinoVisionTransformer` as the aggregator's patch embed:
//! conv patch embedding, class + register tokens, the stored pos-embed resized with antialiased
//! bicubic, plain blocks, final norm; returns the normalised patch tokens.

use candle_core::{Module, Tensor};
use candle_nn::LayerNorm;

use super::config::VggtConfig;
use super::layers::{Block, BlockSpec};
use crate::ops::{bicubic_aa_matrix, conv2d, layer_norm, resample_separable, Conv2d};
use crate::weights::Vb;
use streamrecon_core::error::{Error, Result};

pub struct DinoVisionTransformer {
    proj: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    register_tokens: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch_size: usize,
    grid: usize,
    embed_dim: usize,
    num_registers: usize,
}

impl DinoVisionTransformer {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, cfg: &VggtConfig) -> Result<Self> {
        let d = &cfg.dino_patch_embed;
        let e = d.embed_dim;
        let grid = cfg.img_size / cfg.patch_size;
        let spec = BlockSpec {
            dim: e,
            num_heads: d.num_heads,
            mlp_hidden: (e as f64 * d.mlp_ratio) as usize,
            bias: true,
            qk_norm: None,
            layer_scale: d.init_values > 0.0,
            norm_eps: d.layernorm_eps,
        };
        let blocks = (0..d.depth)
            .map(|i| Block::new(&vb.pp("blocks").pp(i), &spec))
            .collect::<Result<Vec<_>>>()?;
        // Only used for masked training; read so that the checkpoint is fully accounted for.
        vb.get("mask_token", (1, e))?;
        Ok(Self {
            proj: conv2d(
                &vb.pp("patch_embed").pp("proj"),
                3,
                e,
                cfg.patch_size,
                cfg.patch_size,
                0,
                true,
            )?,
            cls_token: vb.get("cls_token", (1, 1, e))?,
            pos_embed: vb.get("pos_embed", (1, grid * grid + 1, e))?,
            register_tokens: vb.get("register_tokens", (1, d.num_register_tokens, e))?,
            blocks,
            norm: layer_norm(&vb.pp("norm"), e, d.layernorm_eps)?,
            patch_size: cfg.patch_size,
            grid,
            embed_dim: e,
            num_registers: d.num_register_tokens,
        })
    }

    /// The stored pos-embed (class slot first) for an `h × w` image.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn interpolate_pos_encoding(&self, h: usize, w: usize) -> Result<Tensor> {
        let (hp, wp) = (h / self.patch_size, w / self.patch_size);
        // The reference skips resizing only for the stored grid on a square image.
        if hp * wp == self.grid * self.grid && h == w {
            return Ok(self.pos_embed.clone());
        }
        let m = self.grid;
        let cls = self.pos_embed.narrow(1, 0, 1)?;
        let patch = self
            .pos_embed
            .narrow(1, 1, m * m)?
            .reshape((m, m, self.embed_dim))?
            .permute((2, 0, 1))?;
        let resized = resample_separable(
            &patch,
            &bicubic_aa_matrix(m, hp),
            &bicubic_aa_matrix(m, wp),
            hp,
            wp,
        )?;
        let resized = resized
            .permute((1, 2, 0))?
            .reshape((1, hp * wp, self.embed_dim))?;
        Ok(Tensor::cat(&[&cls, &resized], 1)?)
    }

    /// `x [B, 3, H, W]` (normalised) → tokens entering the blocks `[B, 1 + R + Np, E]`.
    ///
    /// # Errors
    /// Image size not a multiple of the patch size; tensor op failure.
    pub fn prepare_tokens(
        &self,
        x: &Tensor,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        if h % self.patch_size != 0 || w % self.patch_size != 0 || h == 0 || w == 0 {
            return Err(Error::Model(format!(
                "image {w}×{h} is not a multiple of the patch size {}",
                self.patch_size
            )));
        }
        let patches = self.proj.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        taps("dino.patch_embed_conv", &patches);
        let cls = self.cls_token.broadcast_as((b, 1, self.embed_dim))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?;
        let pos = self.interpolate_pos_encoding(h, w)?;
        taps("dino.pos_embed_interp", &pos);
        let x = x.broadcast_add(&pos)?;
        let regs = self
            .register_tokens
            .broadcast_as((b, self.num_registers, self.embed_dim))?;
        let n = x.dim(1)?;
        Ok(Tensor::cat(
            &[&x.narrow(1, 0, 1)?, &regs, &x.narrow(1, 1, n - 1)?],
            1,
        )?)
    }

    /// Normalised patch tokens `[B, Np, E]` (`x_norm_patchtokens`); `taps` sees every stage.
    ///
    /// # Errors
    /// As [`Self::prepare_tokens`].
    pub fn forward(&self, x: &Tensor, taps: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let mut t = self.prepare_tokens(x, taps)?;
        taps("dino.tokens_in", &t);
        for (i, blk) in self.blocks.iter().enumerate() {
            t = blk.forward(&t, None, None)?;
            taps(&format!("dino.block{i}"), &t);
        }
        let t = self.norm.forward(&t)?;
        let n = t.dim(1)?;
        let skip = 1 + self.num_registers;
        Ok(t.narrow(1, skip, n - skip)?)
    }
}
