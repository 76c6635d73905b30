//! `MOFNetStack/stack.py` (PCBlock, the motion encoder with its propagated hidden state, the
//! update block) and `gma.py` (context attention and motion aggregation).

use candle_core::{Module, Tensor};

use super::config::VideoFlowConfig;
use crate::ops::{
    conv2d, depthwise_residual_gelu, gelu_erf, grid_sample_pixels, Activation, Conv2d,
};
use crate::weights::Vb;
use streamrecon_core::error::Result;

/// Channels of the motion hidden state.
const MOTION_STATE: usize = 48;

/// `PCBlock4_Deep_nopool_res`: `gelu(x + ffn1(x))`, `gelu(x + dwconv(x))` per kernel,
/// `gelu(x + pw(x))`, `ffn2`.
pub struct PcBlock {
    dw: Vec<(Tensor, Tensor)>,
    ffn1: (Conv2d, Conv2d),
    pw: Conv2d,
    ffn2: (Conv2d, Conv2d),
}

impl PcBlock {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, c_in: usize, c_out: usize, kernels: &[usize]) -> Result<Self> {
        let hidden = (1.5 * c_in as f64) as usize;
        let dw = kernels
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let v = vb.pp("conv_list").pp(i);
                Ok((v.get("weight", (c_in, 1, k, k))?, v.get("bias", c_in)?))
            })
            .collect::<Result<_>>()?;
        let pair = |name: &str, out: usize| -> Result<(Conv2d, Conv2d)> {
            Ok((
                conv2d(&vb.pp(name).pp(0), c_in, hidden, 1, 1, 0, true)?,
                conv2d(&vb.pp(name).pp(2), hidden, out, 1, 1, 0, true)?,
            ))
        };
        Ok(Self {
            dw,
            ffn1: pair("ffn1", c_in)?,
            pw: conv2d(&vb.pp("pw"), c_in, c_in, 1, 1, 0, true)?,
            ffn2: pair("ffn2", c_out)?,
        })
    }

    /// # Errors
    /// Tensor op failure.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // ffn(x) = f.1(gelu(f.0(x))); each GELU and residual is applied in the convolution's
        // output buffer.
        let hidden = |f: &(Conv2d, Conv2d), x: &Tensor| f.0.forward_then(x, None, Activation::Gelu);
        let h = hidden(&self.ffn1, x)?;
        let mut x = self.ffn1.1.forward_then(&h, Some(x), Activation::Gelu)?;
        for (w, b) in &self.dw {
            x = depthwise_residual_gelu(&x, w, b)?;
        }
        x = self.pw.forward_then(&x, Some(&x), Activation::Gelu)?;
        Ok(self.ffn2.1.forward(&hidden(&self.ffn2, &x)?)?)
    }
}

/// `SKMotionEncoder6_Deep_nopool_res`.
pub struct MotionEncoder {
    convc1: PcBlock,
    convc2: PcBlock,
    init_hidden_state: Tensor,
    convf1: Conv2d,
    convf2: PcBlock,
    conv: PcBlock,
}

/// What the motion encoder passes on.
pub struct Motion {
    /// `[B·N, 128, h, w]`: features (124) and both flows (4).
    pub features: Tensor,
    /// `[B·N, 48, h, w]`.
    pub hidden: Tensor,
}

impl MotionEncoder {
    fn new(vb: &Vb, cfg: &VideoFlowConfig) -> Result<Self> {
        let k = &cfg.mof.k_conv;
        let cor = cfg.cor_planes();
        // Never called by the reference; read so the checkpoint is accounted for.
        let v = vb.pp("velocity_update_block").pp("mlp");
        for (i, (cin, cout)) in [(214, 64), (64, 64), (64, 43)].into_iter().enumerate() {
            conv2d(&v.pp(2 * i), cin, cout, 3, 1, 1, true)?;
        }
        Ok(Self {
            convc1: PcBlock::new(&vb.pp("convc1"), cor, 128, k)?,
            convc2: PcBlock::new(&vb.pp("convc2"), 256, 192, k)?,
            init_hidden_state: vb.get("init_hidden_state", (1, 1, MOTION_STATE, 1, 1))?,
            convf1: conv2d(&vb.pp("convf1_"), 4, 128, 1, 1, 0, true)?,
            convf2: PcBlock::new(&vb.pp("convf2"), 128, 64, k)?,
            conv: PcBlock::new(
                &vb.pp("conv"),
                64 + 192 + MOTION_STATE * 3,
                128 - 4 + MOTION_STATE,
                k,
            )?,
        })
    }

