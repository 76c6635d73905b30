//! `update.py::SKUpdateBlock_TAM_v3` and what it holds: the SK motion encoder, GMA aggregation,
//! the GTR temporal block (`TemporalLayer2` → `TransformerBlock`) and the joint flow head.
//! PCBlocks, GMA and convex upsampling are VideoFlow's (`crate::videoflow::update`): the same
//! code in the reference.

use candle_core::{Module, Tensor};
use candle_nn::LayerNorm;

use super::config::StreamFlowConfig;
use crate::ops::{conv2d, gelu_erf, layer_norm, linear, Conv2d, Linear};
use crate::videoflow::update::{Aggregate, PcBlock};
use crate::weights::Vb;
use streamrecon_core::error::Result;

/// `nn.LayerNorm`'s default, which the GTR block keeps.
const GTR_NORM_EPS: f64 = 1e-5;

/// `SKMotionEncoder6_Deep_nopool_res`: correlation and flow features; the flow is passed on as
/// the last two channels.
struct MotionEncoder {
    convc1: PcBlock,
    convc2: PcBlock,
    convf1: Conv2d,
    convf2: PcBlock,
    conv: PcBlock,
}

impl MotionEncoder {
    fn new(vb: &Vb, cfg: &StreamFlowConfig) -> Result<Self> {
        let k = &cfg.args.k_conv;
        // Widths hard-coded in the reference; only the output follows decoder_dim.
        Ok(Self {
            convc1: PcBlock::new(&vb.pp("convc1"), cfg.cor_planes(), 256, k)?,
            convc2: PcBlock::new(&vb.pp("convc2"), 256, 192, k)?,
            convf1: conv2d(&vb.pp("convf1"), 2, 128, 1, 1, 0, true)?,
            convf2: PcBlock::new(&vb.pp("convf2"), 128, 64, k)?,
            conv: PcBlock::new(&vb.pp("conv"), 64 + 192, cfg.hidden_dim() - 2, k)?,
        })
    }

    /// `flow [P, 2, h, w]`, `corr [P, 324, h, w]` → `[P, hidden, h, w]`.
    fn forward(&self, flow: &Tensor, corr: &Tensor) -> Result<Tensor> {
        let cor = self
            .convc2
            .forward(&gelu_erf(&self.convc1.forward(corr)?)?)?;
        let flo = self.convf2.forward(&self.convf1.forward(flow)?)?;
        let out = self.conv.forward(&Tensor::cat(&[&cor, &flo], 1)?)?;
        Ok(Tensor::cat(&[&out, flow], 1)?)
    }
}

/// The GTR's `TransformerBlock`: pre-norm, one head, `qkv` without bias, an MLP of ratio 2,
/// over the sequence of the pairs at each pixel (no position encoding).
struct TemporalBlock {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl TemporalBlock {
    fn new(vb: &Vb, dim: usize) -> Result<Self> {
        let vb = vb.pp("transformer_block");
        let attn = vb.pp("attn");
        Ok(Self {
            norm1: layer_norm(&vb.pp("norm1"), dim, GTR_NORM_EPS)?,
            qkv: linear(&attn.pp("qkv"), dim, 3 * dim, false)?,
            proj: linear(&attn.pp("proj"), dim, dim, true)?,
            norm2: layer_norm(&vb.pp("norm2"), dim, GTR_NORM_EPS)?,
            fc1: linear(&vb.pp("mlp").pp("fc1"), dim, 2 * dim, true)?,
            fc2: linear(&vb.pp("mlp").pp("fc2"), 2 * dim, dim, true)?,
        })
    }

    /// `x [P, C, h, w]` (the pairs of one window) → the same shape, each pixel's P values
    /// attending to each other.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (p, c, h, w) = x.dims4()?;
        let seq = x.permute((2, 3, 0, 1))?.reshape((h * w, p, c))?;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(&seq)?)?
            .reshape((h * w, p, 3, c))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?) };
        let att =
            crate::attention::sdpa_batched(&part(0)?, &part(1)?, &part(2)?, (c as f64).powf(-0.5))?;
        let seq = (seq + self.proj.forward(&att)?)?;
        let mlp = self
            .fc2
            .forward(&self.fc1.forward_gelu(&self.norm2.forward(&seq)?)?)?;
        let seq = (seq + mlp)?;
        Ok(seq
            .reshape((h, w, p, c))?
            .permute((2, 3, 0, 1))?
            .contiguous()?)
    }
}

/// `SKUpdateBlock_TAM_v3`.
pub struct UpdateBlock {
    encoder: MotionEncoder,
    aggregator: Aggregate,
    gru: PcBlock,
    mask0: Conv2d,
    mask2: Conv2d,
    transformer_block: TemporalBlock,
    flow_head: PcBlock,
}

/// One refinement step's results for the P pairs of a window.
pub struct UpdateOut {
    /// `[P, hidden, h, w]`: the new hidden state.
    pub net: Tensor,
    /// `[P, 2, h, w]`.
    pub delta_flow: Tensor,
    pub motion_features: Tensor,
    pub motion_features_global: Tensor,
    pub motion_features_temporal: Tensor,
}

impl UpdateBlock {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, cfg: &StreamFlowConfig) -> Result<Self> {
        let hd = cfg.hidden_dim();
        let pairs = cfg.args.frames - 1;
        let m = vb.pp("mask");
        Ok(Self {
            encoder: MotionEncoder::new(&vb.pp("encoder"), cfg)?,
            aggregator: Aggregate::new(&vb.pp("aggregator"), hd)?,
            gru: PcBlock::new(&vb.pp("gru"), 5 * hd, hd, &cfg.args.pc_updater_conv)?,
            mask0: conv2d(&m.pp(0), hd, 2 * hd, 3, 1, 1, true)?,
            mask2: conv2d(
                &m.pp(2),
                2 * hd,
                super::config::DOWN_RATIO.pow(2) * 9,
                1,
                1,
                0,
                true,
            )?,
            transformer_block: TemporalBlock::new(&vb.pp("transformer_block"), hd)?,
            flow_head: PcBlock::new(&vb.pp("flow_head"), pairs * hd, 2 * pairs, &cfg.args.k_conv)?,
        })
    }

    /// `net`, `inp [P, hidden, h, w]`, `corr [P, 324, h, w]`, `flow [P, 2, h, w]`,
    /// `attention [P, 1, hw, hw]`.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(
        &self,
        net: &Tensor,
        inp: &Tensor,
        corr: &Tensor,
        flow: &Tensor,
        attention: &Tensor,
    ) -> Result<UpdateOut> {
        let (p, _, h, w) = net.dims4()?;
        let motion = self.encoder.forward(flow, corr)?;
        let global = self.aggregator.forward(attention, &motion)?;
        let temporal = self.transformer_block.forward(&motion)?;
        let net = self
            .gru
            .forward(&Tensor::cat(&[net, inp, &motion, &global, &temporal], 1)?)?;
        // The joint head sees every pair's hidden state, channels pair-major.
        let joint = net.reshape((1, (), h, w))?;
        let delta_flow = self.flow_head.forward(&joint)?.reshape((p, 2, h, w))?;
        Ok(UpdateOut {
            net,
            delta_flow,
            motion_features: motion,
            motion_features_global: global,
            motion_features_temporal: temporal,
        })
    }

    /// `0.25 · mask(net)`: the convex upsampling weights `[P, 64·9, h, w]`.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn up_mask(&self, net: &Tensor) -> Result<Tensor> {
        Ok((self.mask2.forward(&self.mask0.forward_relu(net)?)? * 0.25)?)
    }
}
