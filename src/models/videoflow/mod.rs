//! VideoFlow-MOF (`core/Networks/MOFNetStack/network.py::MOFNet`): multi-frame optical flow.
//! For a window of N frames it estimates, for each of the N−2 middle frames, the flow to the next
//! frame and to the previous one, refining both jointly for `decoder_depth` iterations with a
//! motion state propagated between neighbouring frames.
//!
//! Module tree and weight names follow the official checkpoint (`module.` prefix removed on
//! load): `fnet.svt.*`, `cnet.svt.*` ([`twins::Twins`]), `update_block.*` ([`update`]), `att.*`.

pub mod config;
pub mod corr;
pub mod twins;
pub mod update;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use config::VideoFlowConfig;

use crate::weights::Weights;
use streamrecon_core::error::{Error, Result};

/// Where given, sees a model's named intermediates (the fixtures' names) as they are made.
pub type Taps<'a> = Option<&'a mut dyn FnMut(&str, &Tensor)>;

/// `taps` as one function to call at every named intermediate (doing nothing without taps).
pub(crate) fn tap_fn(mut taps: Taps<'_>) -> impl FnMut(&str, &Tensor) + '_ {
    move |name, t| {
        if let Some(f) = taps.as_mut() {
            f(name, t);
        }
    }
}

pub struct MofNet {
    pub fnet: twins::Twins,
    pub cnet: twins::Twins,
    pub update_block: update::UpdateBlock,
    pub att: update::GmaAttention,
    pub config: VideoFlowConfig,
}

/// Padding of the reference's `InputPadder` in "sintel" mode: to a multiple of 8, half on each
/// side (the extra pixel right/bottom), replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub left: usize,
    pub right: usize,
    pub top: usize,
    pub bottom: usize,
}

impl Padding {
    pub fn sintel(h: usize, w: usize) -> Self {
        let ph = (h.div_ceil(8)) * 8 - h;
        let pw = (w.div_ceil(8)) * 8 - w;
        Self {
            left: pw / 2,
            right: pw - pw / 2,
            top: ph / 2,
            bottom: ph - ph / 2,
        }
    }
}

impl MofNet {
    /// # Errors
    /// Missing, misshapen or unexpected tensors, naming the first ones.
    pub fn new(weights: &Weights, config: VideoFlowConfig) -> Result<Self> {
        config.validate().map_err(Error::Model)?;
        let net = Self {
            fnet: twins::Twins::new(&weights.pp("fnet.svt"), &config.twins)?,
            cnet: twins::Twins::new(&weights.pp("cnet.svt"), &config.twins)?,
            update_block: update::UpdateBlock::new(&weights.pp("update_block"), &config)?,
            att: update::GmaAttention::new(&weights.pp("att"), config.update_dim())?,
            config,
        };
        weights.finish(&[])?;
        Ok(net)
    }

    /// # Errors
    /// As [`Weights::load`] and [`Self::new`].
    pub fn load(path: &Path, config: VideoFlowConfig) -> Result<Self> {
        Self::new(&Weights::load(path, DType::F32)?, config)
    }