    /// Middle frames `n` of one batch; neighbours' hidden states are warped along the flows
    /// (zeros beyond the first and last middle frame).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        hidden: Option<&Tensor>,
        forward_flow: &Tensor,
        backward_flow: &Tensor,
        coords0: &Tensor,
        forward_corr: &Tensor,
        backward_corr: &Tensor,
    ) -> Result<Motion> {
        let (n, _, h, w) = forward_flow.dims4()?;
        let hidden = match hidden {
            Some(s) => s.clone(),
            None => self
                .init_hidden_state
                .reshape((1, MOTION_STATE, 1, 1))?
                .broadcast_as((n, MOTION_STATE, h, w))?
                .contiguous()?,
        };
        let zeros = Tensor::zeros((1, MOTION_STATE, h, w), hidden.dtype(), hidden.device())?;
        // One middle frame (a 3-frame input) has no neighbours: candle's cat cannot take the
        // empty part.
        let (next, prev) = if n == 1 {
            (zeros.clone(), zeros)
        } else {
            (
                Tensor::cat(&[&hidden.narrow(0, 1, n - 1)?, &zeros], 0)?,
                Tensor::cat(&[&zeros, &hidden.narrow(0, 0, n - 1)?], 0)?,
            )
        };
        let warp = |state: &Tensor, flow: &Tensor| -> Result<Tensor> {
            let loc = (flow + coords0)?.permute((0, 2, 3, 1))?.contiguous()?;
            grid_sample_pixels(state, &loc)
        };
        let fwd_state = warp(&next, forward_flow)?;
        let bwd_state = warp(&prev, backward_flow)?;
        let cor = gelu_erf(&Tensor::cat(
            &[
                &self.convc1.forward(forward_corr)?,
                &self.convc1.forward(backward_corr)?,
            ],
            1,
        )?)?;
        let cor = self.convc2.forward(&cor)?;
        let flow = Tensor::cat(&[forward_flow, backward_flow], 1)?;
        let flo = self.convf2.forward(&self.convf1.forward(&flow)?)?;
        let out = self.conv.forward(&Tensor::cat(
            &[&cor, &flo, &fwd_state, &bwd_state, &hidden],
            1,
        )?)?;
        let feats = out.narrow(1, 0, 124)?;
        Ok(Motion {
            features: Tensor::cat(&[&feats, &flow], 1)?,
            hidden: out.narrow(1, 124, MOTION_STATE)?.contiguous()?,
        })
    }
}

/// `gma.py::Attention` (the relative position embedding is built by the reference but unused).
pub struct GmaAttention {
    to_qk: Conv2d,
    dim_head: usize,
}

impl GmaAttention {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, dim: usize) -> Result<Self> {
        let pe = vb.pp("pos_emb");
        let max_pos = 160;
        pe.pp("rel_height").get("weight", (2 * max_pos - 1, dim))?;
        pe.pp("rel_width").get("weight", (2 * max_pos - 1, dim))?;
        // An int64 index buffer of the unused embedding.
        pe.get("rel_ind", (max_pos, max_pos))?;
        Self::without_position_embedding(vb, dim)
    }

    /// StreamFlow's copy, which no longer builds the position embedding.
    ///
    /// # Errors
    /// Missing or misshapen weights.
    pub fn without_position_embedding(vb: &Vb, dim: usize) -> Result<Self> {
        Ok(Self {
            to_qk: conv2d(&vb.pp("to_qk"), dim, 2 * dim, 1, 1, 0, false)?,
            dim_head: dim,
        })
    }

    /// `fmap [B, C, h, w]` → softmax attention `[B, 1, hw, hw]`.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(&self, fmap: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = fmap.dims4()?;
        let qk = self.to_qk.forward(fmap)?.chunk(2, 1)?;
        let flat = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, 1, self.dim_head, h * w))?
                .transpose(2, 3)?
                .contiguous()?)
        };
        let q = (flat(&qk[0])? * (self.dim_head as f64).powf(-0.5))?;
        let k = flat(&qk[1])?;
        let sim = q.matmul(&k.t()?)?;
        Ok(candle_nn::ops::softmax_last_dim(&sim)?)
    }
}

/// `gma.py::Aggregate` with one head: `fmap + γ · (attn @ to_v(fmap))`.
pub struct Aggregate {
    to_v: Conv2d,
    gamma: Tensor,
}

impl Aggregate {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, dim: usize) -> Result<Self> {
        Ok(Self {
            to_v: conv2d(&vb.pp("to_v"), dim, dim, 1, 1, 0, false)?,
            gamma: vb.get("gamma", 1)?,
        })
    }

    /// `attn [B, 1, hw, hw]`, `fmap [B, C, h, w]`.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(&self, attn: &Tensor, fmap: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = fmap.dims4()?;
        let v = self
            .to_v
            .forward(fmap)?
            .reshape((b, 1, c, h * w))?
            .transpose(2, 3)?
            .contiguous()?;
        let out = attn.matmul(&v)?.transpose(2, 3)?.reshape((b, c, h, w))?;
        Ok((fmap + out.broadcast_mul(&self.gamma)?)?)
    }
}

