//! `layers/`: Mlp, LayerScale, Attention (qk-norm, 2D RoPE, causal KV cache) and Block.

use crate::ops::Linear;
use candle_core::{Module, Tensor, D};
use candle_nn::LayerNorm;

use super::memory::LayerKv;
use crate::ops::{layer_norm, linear};
use crate::weights::Vb;
use streamrecon_core::error::Result;

/// `layers/mlp.py::Mlp`: fc1 → GELU (erf) → fc2.
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, dim: usize, hidden: usize, out: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            fc1: linear(&vb.pp("fc1"), dim, hidden, bias)?,
            fc2: linear(&vb.pp("fc2"), hidden, out, bias)?,
        })
    }

    /// # Errors
    /// Tensor op failure.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.fc1.forward_gelu(x)?)?)
    }
}

/// 2D rotary position embedding (`layers/rope.py`): the first half of each head rotated by the
/// token's row, the second half by its column; non-interleaved rotate-half.
pub struct Rope2d {
    base: f32,
}

/// cos/sin tables of one token layout, `[N, head_dim/2]` for rows and for columns.
pub struct RopeTables {
    /// `[cos_y, sin_y, cos_x, sin_x]`, each `[N, head_dim/2]` row-major.
    values: [Vec<f32>; 4],
    half: usize,
}

impl Rope2d {
    pub fn new(base: f64) -> Self {
        Self { base: base as f32 }
    }

    /// Tables for tokens at integer positions `(y, x)`.
    ///
    /// # Errors
    /// Tensor allocation.
    pub fn tables(&self, positions: &[(u32, u32)], head_dim: usize) -> Result<RopeTables> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half / 2)
            .map(|i| 1.0 / self.base.powf((2 * i) as f32 / half as f32))
            .collect();
        let n = positions.len();
        let mut tabs = [
            vec![0f32; n * half],
            vec![0f32; n * half],
            vec![0f32; n * half],
            vec![0f32; n * half],
        ];
        for (t, &(py, px)) in positions.iter().enumerate() {
            for (i, &f) in inv_freq.iter().enumerate() {
                let ay = py as f32 * f;
                let ax = px as f32 * f;
                for off in [i, i + half / 2] {
                    tabs[0][t * half + off] = ay.cos();
                    tabs[1][t * half + off] = ay.sin();
                    tabs[2][t * half + off] = ax.cos();
                    tabs[3][t * half + off] = ax.sin();
                }
            }
        }
        Ok(RopeTables { values: tabs, half })
    }
}

impl RopeTables {
    /// Rotates `x [B, H, N, D]`.
    ///
    /// # Errors
    /// Shape mismatch.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == candle_core::DType::F32 && x.device().is_cpu() {
            return self.apply_f32(x);
        }
        let d = x.dim(D::Minus1)?;
        let half = d / 2;
        let dt = x.dtype();
        // Other dtypes and devices (f16): the tables as tensors, made per call.
        let table = |i: usize| -> Result<Tensor> {
            let v = &self.values[i];
            Ok(
                Tensor::from_slice(v, (v.len() / self.half.max(1), self.half), x.device())?
                    .to_dtype(dt)?,
            )
        };
        let one = |t: &Tensor, cos: &Tensor, sin: &Tensor| -> Result<Tensor> {
            let q = half / 2;
            let t1 = t.narrow(D::Minus1, 0, q)?;
            let t2 = t.narrow(D::Minus1, q, q)?;
            let rot = Tensor::cat(&[&t2.neg()?, &t1], D::Minus1)?;
            Ok((t.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
        };
        let y = one(&x.narrow(D::Minus1, 0, half)?, &table(0)?, &table(1)?)?;
        let xx = one(&x.narrow(D::Minus1, half, half)?, &table(2)?, &table(3)?)?;
        Ok(Tensor::cat(&[&y, &xx], D::Minus1)?)
    }
}

