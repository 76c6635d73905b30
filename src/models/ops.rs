//! Layers built from checkpoint tensors, and the resampling ops candle does not have
//! (bilinear with `align_corners=True`, antialiased bicubic as PyTorch/PIL compute it).

use candle_core::{DType, Tensor};
use candle_nn::{Conv2dConfig, LayerNorm};

use super::weights::Vb;
use streamrecon_core::error::Result;

/// `nn.Linear(in_dim, out_dim, bias)`.
///
/// # Errors
/// Missing or misshapen weights.
pub fn linear(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let w = vb.get("weight", (out_dim, in_dim))?;
    let b = if bias {
        Some(vb.get("bias", out_dim)?)
    } else {
        None
    };
    Linear::new(&w, b)
}

/// `nn.Linear`, its weight kept transposed (`[in, out]`, row-major): `gemm` multiplies by a
/// row-major right-hand side about 1.4–2× faster than by the checkpoint's `[out, in]` read
/// transposed (which it repacks on every call), and on f32 CPU tensors the bias is the
/// product's starting value instead of a second pass.
pub struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From the checkpoint's `weight [out, in]` and `bias [out]`.
    ///
    /// # Errors
    /// A weight that is not a matrix.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_then(x, Activation::None)
    }
}

impl Linear {
    /// `gelu(linear(x))` (exact GELU), applied in the product's buffer before it becomes a tensor.
    ///
    /// # Errors
    /// As [`candle_core::Module::forward`].
    pub fn forward_gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_then(x, Activation::Gelu)
    }

    fn forward_then(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        use crate::gemm::{matmul_into, with_f32, Product, Strided};
        let (k, n) = self.weight_t.dims2()?;
        let dims = x.dims();
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        if !(f32_cpu(x) && f32_cpu(&self.weight_t)) || dims.last() != Some(&k) {
            let y = x.broadcast_matmul(&self.weight_t)?;
            return match &self.bias {
                Some(b) => act.on_tensor(y.broadcast_add(b)?, None),
                None => act.on_tensor(y, None),
            };
        }
        let m = x.elem_count() / k.max(1);
        let mut out = match &self.bias {
            Some(b) => with_f32(b, |b| b.repeat(m))?,
            None => crate::gemm::filled(m * n, 0.0),
        };
        with_f32(&self.weight_t, |w| {
            with_f32(x, |xs| {
                matmul_into(
                    (&mut out, n),
                    (m, n, k),
                    &Strided::rows(xs, k),
                    &Strided::rows(w, n),
                    Product {
                        scale: 1.0,
                        accumulate: self.bias.is_some(),
                        parallel: true,
                    },
                );
            })
        })??;
        epilogue_par(&mut out, None, act);
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Tensor::from_vec(out, shape, x.device())
    }
}

/// Exact (erf) GELU, `x·(1 + erf(x/√2))/2`. On f32 CPU tensors it runs vectorised and in
/// parallel with [`streamrecon_core::simd::erf_f32`] (absolute error below 5e-7 in erf);
/// candle's own calls libm's erf one value at a time.
///
/// # Errors
/// A tensor op failure.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(x.gelu_erf()?);
    }
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    epilogue_par(&mut data, None, Activation::Gelu);
    Ok(Tensor::from_vec(data, x.shape(), x.device())?)
}

/// Exact GELU over a slice in place, vectorised with [`streamrecon_core::simd::erf_f32`].
struct GeluInPlace<'a>(&'a mut [f32]);

impl streamrecon_core::simd::Kernel for GeluInPlace<'_> {
    type Output = ();
    #[allow(clippy::inline_always)] // inlined into the dispatched function
    #[inline(always)]
    fn run(self) {
        for v in self.0.iter_mut() {
            *v = 0.5
                * *v
                * (1.0 + streamrecon_core::simd::erf_f32(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

/// `nn.LayerNorm(dim, eps)` with affine parameters.
///
/// # Errors
/// Missing or misshapen weights.
pub fn layer_norm(vb: &Vb, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get("weight", dim)?,
        vb.get("bias", dim)?,
        eps,
    ))
}

/// `nn.LayerNorm(dim, eps, elementwise_affine=False)`.
///
/// # Errors
/// Tensor allocation.
pub fn layer_norm_plain(dim: usize, eps: f64, dtype: DType) -> Result<LayerNorm> {
    let dev = candle_core::Device::Cpu;
    Ok(LayerNorm::new(
        Tensor::ones(dim, dtype, &dev)?,
        Tensor::zeros(dim, dtype, &dev)?,
        eps,
    ))
}

/// `nn.Conv2d(cin, cout, k, stride, padding, bias)`.
///
/// # Errors
/// Missing or misshapen weights.
pub fn conv2d(
    vb: &Vb,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
) -> Result<Conv2d> {
    let w = vb.get("weight", (cout, cin, k, k))?;
    let b = if bias {
        Some(vb.get("bias", cout)?)
    } else {
        None
    };
    Ok(Conv2d::new(w, b, stride, padding)?)
}

/// A 2-D convolution. Odd k×k kernels at stride 1 with "same" padding (the DPT heads' and
/// VideoFlow's 3×3 and 1×1 convolutions) run on f32 as matrix products over bands of output
/// rows, their im2col rows made by shifted row copies and the products written straight into
/// the output; candle's CPU conv2d builds its im2col tiles one value at a time, which took
/// about a third of a vggt frame. Everything else is candle's conv2d.
pub struct Conv2d {
    /// `[cout, cin·k·k]` for the banded path.
    same: Option<Tensor>,
    bias: Option<Tensor>,
    k: usize,
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// From a `[cout, cin, k, k]` kernel.
    ///
    /// # Errors
    /// A kernel that is not square.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        let (cout, cin, k, k2) = weight.dims4()?;
        if k != k2 {
            candle_core::bail!("conv2d: a {k}×{k2} kernel is not square");
        }
        // Odd kernels over the whole image ("same" size, stride 1): row-shifted im2col bands.
        let same = (k % 2 == 1 && stride == 1 && padding == k / 2)
            .then(|| weight.reshape((cout, cin * k * k)))
            .transpose()?;
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Conv2dConfig::default()
        };
        Ok(Self {
            same,
            bias: bias.clone(),
            k,
            inner: candle_nn::Conv2d::new(weight, bias, cfg),
        })
    }
}