    /// `frames [N, 3, H, W]` with values 0..255 (N ≥ 3) → `[2(N−2), 2, H, W]`: the forward flows
    /// of frames 1..N−2 to their next frame, then their backward flows; channel 0 = x.
    /// `taps`, where given, sees named intermediates.
    ///
    /// # Errors
    /// Fewer than 3 frames, or a tensor op failure.
    pub fn forward(&self, frames: &Tensor, taps: Taps) -> Result<Tensor> {
        let tapping = taps.is_some();
        let mut taps = tap_fn(taps);
        let (n, c, h, w) = frames.dims4()?;
        if n < 3 || c != 3 {
            return Err(Error::Model(format!(
                "VideoFlow needs [N ≥ 3, 3, H, W] frames, got {:?}",
                frames.dims()
            )));
        }
        let pad = Padding::sintel(h, w);
        let x = frames
            .pad_with_same(3, pad.left, pad.right)?
            .pad_with_same(2, pad.top, pad.bottom)?;
        taps("input.padded", &x.unsqueeze(0)?);
        let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
        let dr = self.config.mof.down_ratio;
        let (h8, w8) = (hp / dr, wp / dr);
        let x = (((x / 255.0)? * 2.0)? - 1.0)?;
        let mut fnet_taps = |name: &str, t: &Tensor| taps(&format!("fnet.{name}"), t);
        let fmaps = self.fnet.forward(&x, &mut fnet_taps)?;
        taps("fnet.out", &fmaps);
        let m = n - 2;
        let mid = fmaps.narrow(0, 1, m)?;
        let levels = self.config.mof.corr_levels;
        let radius = self.config.mof.corr_radius;
        let fwd_corr = corr::CorrBlock::new(&mid, &fmaps.narrow(0, 2, m)?, levels, radius)?;
        let bwd_corr = corr::CorrBlock::new(&mid, &fmaps.narrow(0, 0, m)?, levels, radius)?;
        let cnet = self.cnet.forward(&x.narrow(0, 1, m)?, &mut |_, _| {})?;
        taps("cnet.out", &cnet);
        let (net, inp) = update::split_channels(&cnet, self.config.hidden_dim())?;
        let mut net = net.tanh()?;
        let inp = crate::ops::relu(&inp)?;
        let attention = self.att.forward(&inp)?;
        taps("context.attention", &attention);
        let coords0 = coords_grid(m, h8, w8)?;
        let mut fwd_coords1 = coords0.clone();
        let mut bwd_coords1 = coords0.clone();
        let mut hidden: Option<Tensor> = None;
        let mut last_up = None;
        let depth = self.config.mof.decoder_depth;
        for it in 0..depth {
            let fc = fwd_corr.lookup(&fwd_coords1)?;
            let bc = bwd_corr.lookup(&bwd_coords1)?;
            let fflow = (&fwd_coords1 - &coords0)?;
            let bflow = (&bwd_coords1 - &coords0)?;
            if it == 0 {
                taps("iter0.net_in", &net);
                taps("iter0.forward_corr", &fc);
                taps("iter0.backward_corr", &bc);
            }
            let out = self.update_block.forward(
                &net,
                hidden.as_ref(),
                &inp,
                &fc,
                &bc,
                &fflow,
                &bflow,
                &coords0,
                &attention,
                // The reference upsamples every iteration's flow and returns the last; only the
                // last mask shapes the output (the first's is a tap).
                it + 1 == depth || (it == 0 && tapping),
            )?;
            if it == 0 {
                taps("iter0.motion_features", &out.motion_features);
                taps("iter0.motion_features_global", &out.motion_features_global);
                taps("iter0.net_out", &out.net);
                taps("iter0.motion_hidden_state_out", &out.hidden);
                if let Some(up_mask) = &out.up_mask {
                    taps("iter0.up_mask.pair0", &up_mask.narrow(0, 0, 1)?);
                }
            }
            taps(&format!("iter{it}.delta_flow"), &out.delta_flow);
            fwd_coords1 = (fwd_coords1 + out.delta_flow.narrow(1, 0, 2)?)?;
            bwd_coords1 = (bwd_coords1 + out.delta_flow.narrow(1, 2, 2)?)?;
            net = out.net;
            hidden = Some(out.hidden);
            last_up = out.up_mask;
        }
        let up_mask = last_up.ok_or_else(|| Error::Model("decoder_depth is 0".into()))?;
        let half = dr * dr * 9;
        let fwd = update::upsample_flow(
            &(&fwd_coords1 - &coords0)?,
            &up_mask.narrow(1, 0, half)?,
            dr,
        )?;
        let bwd = update::upsample_flow(
            &(&bwd_coords1 - &coords0)?,
            &up_mask.narrow(1, half, half)?,
            dr,
        )?;
        let flow = Tensor::cat(&[&fwd, &bwd], 0)?;
        Ok(flow
            .narrow(2, pad.top, h)?
            .narrow(3, pad.left, w)?
            .contiguous()?)
    }
}

/// `[B, 2, h, w]` pixel coordinates (x, y).
pub(crate) fn coords_grid(b: usize, h: usize, w: usize) -> Result<Tensor> {
    let dev = Device::Cpu;
    let xs = Tensor::arange(0f32, w as f32, &dev)?
        .reshape((1, 1, w))?
        .broadcast_as((1, h, w))?;
    let ys = Tensor::arange(0f32, h as f32, &dev)?
        .reshape((1, h, 1))?
        .broadcast_as((1, h, w))?;
    Ok(Tensor::cat(&[&xs, &ys], 0)?
        .unsqueeze(0)?
        .broadcast_as((b, 2, h, w))?
        .contiguous()?)
}
