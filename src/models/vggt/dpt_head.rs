//! `heads/dpt_head.py::DPTHead`: four token layers projected and resized to a pyramid, fused
//! coarse to fine by residual refinement blocks, upsampled to the image and activated.

use candle_core::{Module, Tensor, D};
use candle_nn::LayerNorm;

use super::config::DptConfig;
use crate::ops::{
    conv2d, conv_transpose2d, layer_norm, resize_bilinear_align_corners, Conv2d,
    PatchConvTranspose2d,
};
use crate::weights::Vb;
use streamrecon_core::error::{Error, Result};

/// Hard-coded in the reference.
const HEAD_FEATURES_2: usize = 32;

enum Resize {
    Up(PatchConvTranspose2d),
    Identity,
    Down(Conv2d),
}

/// `ResidualConvUnit`; the skip adds `relu(x)` because the reference's in-place ReLU overwrote x.
struct ResidualConvUnit {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualConvUnit {
    fn new(vb: &Vb, f: usize) -> Result<Self> {
        Ok(Self {
            conv1: conv2d(&vb.pp("conv1"), f, f, 3, 1, 1, true)?,
            conv2: conv2d(&vb.pp("conv2"), f, f, 3, 1, 1, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rx = crate::ops::relu(x)?;
        let out = self.conv2.forward(&self.conv1.forward_relu(&rx)?)?;
        Ok((out + rx)?)
    }
}

/// `FeatureFusionBlock`.
struct FeatureFusionBlock {
    res_conf_unit1: Option<ResidualConvUnit>,
    res_conf_unit2: ResidualConvUnit,
    out_conv: Conv2d,
}

impl FeatureFusionBlock {
    fn new(vb: &Vb, f: usize, has_residual: bool) -> Result<Self> {
        Ok(Self {
            res_conf_unit1: if has_residual {
                Some(ResidualConvUnit::new(&vb.pp("resConfUnit1"), f)?)
            } else {
                None
            },
            res_conf_unit2: ResidualConvUnit::new(&vb.pp("resConfUnit2"), f)?,
            out_conv: conv2d(&vb.pp("out_conv"), f, f, 1, 1, 0, true)?,
        })
    }

    /// Output resized to `size`, or doubled.
    fn forward(
        &self,
        x: &Tensor,
        skip: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut out = x.clone();
        if let (Some(unit), Some(s)) = (&self.res_conf_unit1, skip) {
            out = (out + unit.forward(s)?)?;
        }
        let out = self.res_conf_unit2.forward(&out)?;
        let (h, w) = (out.dim(2)?, out.dim(3)?);
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let out = resize_bilinear_align_corners(&out, oh, ow)?;
        Ok(self.out_conv.forward(&out)?)
    }
}

pub struct DptHead {
    norm: LayerNorm,
    projects: Vec<Conv2d>,
    resize_layers: Vec<Resize>,
    layer_rn: Vec<Conv2d>,
    refinenets: Vec<FeatureFusionBlock>,
    output_conv1: Conv2d,
    output_conv2_0: Conv2d,
    output_conv2_2: Conv2d,
    cfg: DptConfig,
    patch_size: usize,
    /// Position embeddings already made, by (channels, h, w, aspect bits, dtype): a stream's
    /// frames all share a size, and making one costs ~1e5 sin/cos.
    pos_embeds: std::sync::Mutex<Vec<(PosKey, Tensor)>>,
}

type PosKey = (usize, usize, usize, u64, candle_core::DType);

impl DptHead {
    /// # Errors
    /// Missing or misshapen weights, or an unknown activation.
    pub fn new(vb: &Vb, cfg: &DptConfig, patch_size: usize) -> Result<Self> {
        if !["exp", "inv_log", "linear", "relu", "sigmoid"].contains(&cfg.activation.as_str())
            || !["expp1", "expp0", "sigmoid"].contains(&cfg.conf_activation.as_str())
        {
            return Err(Error::Model(format!(
                "DPT head: unsupported activation {}/{}",
                cfg.activation, cfg.conf_activation
            )));
        }
        let oc = cfg.out_channels;
        let f = cfg.features;
        let scratch = vb.pp("scratch");
        let resize = vb.pp("resize_layers");
        Ok(Self {
            norm: layer_norm(&vb.pp("norm"), cfg.dim_in, 1e-5)?,
            projects: (0..4)
                .map(|i| conv2d(&vb.pp("projects").pp(i), cfg.dim_in, oc[i], 1, 1, 0, true))
                .collect::<Result<_>>()?,
            resize_layers: vec![
                Resize::Up(conv_transpose2d(&resize.pp(0), oc[0], oc[0], 4)?),
                Resize::Up(conv_transpose2d(&resize.pp(1), oc[1], oc[1], 2)?),
                Resize::Identity,
                Resize::Down(conv2d(&resize.pp(3), oc[3], oc[3], 3, 2, 1, true)?),
            ],
            layer_rn: (0..4)
                .map(|i| {
                    conv2d(
                        &scratch.pp(format!("layer{}_rn", i + 1)),
                        oc[i],
                        f,
                        3,
                        1,
                        1,
                        false,
                    )
                })
                .collect::<Result<_>>()?,
            refinenets: (0..4)
                .map(|i| {
                    FeatureFusionBlock::new(&scratch.pp(format!("refinenet{}", i + 1)), f, i != 3)
                })
                .collect::<Result<_>>()?,
            output_conv1: conv2d(&scratch.pp("output_conv1"), f, f / 2, 3, 1, 1, true)?,
            output_conv2_0: conv2d(
                &scratch.pp("output_conv2").pp(0),
                f / 2,
                HEAD_FEATURES_2,
                3,
                1,
                1,
                true,
            )?,
            output_conv2_2: conv2d(
                &scratch.pp("output_conv2").pp(2),
                HEAD_FEATURES_2,
                cfg.output_dim,
                1,
                1,
                0,
                true,
            )?,
            cfg: cfg.clone(),
            patch_size,
            pos_embeds: std::sync::Mutex::default(),
        })
    }

    /// Block outputs `[1, P, 2E]` → (prediction `[1, H, W, C−1]`, confidence `[1, H, W]`);
    /// `taps` sees the stages under `prefix`.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(
        &self,
        tokens: &[Tensor],
        patch_start_idx: usize,
        (h, w): (usize, usize),
        prefix: &str,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (ph, pw) = (h / self.patch_size, w / self.patch_size);
        let mut feats = Vec::with_capacity(4);
        for (i, &layer) in self.cfg.intermediate_layer_idx.iter().enumerate() {
            let t = &tokens[layer];
            let n = t.dim(1)?;
            let x = self
                .norm
                .forward(&t.narrow(1, patch_start_idx, n - patch_start_idx)?)?;
            let x = x.transpose(1, 2)?.reshape((1, x.dim(2)?, ph, pw))?;
            let x = self.projects[i].forward(&x)?;
            taps(&format!("{prefix}.project{i}"), &x);
            let x = if self.cfg.pos_embed {
                let pe = self.pos_embed(x.dim(1)?, ph, pw, w as f64 / h as f64, x.dtype())?;
                taps(&format!("{prefix}.pos_embed{i}"), &pe.unsqueeze(0)?);
                x.broadcast_add(&pe)?
            } else {
                x
            };
            let x = match &self.resize_layers[i] {
                Resize::Up(c) => c.forward(&x)?,
                Resize::Identity => x,
                Resize::Down(c) => c.forward(&x)?,
            };
            taps(&format!("{prefix}.resize{i}"), &x);
            feats.push(x);
        }
        let rn: Vec<Tensor> = feats
            .iter()
            .zip(&self.layer_rn)
            .enumerate()
            .map(|(i, (x, c))| {
                let y = c.forward(x)?;
                taps(&format!("{prefix}.layer{}_rn", i + 1), &y);
                Ok(y)
            })
            .collect::<Result<_>>()?;
        let size = |t: &Tensor| -> Result<(usize, usize)> { Ok((t.dim(2)?, t.dim(3)?)) };
        let mut out = self.refinenets[3].forward(&rn[3], None, Some(size(&rn[2])?))?;
        taps(&format!("{prefix}.refinenet4"), &out);
        out = self.refinenets[2].forward(&out, Some(&rn[2]), Some(size(&rn[1])?))?;
        taps(&format!("{prefix}.refinenet3"), &out);
        out = self.refinenets[1].forward(&out, Some(&rn[1]), Some(size(&rn[0])?))?;
        taps(&format!("{prefix}.refinenet2"), &out);
        out = self.refinenets[0].forward(&out, Some(&rn[0]), None)?;
        taps(&format!("{prefix}.refinenet1"), &out);
        let out = self.output_conv1.forward(&out)?;
        taps(&format!("{prefix}.output_conv1"), &out);
        let (oh, ow) = (
            ph * self.patch_size / self.cfg.down_ratio,
            pw * self.patch_size / self.cfg.down_ratio,
        );
        let mut out = resize_bilinear_align_corners(&out, oh, ow)?;
        if self.cfg.pos_embed {
            let pe = self.pos_embed(out.dim(1)?, oh, ow, w as f64 / h as f64, out.dtype())?;
            out = out.broadcast_add(&pe)?;
        }
        let out = self
            .output_conv2_2
            .forward(&self.output_conv2_0.forward_relu(&out)?)?;
        taps(&format!("{prefix}.output_conv2"), &out);
        self.activate(&out)
    }

    /// [`pos_embed`], made once per size.
    fn pos_embed(
        &self,
        channels: usize,
        h: usize,
        w: usize,
        aspect: f64,
        dtype: candle_core::DType,
    ) -> Result<Tensor> {
        let key = (channels, h, w, aspect.to_bits(), dtype);
        let mut made = self
            .pos_embeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, t)) = made.iter().find(|(k, _)| *k == key) {
            return Ok(t.clone());
        }
        let t = pos_embed(channels, h, w, aspect)?.to_dtype(dtype)?;
        // A handful of sizes at most; a service with many sizes keeps the latest few.
        if made.len() >= 16 {
            made.remove(0);
        }
        made.push((key, t.clone()));
        Ok(t)
    }