/// Most f32 values of one band's im2col matrix (1 MiB, so the band is still in the core's L2
/// cache when the product reads it: with 8 MiB bands the DPT heads took 64-66 ms a frame, with
/// 1 MiB 47-50, vggt small at 224×224); the full matrix of a 3×3 convolution at 518×392 with 256
/// channels would be 1.9 GB.
const BAND_VALUES: usize = 1 << 18;

/// Fewest output pixels in a band, so that wide inputs with many channels (VideoFlow's 256) still
/// give products large enough to run efficiently.
const BAND_MIN_PIXELS: usize = 256;

impl candle_core::Module for Conv2d {
    /// x: [B, cin, H, W] → [B, cout, H, W] (or as candle's conv2d for other shapes).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_then(x, None, Activation::None)
    }
}

/// What a convolution applies to its output before it becomes a tensor.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// Exact (erf) GELU.
    Gelu,
}

impl Activation {
    /// `act(t + residual)` with candle ops (the paths that are not f32 on the CPU).
    fn on_tensor(self, t: Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let t = match residual {
            Some(r) => (t + r)?,
            None => t,
        };
        match self {
            Activation::None => Ok(t),
            Activation::Relu => t.relu(),
            Activation::Gelu => t.gelu_erf(),
        }
    }
}

/// `v = act(v + residual)` over one slice, in place.
fn epilogue(v: &mut [f32], residual: Option<&[f32]>, act: Activation) {
    if let Some(r) = residual {
        for (v, &r) in v.iter_mut().zip(r) {
            *v += r;
        }
    }
    match act {
        Activation::None => {}
        Activation::Relu => {
            for x in v {
                *x = x.max(0.0);
            }
        }
        Activation::Gelu => streamrecon_core::simd::vectorized(GeluInPlace(v)),
    }
}

/// [`epilogue`] over a whole buffer, in parallel chunks.
fn epilogue_par(out: &mut [f32], residual: Option<&[f32]>, act: Activation) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    match residual {
        Some(r) => out
            .par_chunks_mut(CHUNK)
            .zip(r.par_chunks(CHUNK))
            .for_each(|(c, r)| epilogue(c, Some(r), act)),
        None if act != Activation::None => out
            .par_chunks_mut(CHUNK)
            .for_each(|c| epilogue(c, None, act)),
        None => {}
    }
}

impl Conv2d {
    /// `relu(conv(x))`.
    ///
    /// # Errors
    /// As [`candle_core::Module::forward`].
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_then(x, None, Activation::Relu)
    }

    /// `act(conv(x) + residual)`: the residual and the activation applied to the output buffer
    /// before it becomes a tensor (as separate ops each allocated, filled and re-read a tensor
    /// of the output's size).
    ///
    /// # Errors
    /// As [`candle_core::Module::forward`], or a residual of another shape.
    pub fn forward_then(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Activation,
    ) -> candle_core::Result<Tensor> {
        use candle_core::Module;
        match &self.same {
            Some(w)
                if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() =>
            {
                conv_same_banded(x, w, self.bias.as_ref(), self.k, residual, act)
            }
            _ => act.on_tensor(self.inner.forward(x)?, residual),
        }
    }
}

/// `relu(x)`; f32 CPU tensors in one parallel pass into an output that is not zeroed first.
///
/// # Errors
/// A tensor op failure.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(x.relu()?);
    }
    let out = crate::gemm::with_f32(x, |v| {
        let mut out = Vec::with_capacity(v.len());
        v.par_iter().map(|x| x.max(0.0)).collect_into_vec(&mut out);
        out
    })?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

