//! `models/aggregator.py::Aggregator` in streaming mode: DINO patch tokens plus camera and
//! register tokens, then alternating frame blocks (within the frame) and global blocks (the frame's
//! queries against every cached frame's keys).

use candle_core::{Device, Tensor};

use super::config::VggtConfig;
use super::dino::DinoVisionTransformer;
use super::layers::{Block, BlockSpec, Rope2d};
use super::memory::StreamMemory;
use crate::weights::Vb;
use streamrecon_core::error::Result;

const RESNET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const RESNET_STD: [f32; 3] = [0.229, 0.224, 0.225];

pub struct Aggregator {
    patch_embed: DinoVisionTransformer,
    frame_blocks: Vec<Block>,
    global_blocks: Vec<Block>,
    camera_token: Tensor,
    register_token: Tensor,
    rope: Option<Rope2d>,
    patch_size: usize,
    embed_dim: usize,
    num_registers: usize,
    head_dim: usize,
}

impl Aggregator {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, cfg: &VggtConfig) -> Result<Self> {
        let a = &cfg.aggregator;
        let e = a.embed_dim;
        let spec = BlockSpec {
            dim: e,
            num_heads: a.num_heads,
            mlp_hidden: (e as f64 * a.mlp_ratio) as usize,
            bias: a.qkv_bias && a.proj_bias && a.ffn_bias,
            qk_norm: a.qk_norm.then_some(a.qk_norm_eps),
            layer_scale: a.init_values > 0.0,
            norm_eps: a.layernorm_eps,
        };
        let blocks = |name: &str| -> Result<Vec<Block>> {
            (0..a.depth)
                .map(|i| Block::new(&vb.pp(name).pp(i), &spec))
                .collect()
        };
        Ok(Self {
            patch_embed: DinoVisionTransformer::new(&vb.pp("patch_embed"), cfg)?,
            frame_blocks: blocks("frame_blocks")?,
            global_blocks: blocks("global_blocks")?,
            camera_token: vb.get("camera_token", (1, 2, 1, e))?,
            register_token: vb.get("register_token", (1, 2, a.num_register_tokens, e))?,
            rope: (a.rope_freq > 0.0).then(|| Rope2d::new(a.rope_freq)),
            patch_size: cfg.patch_size,
            embed_dim: e,
            num_registers: a.num_register_tokens,
            head_dim: e / a.num_heads,
        })
    }

    pub fn depth(&self) -> usize {
        self.frame_blocks.len()
    }

    pub fn patch_start_idx(&self) -> usize {
        1 + self.num_registers
    }

    /// One frame `images [1, 3, H, W]` in [0, 1] → per block `concat(frame, global)` tokens
    /// `[1, P, 2E]`. Frame 0 takes camera/register slot 0, later frames slot 1.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(
        &self,
        images: &Tensor,
        frame_index: usize,
        memory: &mut StreamMemory,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = images.dims4()?;
        let dev = Device::Cpu;
        let dt = images.dtype();
        let mean = Tensor::from_slice(&RESNET_MEAN, (1, 3, 1, 1), &dev)?.to_dtype(dt)?;
        let std = Tensor::from_slice(&RESNET_STD, (1, 3, 1, 1), &dev)?.to_dtype(dt)?;
        let x = images.broadcast_sub(&mean)?.broadcast_div(&std)?;
        taps("normalized_image", &x);
        let patches = self.patch_embed.forward(&x, taps)?;
        taps("patch_tokens", &patches);
        let slot = usize::from(frame_index > 0);
        let cam = self.camera_token.get(0)?.get(slot)?.unsqueeze(0)?;
        let reg = self.register_token.get(0)?.get(slot)?.unsqueeze(0)?;
        let mut tokens = Tensor::cat(&[&cam, &reg, &patches], 1)?;
        taps("agg.tokens_in", &tokens);
        let p = tokens.dim(1)?;
        let rope = match &self.rope {
            Some(r) => {
                let (hp, wp) = (h / self.patch_size, w / self.patch_size);
                let mut pos = vec![(0u32, 0u32); self.patch_start_idx()];
                pos.extend(
                    (0..hp).flat_map(|r| (0..wp).map(move |c| (r as u32 + 1, c as u32 + 1))),
                );
                Some(r.tables(&pos, self.head_dim)?)
            }
            None => None,
        };
        memory.begin_frame(frame_index, p);
        let mut out = Vec::with_capacity(self.depth());
        for (l, (fb, gb)) in self
            .frame_blocks
            .iter()
            .zip(&self.global_blocks)
            .enumerate()
        {
            tokens = fb.forward(&tokens, rope.as_ref(), None)?;
            taps(&format!("agg.frame_block{l}"), &tokens);
            let frame_out = tokens.clone();
            tokens = gb.forward(&tokens, rope.as_ref(), Some(&mut memory.global[l]))?;
            taps(&format!("agg.global_block{l}"), &tokens);
            out.push(Tensor::cat(&[&frame_out, &tokens], 2)?);
        }
        memory.end_frame();
        debug_assert_eq!(out[0].dim(2).ok(), Some(2 * self.embed_dim));
        Ok(out)
    }
}