    fn activate(&self, out: &Tensor) -> Result<(Tensor, Tensor)> {
        let fmap = out.permute((0, 2, 3, 1))?;
        let c = fmap.dim(D::Minus1)?;
        let xyz = fmap.narrow(D::Minus1, 0, c - 1)?;
        let conf = fmap.narrow(D::Minus1, c - 1, 1)?.squeeze(D::Minus1)?;
        let pts = match self.cfg.activation.as_str() {
            "exp" => xyz.exp()?,
            // sign(y)·expm1(|y|)
            "inv_log" => (xyz.sign()? * (xyz.abs()?.exp()? - 1.0)?)?,
            "relu" => xyz.relu()?,
            "sigmoid" => candle_nn::ops::sigmoid(&xyz)?,
            _ => xyz,
        };
        let conf = match self.cfg.conf_activation.as_str() {
            "expp1" => (conf.exp()? + 1.0)?,
            "expp0" => conf.exp()?,
            _ => candle_nn::ops::sigmoid(&conf)?,
        };
        Ok((pts.contiguous()?, conf.contiguous()?))
    }
}

/// The DPT UV-grid sin/cos embedding `[C, H, W]` (×0.1): coordinates from an f32 linspace over
/// the aspect-ratio-normalised plane, angles in f64 as the reference's einsum promotes them.
fn pos_embed(channels: usize, h: usize, w: usize, aspect: f64) -> Result<Tensor> {
    let diag = (aspect * aspect + 1.0).sqrt();
    let (span_x, span_y) = (aspect / diag, 1.0 / diag);
    let xs = linspace_f32(
        -span_x * (w - 1) as f64 / w as f64,
        span_x * (w - 1) as f64 / w as f64,
        w,
    );
    let ys = linspace_f32(
        -span_y * (h - 1) as f64 / h as f64,
        span_y * (h - 1) as f64 / h as f64,
        h,
    );
    let half = channels / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 100f64.powf(i as f64 / (half as f64 / 2.0)))
        .collect();
    let mut out = vec![0f32; channels * h * w];
    for (r, &y) in ys.iter().enumerate() {
        for (c, &x) in xs.iter().enumerate() {
            for (coord, base) in [(f64::from(x), 0), (f64::from(y), half)] {
                for (i, om) in omega.iter().enumerate() {
                    let a = coord * om;
                    out[((base + i) * h + r) * w + c] = (a.sin() as f32) * 0.1;
                    out[((base + quarter + i) * h + r) * w + c] = (a.cos() as f32) * 0.1;
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (channels, h, w),
        &candle_core::Device::Cpu,
    )?)
}

/// `torch.linspace` in f32: forward from the start for the first half, backward from the end.
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps == 1 {
        return vec![s];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (steps - i - 1) as f32
            }
        })
        .collect()
}