impl RopeTables {
    /// [`Self::apply`] in one pass over an f32 tensor (the composed version allocates a dozen
    /// intermediate tensors per call).
    fn apply_f32(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let (_, _, n, d) = x.dims4()?;
        let half = d / 2;
        let q = half / 2;
        if self.values[0].len() != n * half {
            return Err(streamrecon_core::error::Error::Model(format!(
                "RoPE tables for {} tokens applied to {n}",
                self.values[0].len() / half.max(1)
            )));
        }
        let [cy, sy, cx, sx] = &self.values;
        let out = crate::gemm::with_f32(x, |data| {
            let mut out = crate::gemm::filled(data.len(), 0.0);
            out.par_chunks_mut(n * d)
                .zip(data.par_chunks(n * d))
                .for_each(|(o_head, x_head)| {
                    for (t, (o, xv)) in o_head
                        .chunks_exact_mut(d)
                        .zip(x_head.chunks_exact(d))
                        .enumerate()
                    {
                        let tab = t * half..(t + 1) * half;
                        for (base, cos, sin) in [
                            (0, &cy[tab.clone()], &sy[tab.clone()]),
                            (half, &cx[tab.clone()], &sx[tab]),
                        ] {
                            let v = &xv[base..base + half];
                            let o = &mut o[base..base + half];
                            for j in 0..half {
                                // rotate-half: (−second quarter, first quarter)
                                let rot = if j < q { -v[j + q] } else { v[j - q] };
                                o[j] = v[j] * cos[j] + rot * sin[j];
                            }
                        }
                    }
                });
            out
        })?;
        Ok(Tensor::from_vec(out, x.shape(), x.device())?)
    }
}

/// `layers/attention.py::Attention`.
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    q_norm: Option<LayerNorm>,
    k_norm: Option<LayerNorm>,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(
        vb: &Vb,
        dim: usize,
        num_heads: usize,
        qkv_bias: bool,
        proj_bias: bool,
        qk_norm: Option<f64>,
    ) -> Result<Self> {
        let head_dim = dim / num_heads;
        let (q_norm, k_norm) = match qk_norm {
            Some(eps) => (
                Some(layer_norm(&vb.pp("q_norm"), head_dim, eps)?),
                Some(layer_norm(&vb.pp("k_norm"), head_dim, eps)?),
            ),
            None => (None, None),
        };
        Ok(Self {
            qkv: linear(&vb.pp("qkv"), dim, 3 * dim, qkv_bias)?,
            proj: linear(&vb.pp("proj"), dim, dim, proj_bias)?,
            q_norm,
            k_norm,
            num_heads,
            head_dim,
        })
    }

    /// `x [B, N, C]`; with `cache`, the current K/V are appended to it (and the memory may prune)
    /// before the queries attend to everything it holds.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<&RopeTables>,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.num_heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let mut q = qkv.get(0)?.contiguous()?;
        let mut k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        if let Some(r) = rope {
            q = r.apply(&q)?;
            k = r.apply(&k)?;
        }
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };
        let out = crate::attention::sdpa(&q, &k, &v, 1.0 / (self.head_dim as f64).sqrt())?;
        let out = out.transpose(1, 2)?.reshape((b, n, c))?;
        Ok(self.proj.forward(&out)?)
    }
}

/// `layers/block.py::Block`: pre-norm attention and MLP with layer scale.
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    mlp: Mlp,
    ls2: Option<Tensor>,
}

/// Sizes of one [`Block`].
pub struct BlockSpec {
    pub dim: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    pub bias: bool,
    pub qk_norm: Option<f64>,
    pub layer_scale: bool,
    pub norm_eps: f64,
}

impl Block {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, s: &BlockSpec) -> Result<Self> {
        let ls = |name: &str| -> Result<Option<Tensor>> {
            if s.layer_scale {
                Ok(Some(vb.pp(name).get("gamma", s.dim)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            norm1: layer_norm(&vb.pp("norm1"), s.dim, s.norm_eps)?,
            attn: Attention::new(
                &vb.pp("attn"),
                s.dim,
                s.num_heads,
                s.bias,
                s.bias,
                s.qk_norm,
            )?,
            ls1: ls("ls1")?,
            norm2: layer_norm(&vb.pp("norm2"), s.dim, s.norm_eps)?,
            mlp: Mlp::new(&vb.pp("mlp"), s.dim, s.mlp_hidden, s.dim, s.bias)?,
            ls2: ls("ls2")?,
        })
    }

    /// # Errors
    /// Tensor op failure.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<&RopeTables>,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let scale = |t: Tensor, g: &Option<Tensor>| -> Result<Tensor> {
            Ok(match g {
                Some(g) => t.broadcast_mul(g)?,
                None => t,
            })
        };
        let a = self.attn.forward(&self.norm1.forward(x)?, rope, cache)?;
        let x = (x + scale(a, &self.ls1)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((&x + scale(m, &self.ls2)?)?)
    }
}