thread_local! {
    /// One band's im2col matrix, kept between bands and calls (a fresh one per band cost
    /// page faults and zeroing on every call). Never borrowed across parallel work.
    static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x` [B, cin, H, W] convolved with `w` [cout, cin·k·k] (odd `k`, stride 1, zero padding k/2),
/// plus `bias` (then `residual` added and `act` applied): per band of output rows,
/// `w · im2col(band)` written straight into the output.
fn conv_same_banded(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    k: usize,
    residual: Option<&Tensor>,
    act: Activation,
) -> candle_core::Result<Tensor> {
    use crate::gemm::{matmul_into, with_f32, Product, Strided};
    use rayon::prelude::*;
    let (b, cin, h, wd) = x.dims4()?;
    let cout = w.dim(0)?;
    let (hw, taps, r) = (h * wd, k * k, (k / 2) as isize);
    // The bias written as the products' starting values (not `calloc`ed first: see
    // `crate::gemm::filled`).
    let mut out = Vec::with_capacity(b * cout * hw);
    match bias {
        Some(bias) => {
            let bias = bias.to_vec1::<f32>()?;
            for i in 0..b * cout {
                out.resize(out.len() + hw, bias[i % cout]);
            }
        }
        None => out.resize(b * cout * hw, 0.0),
    }
    let product = Product {
        scale: 1.0,
        accumulate: true,
        parallel: true,
    };
    with_f32(w, |wt| {
        with_f32(x, |data| {
            let wt = Strided::rows(wt, cin * taps);
            for bi in 0..b {
                let img = &data[bi * cin * hw..(bi + 1) * cin * hw];
                let dst = &mut out[bi * cout * hw..(bi + 1) * cout * hw];
                if k == 1 {
                    // A 1×1 convolution is the product itself.
                    let img = Strided::rows(img, hw);
                    matmul_into((dst, hw), (cout, hw, cin), &wt, &img, product);
                    continue;
                }
                let band_rows = (BAND_VALUES / (cin * taps * wd).max(1))
                    .max(BAND_MIN_PIXELS.div_ceil(wd.max(1)))
                    .clamp(1, h.max(1));
                for y0 in (0..h).step_by(band_rows) {
                    let rows = band_rows.min(h - y0);
                    let n = rows * wd;
                    // Taken out of the thread-local for the band: the parallel work below
                    // lets this thread pick up another convolution meanwhile (rayon steals
                    // work while it waits), which must not find the buffer borrowed.
                    let mut col = COLUMNS.with(|c| std::mem::take(&mut *c.borrow_mut()));
                    {
                        col.clear();
                        col.resize(cin * taps * n, 0.0);
                        // Row (c, ky, kx) of the band's im2col: the band of channel c shifted
                        // by the tap; what falls outside the image stays 0.
                        col.par_chunks_mut(taps * n)
                            .enumerate()
                            .for_each(|(c, chan)| {
                                let plane = &img[c * hw..(c + 1) * hw];
                                for (t, tap) in chan.chunks_exact_mut(n).enumerate() {
                                    let (dy, dx) = ((t / k) as isize - r, (t % k) as isize - r);
                                    let x0 = (-dx).max(0) as usize;
                                    let x1 = (wd as isize - dx).clamp(0, wd as isize) as usize;
                                    if x0 >= x1 {
                                        continue;
                                    }
                                    for (yy, line) in tap.chunks_exact_mut(wd).enumerate() {
                                        let sy = (y0 + yy) as isize + dy;
                                        if sy < 0 || sy >= h as isize {
                                            continue;
                                        }
                                        let src = &plane[sy as usize * wd..(sy as usize + 1) * wd];
                                        let (s0, s1) = (
                                            (x0 as isize + dx) as usize,
                                            (x1 as isize + dx) as usize,
                                        );
                                        line[x0..x1].copy_from_slice(&src[s0..s1]);
                                    }
                                }
                            });
                        let cols = Strided::rows(&col, n);
                        let dst = (&mut dst[y0 * wd..], hw);
                        matmul_into(dst, (cout, n, cin * taps), &wt, &cols, product);
                    }
                    COLUMNS.with(|c| *c.borrow_mut() = col);
                }
            }
        })
    })??;
    match residual {
        Some(r) => {
            if r.dims() != [b, cout, h, wd] {
                candle_core::bail!(
                    "conv2d: residual {:?} for output {:?}",
                    r.dims(),
                    (b, cout, h, wd)
                );
            }
            with_f32(&r.to_dtype(DType::F32)?, |r| {
                epilogue_par(&mut out, Some(r), act);
            })?;
        }
        None => epilogue_par(&mut out, None, act),
    }
    Tensor::from_vec(out, (b, cout, h, wd), x.device())
}

/// `nn.ConvTranspose2d(cin, cout, k, stride=k)` (the DPT upsampling layers).
///
/// With the stride equal to the kernel, each input pixel writes its own k×k block of the output
/// and no two overlap: the layer is one matrix product, `[pixels, cin] × [cin, cout·k·k]`,
/// whose rows are then laid out as blocks. candle's CPU `conv_transpose2d` is a direct loop
/// (a dot product per output value), which took about a quarter of a vggt frame.
pub struct PatchConvTranspose2d {
    /// `[cin, cout·k·k]`: the checkpoint's `[cin, cout, k, k]` with its last three dims merged.
    weight: Tensor,
    /// `[1, cout, 1, 1]`.
    bias: Tensor,
    cout: usize,
    k: usize,
}

impl PatchConvTranspose2d {
    /// From the checkpoint's `[cin, cout, k, k]` kernel and `[cout]` bias.
    ///
    /// # Errors
    /// A kernel that is not square.
    pub fn new(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        let (cin, cout, k, k2) = weight.dims4()?;
        if k != k2 {
            candle_core::bail!("conv_transpose2d: a {k}×{k2} kernel is not square");
        }
        Ok(Self {
            weight: weight.reshape((cin, cout * k * k))?,
            bias: bias.reshape((1, cout, 1, 1))?,
            cout,
            k,
        })
    }
}

impl candle_core::Module for PatchConvTranspose2d {
    /// x: [B, cin, H, W] → [B, cout, H·k, W·k]
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let (cout, k) = (self.cout, self.k);
        let pixels = x.permute((0, 2, 3, 1))?.reshape((b * h * w, cin))?;
        pixels
            .matmul(&self.weight)?
            .reshape((b, h, w, cout, k, k))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((b, cout, h * k, w * k))?
            .broadcast_add(&self.bias)
    }
}

/// `nn.ConvTranspose2d(cin, cout, k, stride=k)` (the DPT upsampling layers), as a matrix product.
///
/// # Errors
/// Missing or misshapen weights.
pub fn conv_transpose2d(
    vb: &Vb,
    cin: usize,
    cout: usize,
    k: usize,
) -> Result<PatchConvTranspose2d> {
    let w = vb.get("weight", (cin, cout, k, k))?;
    let b = vb.get("bias", cout)?;
    Ok(PatchConvTranspose2d::new(&w, &b)?)
}

/// Row-interpolation matrix `[out, in]` of 1-D linear resampling with `align_corners=True`.
pub fn bilinear_align_corners_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    let scale = if output > 1 {
        (input as f32 - 1.0) / (output as f32 - 1.0)
    } else {
        0.0
    };
    for o in 0..output {
        let src = scale * o as f32;
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let l1 = src - i0 as f32;
        m[o * input + i0] += 1.0 - l1;
        m[o * input + i1] += l1;
    }
    m
}

/// Taps of antialiased bicubic resampling (Keys a = −0.5, support widened by the downscale
/// factor, taps outside the input dropped and the rest renormalised), as PIL's `resize(BICUBIC)`
/// and PyTorch's `interpolate(mode="bicubic", antialias=True, align_corners=False)` compute them.
/// One `(first input index, weights)` per output sample.
pub fn bicubic_aa_taps(input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    fn keys(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let inv = 1.0 / filter_scale;
    (0..output)
        .map(|o| {
            let center = scale * (o as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| keys((x as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                }
            }
            (xmin, w)
        })
        .collect()
}

/// The taps as a dense `[out, in]` matrix.
pub fn bicubic_aa_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    for (o, (first, w)) in bicubic_aa_taps(input, output).into_iter().enumerate() {
        for (j, v) in w.into_iter().enumerate() {
            m[o * input + first + j] = v as f32;
        }
    }
    m
}

/// Separable resampling of the last two dims of `x` (`[.., H, W]`) by row matrices
/// `ry [Ho, H]` and `rx [Wo, W]`: `ry · x · rxᵀ`.
///
/// # Errors
/// Shape mismatch.
pub fn resample_separable(
    x: &Tensor,
    ry: &[f32],
    rx: &[f32],
    out_h: usize,
    out_w: usize,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let dev = x.device();
    let ry = Tensor::from_slice(ry, (out_h, h), dev)?.to_dtype(x.dtype())?;
    let rxt = Tensor::from_slice(rx, (out_w, w), dev)?
        .to_dtype(x.dtype())?
        .t()?
        .contiguous()?;
    let lead: usize = dims[..dims.len() - 2].iter().product();
    let x = x.contiguous()?.reshape((lead * h, w))?;
    let xw = x.matmul(&rxt)?.reshape((lead, h, out_w))?;
    let out = ry.broadcast_matmul(&xw)?;
    let mut shape = dims[..dims.len() - 2].to_vec();
    shape.extend([out_h, out_w]);
    Ok(out.reshape(shape)?)
}

/// `F.interpolate(x, size, mode="bilinear", align_corners=True)` on `[.., H, W]`, computed
/// directly (4 taps per output, planes in parallel) in f32.
///
/// # Errors
/// Shape mismatch.
pub fn resize_bilinear_align_corners(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let dims = x.dims().to_vec();
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let taps = |input: usize, output: usize| -> Vec<(usize, usize, f32)> {
        let scale = if output > 1 {
            (input as f32 - 1.0) / (output as f32 - 1.0)
        } else {
            0.0
        };
        (0..output)
            .map(|o| {
                let src = scale * o as f32;
                let i0 = (src.floor() as usize).min(input - 1);
                (i0, (i0 + 1).min(input - 1), src - i0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    let mut used = vec![false; h];
    for &(y0, y1, _) in &ty {
        used[y0] = true;
        used[y1] = true;
    }
    let x32 = x.to_dtype(DType::F32)?;
    let out = crate::gemm::with_f32(&x32, |src| {
        let mut out = crate::gemm::filled(src.len() / (h * w).max(1) * out_h * out_w, 0.0);
        out.par_chunks_mut(out_h * out_w)
            .zip(src.par_chunks(h * w))
            .for_each(|(o, plane)| {
                // Separable: each source row an output row needs is interpolated across once
                // (neighbouring output rows share it), then output rows blend two of them.
                let mut across = vec![0f32; h * out_w];
                for (y, line) in across.chunks_exact_mut(out_w).enumerate() {
                    if !used[y] {
                        continue;
                    }
                    let row = &plane[y * w..y * w + w];
                    for (v, &(x0, x1, lx)) in line.iter_mut().zip(&tx) {
                        *v = row[x0] * (1.0 - lx) + row[x1] * lx;
                    }
                }
                for (line, &(y0, y1, ly)) in o.chunks_exact_mut(out_w).zip(&ty) {
                    let top = &across[y0 * out_w..][..out_w];
                    let bottom = &across[y1 * out_w..][..out_w];
                    for ((v, &t), &b) in line.iter_mut().zip(top).zip(bottom) {
                        *v = t * (1.0 - ly) + b * ly;
                    }
                }
            });
        out
    })?;
    let mut shape = dims[..dims.len() - 2].to_vec();
    shape.extend([out_h, out_w]);
    Ok(Tensor::from_vec(out, shape, x.device())?.to_dtype(x.dtype())?)
}

/// `grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)` with the
/// grid given in pixel coordinates (VideoFlow's `bilinear_sampler`): `img [N, C, H, W]`,
/// `coords [N, Ho, Wo, 2]` as (x, y) → `[N, C, Ho, Wo]`. Taps outside the image count as zero.
///
/// # Errors
/// Mismatched batch sizes.
pub fn grid_sample_pixels(img: &Tensor, coords: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, c, h, w) = img.dims4()?;
    let (n2, ho, wo, two) = coords.dims4()?;
    if n != n2 || two != 2 {
        return Err(streamrecon_core::error::Error::Model(format!(
            "grid_sample: image {:?} vs coords {:?}",
            img.dims(),
            coords.dims()
        )));
    }
    let src: Vec<f32> = img.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let xy: Vec<f32> = coords.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = crate::gemm::filled(n * c * ho * wo, 0.0);
    out.par_chunks_mut(c * ho * wo)
        .enumerate()
        .for_each(|(b, o)| {
            let plane = &src[b * c * h * w..(b + 1) * c * h * w];
            for p in 0..ho * wo {
                let x = xy[(b * ho * wo + p) * 2];
                let y = xy[(b * ho * wo + p) * 2 + 1];
                if !(x.is_finite() && y.is_finite()) {
                    continue;
                }
                let (x0, y0) = (floor(x), floor(y));
                let (fx, fy) = (x - x0, y - y0);
                let taps = [
                    (x0, y0, (1.0 - fx) * (1.0 - fy)),
                    (x0 + 1.0, y0, fx * (1.0 - fy)),
                    (x0, y0 + 1.0, (1.0 - fx) * fy),
                    (x0 + 1.0, y0 + 1.0, fx * fy),
                ];
                for (tx, ty, wgt) in taps {
                    if tx < 0.0 || ty < 0.0 || tx > (w - 1) as f32 || ty > (h - 1) as f32 {
                        continue;
                    }
                    let idx = ty as usize * w + tx as usize;
                    for ch in 0..c {
                        o[ch * ho * wo + p] += wgt * plane[ch * h * w + idx];
                    }
                }
            }
        });
    Ok(Tensor::from_vec(out, (n, c, ho, wo), img.device())?.to_dtype(img.dtype())?)
}

/// `out = scale·plane + shift`, dispatched so that its fused multiply-adds are instructions (in
/// the baseline instruction set each was a libm `fmaf` call).
struct ScaleShift<'a> {
    out: &'a mut [f32],
    plane: &'a [f32],
    scale: f32,
    shift: f32,
}

impl streamrecon_core::simd::Kernel for ScaleShift<'_> {
    type Output = ();
    #[allow(clippy::inline_always)] // inlined into the dispatched function
    #[inline(always)]
    fn run(self) {
        let n = self.out.len().min(self.plane.len());
        let (out, plane) = (&mut self.out[..n], &self.plane[..n]);
        for i in 0..n {
            out[i] = self.scale.mul_add(plane[i], self.shift);
        }
    }
}

thread_local! {
    /// The zero-padded input plane of a depthwise convolution.
    static DW_PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `v.floor()` without libm's `floorf` call (the baseline instruction set has no rounding
/// instruction; the call was 0.75 % of a VideoFlow window). Beyond ±2³¹ it saturates, which
/// still lands outside any image.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
fn floor(v: f32) -> f32 {
    let t = v as i32 as f32;
    if t > v {
        t - 1.0
    } else {
        t
    }
}

/// One plane of a depthwise convolution, written with explicit SIMD (`pulp`): the plane is
/// copied once into a zero-padded buffer, so every tap of every output is a plain load, and
/// the outputs are computed in blocks of two rows by two registers (see `with_simd`).
/// Auto-vectorised versions of this loop kept tripping the compiler into shuffles.
struct DepthwisePlane<'a> {
    out: &'a mut [f32],
    padded: &'a mut Vec<f32>,
    plane: &'a [f32],
    kernel: &'a [f32],
    bias: f32,
    w: usize,
    k: usize,
}

impl pulp::WithSimd for DepthwisePlane<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // the loop must be compiled inside the dispatch
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let lanes = std::mem::size_of::<S::f32s>() / std::mem::size_of::<f32>();
        let (w, k) = (self.w, self.k);
        let h = self.out.len() / w.max(1);
        let pad = k / 2;
        // One spare register of width: the second output register of a pair is computed (and
        // not stored) past the row's end.
        let pw = (w.div_ceil(lanes) + 1) * lanes + k - 1;
        let padded = self.padded;
        padded.clear();
        padded.resize((h + k - 1) * pw, 0.0);
        for (y, row) in self.plane.chunks_exact(w).enumerate() {
            let at = (y + pad) * pw + pad;
            padded[at..at + w].copy_from_slice(row);
        }
        let zero = simd.splat_f32s(0.0);
        let bias = simd.splat_f32s(self.bias);
        // Two output rows at a time, each two registers wide, two sums per register (eight
        // independent chains of fused multiply-adds keep both FMA units busy): each input
        // register loaded feeds both rows' taps, one load per multiply-add where one row alone
        // needed one and a half. An odd last row goes alone.
        let kernel = self.kernel;
        let tap_row = |r: usize| &kernel[r * k..(r + 1) * k];
        // One input row (`line`, from the block's first column) into the sums of one or two
        // output rows, each with its own row of taps.
        macro_rules! input_row {
            ($line:expr; $($taps:expr => ($a0:ident, $a1:ident, $b0:ident, $b1:ident)),+) => {{
                // The loads start at most `lanes + k − 1` into this slice, so a whole register
                // always fits: the slice's bound check covers them all.
                let line: &[f32] = &$line[..2 * lanes + k - 1];
                let at = |i: usize| {
                    debug_assert!(i + lanes <= line.len());
                    // SAFETY: i + lanes ≤ line.len() (above): a whole register of the slice.
                    #[allow(unsafe_code)]
                    unsafe {
                        line.as_ptr().add(i).cast::<S::f32s>().read_unaligned()
                    }
                };
                let mut kx = 0;
                while kx + 1 < k {
                    let (l0, h0) = (at(kx), at(lanes + kx));
                    let (l1, h1) = (at(kx + 1), at(lanes + kx + 1));
                    $(
                        let t: &[f32] = $taps;
                        let s = simd.splat_f32s(t[kx]);
                        $a0 = simd.mul_add_e_f32s(s, l0, $a0);
                        $b0 = simd.mul_add_e_f32s(s, h0, $b0);
                        let s = simd.splat_f32s(t[kx + 1]);
                        $a1 = simd.mul_add_e_f32s(s, l1, $a1);
                        $b1 = simd.mul_add_e_f32s(s, h1, $b1);
                    )+
                    kx += 2;
                }
                if kx < k {
                    let (l0, h0) = (at(kx), at(lanes + kx));
                    $(
                        let s = simd.splat_f32s($taps[kx]);
                        $a0 = simd.mul_add_e_f32s(s, l0, $a0);
                        $b0 = simd.mul_add_e_f32s(s, h0, $b0);
                    )+
                }
            }};
        }
        // A macro, not a closure: closures are compiled outside the dispatched function, for
        // the baseline instruction set, and their vector adds became calls.
        macro_rules! store {
            ($oy:expr, $x0:expr, $regs:expr) => {{
                let (oy, x0) = ($oy, $x0);
                let orow = &mut self.out[oy * w..(oy + 1) * w];
                for (start, (s0, s1)) in [x0, x0 + lanes].into_iter().zip($regs) {
                    if start >= w {
                        break;
                    }
                    let sum = simd.add_f32s(simd.add_f32s(s0, s1), bias);
                    let n = lanes.min(w - start);
                    simd.partial_store_f32s(&mut orow[start..start + n], sum);
                }
            }};
        }
        for y in (0..h).step_by(2) {
            let line = |r: usize, x0: usize| &padded[(y + r) * pw + x0..];
            for x0 in (0..w).step_by(2 * lanes) {
                // Row y: a (first register), b (second); row y + 1: c, d; two sums each.
                let (mut a0, mut a1, mut b0, mut b1) = (zero, zero, zero, zero);
                if y + 1 < h {
                    let (mut c0, mut c1, mut d0, mut d1) = (zero, zero, zero, zero);
                    // Input row y + r meets kernel row r for output row y, r − 1 for y + 1.
                    input_row!(line(0, x0); tap_row(0) => (a0, a1, b0, b1));
                    for r in 1..k {
                        input_row!(line(r, x0);
                            tap_row(r) => (a0, a1, b0, b1),
                            tap_row(r - 1) => (c0, c1, d0, d1));
                    }
                    input_row!(line(k, x0); tap_row(k - 1) => (c0, c1, d0, d1));
                    store!(y + 1, x0, [(c0, c1), (d0, d1)]);
                } else {
                    for r in 0..k {
                        input_row!(line(r, x0); tap_row(r) => (a0, a1, b0, b1));
                    }
                }
                store!(y, x0, [(a0, a1), (b0, b1)]);
            }
        }
    }
}

/// Depthwise `nn.Conv2d(C, C, k, padding=k/2, groups=C)` computed directly, planes in parallel
/// (candle runs grouped convolutions one group at a time): `x [N, C, H, W]`, `weight [C, 1, k, k]`.
///
/// # Errors
/// Shape mismatch.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    depthwise(x, weight, bias, false)
}

/// `gelu(x + depthwise_conv2d(x))` (a step of VideoFlow's PCBlock) in one pass per plane, while
/// the plane is in cache (as separate ops it wrote and re-read two more tensors of `x`'s size).
///
/// # Errors
/// Shape mismatch.
pub fn depthwise_residual_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    depthwise(x, weight, Some(bias), true)
}

fn depthwise(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual_gelu: bool,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, c, h, w) = x.dims4()?;
    let (wc, one, k, k2) = weight.dims4()?;
    if wc != c || one != 1 || k != k2 || k % 2 == 0 {
        return Err(streamrecon_core::error::Error::Model(format!(
            "depthwise conv: input {:?}, weight {:?}",
            x.dims(),
            weight.dims()
        )));
    }
    let x32 = x.to_dtype(DType::F32)?;
    let wt: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = match bias {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1()?,
        None => vec![0.0; c],
    };
    let out = crate::gemm::with_f32(&x32, |src| {
        let mut out = crate::gemm::filled(n * c * h * w, 0.0);
        out.par_chunks_mut(h * w)
            .zip(src.par_chunks(h * w))
            .enumerate()
            .for_each(|(plane_idx, (o, plane))| {
                let ch = plane_idx % c;
                if k == 1 {
                    // A per-channel scale and shift.
                    streamrecon_core::simd::vectorized(ScaleShift {
                        out: o,
                        plane,
                        scale: wt[ch],
                        shift: b[ch],
                    });
                } else {
                    // The buffer is borrowed out here: a closure inside the kernel would be
                    // compiled outside the dispatched function, for the baseline instruction set.
                    DW_PADDED.with(|buf| {
                        pulp::Arch::new().dispatch(DepthwisePlane {
                            out: o,
                            padded: &mut buf.borrow_mut(),
                            plane,
                            kernel: &wt[ch * k * k..(ch + 1) * k * k],
                            bias: b[ch],
                            w,
                            k,
                        });
                    });
                }
                if residual_gelu {
                    epilogue(o, Some(plane), Activation::Gelu);
                }
            });
        out
    })?;
    Ok(Tensor::from_vec(out, (n, c, h, w), x.device())?.to_dtype(x.dtype())?)
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values are the point
pub(crate) mod tests {
    use super::*;

    /// `sin(f·i)` for i in 0..n: smooth, signed test values.
    fn wave(n: usize, f: f64) -> Tensor {
        Tensor::arange(0f32, n as f32, &candle_core::Device::Cpu)
            .and_then(|t| (t * f)?.sin())
            .unwrap()
    }

    pub(crate) fn max_abs_diff(a: Tensor, b: Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn linear_is_candles_linear() {
        use candle_core::Module;
        let (din, dout) = (40, 72);
        let w = wave(dout * din, 0.37).reshape((dout, din)).unwrap();
        let b = wave(dout, 1.3);
        let x = wave(3 * 11 * din, 0.011).reshape((3, 11, din)).unwrap();
        for bias in [Some(b), None] {
            let ours = Linear::new(&w, bias.clone()).unwrap();
            let theirs = candle_nn::Linear::new(w.clone(), bias.clone());
            let want = theirs.forward(&x).unwrap();
            assert!(max_abs_diff(ours.forward(&x).unwrap(), want.clone()) < 1e-5);
            let gelu = want.gelu_erf().unwrap();
            assert!(max_abs_diff(ours.forward_gelu(&x).unwrap(), gelu) < 1e-5);
            // Other dtypes take candle's matmul.
            let half = ours_f16(&w, bias.as_ref(), &x);
            assert!(max_abs_diff(half, want) < 0.05);
        }
    }

    fn ours_f16(w: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Tensor {
        use candle_core::Module;
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let lin = Linear::new(&half(w), bias.map(half)).unwrap();
        lin.forward(&x.to_dtype(DType::F16).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn convolutions_run_side_by_side_on_rayon() {
        use candle_core::Module;
        use rayon::prelude::*;
        // A thread waiting inside one convolution's parallel work may run another one (rayon
        // steals work); the per-thread im2col buffer must not be held across that.
        let (cin, cout, h, w, k) = (64, 16, 96, 128, 3);
        let weight = wave(cout * cin * k * k, 1.1)
            .reshape((cout, cin, k, k))
            .unwrap();
        let layer = Conv2d::new(weight, None, 1, 1).unwrap();
        let x = wave(cin * h * w, 0.37).reshape((1, cin, h, w)).unwrap();
        let want = layer.forward(&x).unwrap();
        let outs: Vec<Tensor> = (0..32)
            .into_par_iter()
            .map(|_| layer.forward(&x).unwrap())
            .collect();
        for out in outs {
            assert!(max_abs_diff(out, want.clone()) == 0.0);
        }
    }

    #[test]
    fn banded_same_convolution_is_candles_conv2d() {
        use candle_core::Module;
        // Shapes with one band and with many (BAND_VALUES is small against 40 channels × 9 taps
        // × 300 px rows), odd sizes, images narrower than the kernel, 1×1 (a plain product, batched) and 5×5 kernels.
        for (b, cin, cout, h, w, k) in [
            (1, 3, 4, 5, 7, 3),
            (2, 40, 6, 70, 300, 3),
            (1, 2, 3, 1, 2, 3),
            (1, 4, 5, 9, 6, 5),
            (1, 3, 2, 4, 4, 1),
            (2, 5, 3, 6, 9, 1),
        ] {
            let x = wave(b * cin * h * w, 0.37).reshape((b, cin, h, w)).unwrap();
            let weight = wave(cout * cin * k * k, 1.1)
                .reshape((cout, cin, k, k))
                .unwrap();
            let bias = wave(cout, 2.3);
            let want = x
                .conv2d(&weight, k / 2, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let layer = Conv2d::new(weight.clone(), Some(bias), 1, k / 2).unwrap();
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs_diff(got, want.clone());
            assert!(diff < 1e-4, "{b} {cin} {cout} {h} {w} {k}: {diff}");
            // The fused ReLU and the standalone one are candle's.
            let want = want.relu().unwrap();
            let diff = max_abs_diff(layer.forward_relu(&x).unwrap(), want.clone());
            assert!(diff < 1e-4, "relu {b} {cin} {cout} {h} {w} {k}: {diff}");
            let got = relu(&layer.forward(&x).unwrap()).unwrap();
            assert!(max_abs_diff(got, want) < 1e-4);
        }
    }

    #[test]
    fn patch_conv_transpose_is_candles_conv_transpose() {
        use candle_core::Module;
        for (b, cin, cout, h, w, k) in [(1, 3, 5, 4, 6, 4), (2, 8, 4, 3, 5, 2), (1, 2, 3, 1, 1, 3)]
        {
            let x = wave(b * cin * h * w, 0.7).reshape((b, cin, h, w)).unwrap();
            let weight = wave(cin * cout * k * k, 1.3)
                .reshape((cin, cout, k, k))
                .unwrap();
            let bias = wave(cout, 2.1);
            let want = x
                .conv_transpose2d(&weight, 0, 0, k, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let layer = PatchConvTranspose2d::new(&weight, &bias).unwrap();
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs_diff(got, want);
            assert!(diff < 1e-5, "{b} {cin} {cout} {h} {w} {k}: {diff}");
        }
    }

    #[test]
    fn bicubic_taps_sum_to_one_and_identity_at_same_size() {
        for (i, o) in [(5, 4), (4, 5), (37, 23), (7, 7)] {
            for (_, w) in bicubic_aa_taps(i, o) {
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        let m = bicubic_aa_matrix(6, 6);
        for r in 0..6 {
            for c in 0..6 {
                assert!((m[r * 6 + c] - f32::from(u8::from(r == c))).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn direct_bilinear_matches_the_matrix_form() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 5.0 * 7.0, &dev)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((1, 2, 5, 7))
            .unwrap();
        let a = resize_bilinear_align_corners(&x, 9, 4).unwrap();
        let b = resample_separable(
            &x,
            &bilinear_align_corners_matrix(5, 9),
            &bilinear_align_corners_matrix(7, 4),
            9,
            4,
        )
        .unwrap();
        let d = max_abs_diff(a, b);
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn depthwise_matches_candle_grouped_conv_and_grid_sample_hits_pixels() {
        let dev = candle_core::Device::Cpu;
        // Rows of one, two and three registers' width (pairs of registers, the second one past
        // the row's end), a 1×1 kernel (a per-channel scale), and the fused residual GELU.
        for (h, w, k) in [(9, 11, 5), (9, 11, 1), (7, 40, 15), (5, 56, 7), (3, 2, 3)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (3, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
            let ours = depthwise_conv2d(&x, &wt, Some(&b)).unwrap();
            let theirs = x
                .conv2d(&wt, k / 2, 1, 1, 3)
                .unwrap()
                .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
                .unwrap();
            let d = max_abs_diff(ours, theirs.clone());
            assert!(d < 1e-4, "{h}×{w} k {k}: {d}");
            let fused = depthwise_residual_gelu(&x, &wt, &b).unwrap();
            let d = max_abs_diff(fused, (x.clone() + theirs).unwrap().gelu_erf().unwrap());
            assert!(d < 1e-4, "fused {h}×{w} k {k}: {d}");
        }
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 11), &dev).unwrap();
        // Sampling at integer pixels returns the pixels; outside, zero weight.
        let coords =
            Tensor::from_vec(vec![3f32, 2.0, -1.0, 0.0, 10.5, 8.0], (1, 1, 3, 2), &dev).unwrap();
        let img = x.narrow(0, 0, 1).unwrap();
        let s: Vec<f32> = grid_sample_pixels(&img, &coords)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let px: Vec<f32> = img.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(s[0], px[2 * 11 + 3]);
        assert_eq!(s[1], 0.0);
        assert!((s[2] - 0.5 * px[8 * 11 + 10]).abs() < 1e-6);
    }

    #[test]
    fn bilinear_align_corners_keeps_corners() {
        let m = bilinear_align_corners_matrix(4, 7);
        assert_eq!(m[0], 1.0);
        assert_eq!(m[6 * 4 + 3], 1.0);
        assert!(
            (m[4 * 4 + 2] - 1.0).abs() < 1e-6,
            "sample 4 of 7 sits on input 2"
        );
    }
}
