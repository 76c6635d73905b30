//! StreamFlow (`core/models/streamflow.py::SKFlow_MF8`, NeurIPS 2024): the flows between T
//! consecutive frames in one pass. Both encoders see the frames stacked into one image (ISC), the
//! T−1 pairs are refined together, and at each iteration a temporal transformer (GTR) lets each
//! pixel's pairs see each other before one flow head predicts every pair's update.
//!
//! Module tree and weight names follow the released checkpoints (`module.` prefix removed on
//! load): `fnet.svt.*`, `cnet.svt.*` (VideoFlow's [`Twins`]), `update_block.*` ([`update`]),
//! `att.*` (GMA).

pub mod config;
pub mod update;

use std::path::Path;

use candle_core::{DType, Tensor};

pub use config::StreamFlowConfig;

use crate::videoflow::corr::CorrBlock;
use crate::videoflow::twins::Twins;
use crate::videoflow::update::{split_channels, upsample_flow, GmaAttention};
use crate::videoflow::{coords_grid, tap_fn, Padding, Taps};
use crate::weights::Weights;
use config::{CORR_LEVELS, CORR_RADIUS, DOWN_RATIO, MIN_PADDED_SIDE};
use streamrecon_core::error::{Error, Result};

pub struct StreamFlow {
    pub fnet: Twins,
    pub cnet: Twins,
    pub update_block: update::UpdateBlock,
    pub att: GmaAttention,
    pub config: StreamFlowConfig,
}

impl StreamFlow {
    /// # Errors
    /// Missing, misshapen or unexpected tensors, naming the first ones.
    pub fn new(weights: &Weights, config: StreamFlowConfig) -> Result<Self> {
        config.validate().map_err(Error::Model)?;
        let net = Self {
            fnet: Twins::new(&weights.pp("fnet.svt"), &config.twins)?,
            cnet: Twins::new(&weights.pp("cnet.svt"), &config.twins)?,
            update_block: update::UpdateBlock::new(&weights.pp("update_block"), &config)?,
            att: GmaAttention::without_position_embedding(&weights.pp("att"), config.hidden_dim())?,
            config,
        };
        weights.finish(&[])?;
        Ok(net)
    }

    /// # Errors
    /// As [`Weights::load`] and [`Self::new`].
    pub fn load(path: &Path, config: StreamFlowConfig) -> Result<Self> {
        Self::new(&Weights::load(path, DType::F32)?, config)
    }

    /// Frames per pass (T): the flow head was trained for exactly this many.
    pub fn frames(&self) -> usize {
        self.config.args.frames
    }

    /// Refuses frames this model cannot take: not T of them, not RGB, or too small once padded.
    ///
    /// # Errors
    /// What is wrong, with the sizes.
    pub fn check_input(&self, dims: &[usize]) -> Result<()> {
        let t = self.frames();
        let [n, c, h, w] = dims else {
            return Err(Error::Model(format!(
                "StreamFlow needs frames [T = {t}, 3, H, W], got {dims:?}"
            )));
        };
        if *n != t || *c != 3 {
            return Err(Error::Model(format!(
                "StreamFlow (T = {t}) needs [{t}, 3, H, W] frames, got {dims:?}: the model's \
                 flow head is tied to the T it was trained with"
            )));
        }
        let (hp, wp) = (h.div_ceil(8) * 8, w.div_ceil(8) * 8);
        if hp < MIN_PADDED_SIDE || wp < MIN_PADDED_SIDE {
            return Err(Error::Model(format!(
                "frames of {w}x{h} are too small for StreamFlow: padded to {wp}x{hp}, each side \
                 must be at least {MIN_PADDED_SIDE} (its coarsest correlation level would have \
                 one row or column)"
            )));
        }
        Ok(())
    }

    /// `frames [T, 3, H, W]` with values 0..255 → `[T−1, 2, H, W]`: the flow from each frame to
    /// the next; channel 0 = x. `taps`, where given, sees named intermediates (the fixtures'
    /// names).
    ///
    /// # Errors
    /// Frames the model cannot take ([`Self::check_input`]), or a tensor op failure.
    pub fn forward(&self, frames: &Tensor, taps: Taps) -> Result<Tensor> {
        let mut taps = tap_fn(taps);
        self.check_input(frames.dims())?;
        let (t, _, h, w) = frames.dims4()?;
        let pairs = t - 1;
        let pad = Padding::sintel(h, w);
        let x = frames
            .pad_with_same(3, pad.left, pad.right)?
            .pad_with_same(2, pad.top, pad.bottom)?;
        taps("input.padded_u8", &x);
        let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
        let (h8, w8) = (hp / DOWN_RATIO, wp / DOWN_RATIO);
        let x = (((x / 255.0)? * 2.0)? - 1.0)?;
        let fmaps = self
            .fnet
            .forward_stacked(&x, &mut |name, t| taps(&format!("fnet.{name}"), t))?;
        taps("fnet.out", &fmaps);
        let cnet = self
            .cnet
            .forward_stacked(&x.narrow(0, 0, pairs)?, &mut |name, t| {
                taps(&format!("cnet.{name}"), t);
            })?;
        taps("cnet.out", &cnet);
        // All pairs as one batch: pair p correlates frame p with frame p + 1.
        let corr = CorrBlock::new(
            &fmaps.narrow(0, 0, pairs)?,
            &fmaps.narrow(0, 1, pairs)?,
            CORR_LEVELS,
            CORR_RADIUS,
        )?;
        let (net, inp) = split_channels(&cnet, self.config.hidden_dim())?;
        let mut net = net.tanh()?;
        let inp = crate::ops::relu(&inp)?;
        let attention = self.att.forward(&inp)?;
        taps("context.attention.pair0", &attention.narrow(0, 0, 1)?);
        taps("iter0.net_in", &net);
        taps("iter0.inp", &inp);
        let coords0 = coords_grid(pairs, h8, w8)?;
        let mut coords1 = coords0.clone();
        let iters = self.config.args.iters;
        for it in 0..iters {
            let c = corr.lookup(&coords1)?;
            let flow = (&coords1 - &coords0)?;
            match it {
                0 => taps("iter0.corr", &c),
                1 => {
                    taps("iter1.flow_in", &flow);
                    taps("iter1.corr.pair0", &c.narrow(0, 0, 1)?);
                }
                _ => {}
            }
            let out = self
                .update_block
                .forward(&net, &inp, &c, &flow, &attention)?;
            if it == 0 {
                taps("iter0.motion_features", &out.motion_features);
                taps("iter0.motion_features_global", &out.motion_features_global);
                taps(
                    "iter0.motion_features_temporal",
                    &out.motion_features_temporal,
                );
                taps("iter0.net_out", &out.net);
            }
            taps(&format!("iter{it}.delta_flow"), &out.delta_flow);
            coords1 = (coords1 + out.delta_flow)?;
            net = out.net;
        }
        // Only the last iteration's flow is returned, so only it is upsampled.
        let up_mask = self.update_block.up_mask(&net)?;
        taps(
            &format!("iter{}.up_mask.pair0", iters - 1),
            &up_mask.get(0)?,
        );
        let low = (&coords1 - &coords0)?;
        taps("final.flow_lowres", &low);
        let flow = upsample_flow(&low, &up_mask, DOWN_RATIO)?;
        Ok(flow
            .narrow(2, pad.top, h)?
            .narrow(3, pad.left, w)?
            .contiguous()?)
    }
}