/// `SKUpdateBlock6_Deep_nopoolres_AllDecoder2`.
pub struct UpdateBlock {
    encoder: MotionEncoder,
    gru: PcBlock,
    flow_head: PcBlock,
    mask0: Conv2d,
    mask2: Conv2d,
    aggregator: Aggregate,
}

/// One refinement step's results.
pub struct UpdateOut {
    pub net: Tensor,
    pub hidden: Tensor,
    /// `100 · mask`, `[B·N, 2·64·9, h, w]`, where asked for.
    pub up_mask: Option<Tensor>,
    /// `[B·N, 4, h, w]`: forward then backward flow deltas.
    pub delta_flow: Tensor,
    pub motion_features: Tensor,
    pub motion_features_global: Tensor,
}

impl UpdateBlock {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, cfg: &VideoFlowConfig) -> Result<Self> {
        let hd = cfg.update_dim();
        let dr = cfg.mof.down_ratio;
        let m = vb.pp("mask");
        Ok(Self {
            encoder: MotionEncoder::new(&vb.pp("encoder"), cfg)?,
            gru: PcBlock::new(
                &vb.pp("gru"),
                128 + hd + hd + 128,
                hd,
                &cfg.mof.pc_updater_conv,
            )?,
            flow_head: PcBlock::new(&vb.pp("flow_head"), hd, 4, &cfg.mof.k_conv)?,
            mask0: conv2d(&m.pp(0), hd, 2 * hd, 3, 1, 1, true)?,
            mask2: conv2d(&m.pp(2), 2 * hd, dr * dr * 9 * 2, 1, 1, 0, true)?,
            aggregator: Aggregate::new(&vb.pp("aggregator"), 128)?,
        })
    }

    /// # Errors
    /// Tensor op failure.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        net: &Tensor,
        hidden: Option<&Tensor>,
        inp: &Tensor,
        forward_corr: &Tensor,
        backward_corr: &Tensor,
        forward_flow: &Tensor,
        backward_flow: &Tensor,
        coords0: &Tensor,
        attention: &Tensor,
        with_mask: bool,
    ) -> Result<UpdateOut> {
        let motion = self.encoder.forward(
            hidden,
            forward_flow,
            backward_flow,
            coords0,
            forward_corr,
            backward_corr,
        )?;
        let global = self.aggregator.forward(attention, &motion.features)?;
        let net = self
            .gru
            .forward(&Tensor::cat(&[net, inp, &motion.features, &global], 1)?)?;
        let delta_flow = self.flow_head.forward(&net)?;
        let up_mask = if with_mask {
            Some((self.mask2.forward(&self.mask0.forward_relu(&net)?)? * 100.0)?)
        } else {
            None
        };
        Ok(UpdateOut {
            net,
            hidden: motion.hidden,
            up_mask,
            delta_flow,
            motion_features: motion.features,
            motion_features_global: global,
        })
    }
}

/// Convex 8× upsampling: `softmax` over the 9 taps of `mask [N, 9·64, h, w]` (already scaled)
/// weighting the 3×3 neighbourhood (zero padded) of `8 · flow [N, 2, h, w]`.
///
/// # Errors
/// Tensor op failure.
pub fn upsample_flow(flow: &Tensor, mask: &Tensor, ratio: usize) -> Result<Tensor> {
    let (n, _, h, w) = flow.dims4()?;
    let mask = mask.reshape(vec![n, 1, 9, ratio, ratio, h, w])?;
    let mask = candle_nn::ops::softmax(&mask, 2)?;
    // unfold(ratio · flow, 3×3, padding 1): tap t = (dy+1)·3 + (dx+1).
    let f = (flow * ratio as f64)?
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            taps.push(f.narrow(2, dy, h)?.narrow(3, dx, w)?);
        }
    }
    let up = Tensor::stack(&taps, 2)?.reshape(vec![n, 2, 9, 1, 1, h, w])?;
    let up = mask.broadcast_mul(&up)?.sum(2)?;
    let up = up.permute(vec![0, 1, 4, 2, 5, 3])?;
    Ok(up.reshape((n, 2, ratio * h, ratio * w))?)
}

/// Splits channels `[.., first | rest, ..]` (dim 1).
///
/// # Errors
/// `first` beyond the channel count.
pub fn split_channels(t: &Tensor, first: usize) -> Result<(Tensor, Tensor)> {
    let c = t.dim(1)?;
    Ok((t.narrow(1, 0, first)?, t.narrow(1, first, c - first)?))
}
