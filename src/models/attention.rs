//! Scaled dot-product attention on the CPU without the whole score tensor.
//!
//! `softmax(q·kᵀ·scale)·v` over `[B, H, N, D]` queries and `[B, H, M, D]` keys and values,
//! computed per (head, block of query rows): each block's scores (`rows × M`) live in one
//! reused per-thread buffer, the two products are `gemm` calls on the blocks in place (the K/V
//! cache views are read through their strides, never copied), the softmax runs vectorised in
//! between, and the blocks run in parallel on rayon. Composed from candle ops, the same
//! attention wrote and re-read the `[B, H, N, M]` scores several times (scale, softmax, dtype
//! casts), which grows with the cache, and kept one core mostly idle.

use std::cell::RefCell;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::gemm::{matmul_into, Product, Strided};
use streamrecon_core::error::Result;
use streamrecon_core::simd::{exp_f32, vectorized, Kernel};

/// Query rows per task: enough for gemm to be efficient, small enough to spread 8 heads of a
/// 261-token frame over the cores.
const QUERY_BLOCK: usize = 64;

thread_local! {
    /// Borrowed only around single-threaded work (a rayon wait inside could re-enter it).
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A strided view of an f32 CPU tensor `[B, H, M, D]` whose rows are contiguous.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
}

fn view<'a>(data: &'a [f32], l: &candle_core::Layout) -> View<'a> {
    let s = l.stride();
    View {
        data,
        offset: l.start_offset(),
        batch_stride: s[0],
        head_stride: s[1],
        row_stride: s[2],
    }
}

/// [`sdpa`] over any leading dims `[.., N, D]` (flattened to one batch dim).
///
/// # Errors
/// Shape mismatch or a tensor op failure.
pub fn sdpa_batched(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = q.dims().to_vec();
    let r = dims.len();
    let batch: usize = dims[..r - 2].iter().product();
    let flat = |t: &Tensor| -> Result<Tensor> {
        let (n, d) = (t.dim(r - 2)?, t.dim(r - 1)?);
        Ok(t.contiguous()?.reshape((1, batch, n, d))?)
    };
    let out = sdpa(&flat(q)?, &flat(k)?, &flat(v)?, scale)?;
    let mut shape = dims[..r - 1].to_vec();
    shape.push(v.dim(r - 1)?);
    Ok(out.reshape(shape)?)
}

/// softmax(q·kᵀ·scale)·v. f32 tensors on the CPU take the blocked path; anything else (f16,
/// another device) is computed with candle ops in f32 softmax.
///
/// # Errors
/// Shape mismatch or a tensor op failure.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) {
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?;
        return Ok(att.to_dtype(v.dtype())?.matmul(v)?);
    }
    let (b, h, n, d) = q.dims4()?;
    let (kb, kh, m, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
        return Err(streamrecon_core::error::Error::Model(format!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let q = q.contiguous()?;
    // Rows must be contiguous to be read in place; other layouts are copied once.
    let row_major = |t: &Tensor| -> Result<Tensor> {
        let s = t.stride();
        Ok(if s[3] == 1 || d == 1 {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let (k, v) = (row_major(k)?, row_major(v)?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qs, &*ks, &*vs) else {
        unreachable!("checked: CPU tensors");
    };
    let qd = &qc.as_slice::<f32>()?[ql.start_offset()..];
    let kv = view(kc.as_slice::<f32>()?, kl);
    let vv = view(vc.as_slice::<f32>()?, vl);
    let mut out = vec![0f32; b * h * n * d];
    let scale = scale as f32;
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let (bi, hi) = (bh / h, bh % h);
            let q_head = &qd[bh * n * d..(bh + 1) * n * d];
            let k0 = kv.offset + bi * kv.batch_stride + hi * kv.head_stride;
            let v0 = vv.offset + bi * vv.batch_stride + hi * vv.head_stride;
            out_head
                .par_chunks_mut(QUERY_BLOCK * d)
                .enumerate()
                .for_each(|(blk, out_rows)| {
                    let rows = out_rows.len() / d;
                    let q_rows = &q_head[blk * QUERY_BLOCK * d..][..rows * d];
                    SCORES.with(|s| {
                        let mut s = s.borrow_mut();
                        // Grown, never cleared: the product overwrites what it uses.
                        if s.len() < rows * m {
                            s.resize(rows * m, 0.0);
                        }
                        block(
                            q_rows,
                            (&kv.data[k0..], kv.row_stride),
                            (&vv.data[v0..], vv.row_stride),
                            (rows, m, d),
                            scale,
                            &mut s[..rows * m],
                            out_rows,
                        );
                    });
                });
        });
    drop((qs, ks, vs));
    Ok(Tensor::from_vec(out, (b, h, n, d), &Device::Cpu)?)
}

/// One block of query rows against all `m` keys of one head.
fn block(
    q: &[f32],
    (k, k_rs): (&[f32], usize),
    (v, v_rs): (&[f32], usize),
    (rows, m, d): (usize, usize, usize),
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    if m == 0 {
        out.fill(0.0);
        return;
    }
    // scores[rows × m] = scale · q[rows × d] · kᵀ[d × m]
    matmul_into(
        (scores, m),
        (rows, m, d),
        &Strided::rows(q, d),
        &Strided {
            data: k,
            row: 1,
            col: k_rs,
        },
        Product {
            scale,
            ..Product::ONE_THREAD
        },
    );
    let sums = vectorized(SoftmaxRows { scores, m });
    // out[rows × d] = p[rows × m] · v[m × d]
    matmul_into(
        (out, d),
        (rows, d, m),
        &Strided::rows(scores, m),
        &Strided {
            data: v,
            row: v_rs,
            col: 1,
        },
        Product::ONE_THREAD,
    );
    for (row, sum) in out.chunks_exact_mut(d).zip(sums) {
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `exp(x − max)` per row in place; returns each row's sum.
struct SoftmaxRows<'a> {
    scores: &'a mut [f32],
    m: usize,
}

impl Kernel for SoftmaxRows<'_> {
    type Output = Vec<f32>;

    #[allow(clippy::inline_always)] // inlined into the dispatched function
    #[inline(always)]
    fn run(self) -> Vec<f32> {
        // Plain loops only: a closure passed to an iterator adapter (map/fold) is compiled as
        // its own function, outside this dispatched one, for the baseline instruction set.
        let mut sums = vec![0f32; self.scores.len() / self.m.max(1)];
        for (row, sum) in self.scores.chunks_exact_mut(self.m).zip(sums.iter_mut()) {
            let max = lanes_max(row);
            // exp and the row's sum in one pass (the same lanes and order as a separate sum).
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    c[i] = exp_f32(c[i] - max);
                    acc[i] += c[i];
                }
            }
            let mut s = 0.0;
            for x in chunks.into_remainder() {
                *x = exp_f32(*x - max);
                s += *x;
            }
            for a in acc {
                s += a;
            }
            *sum = s;
        }
        sums
    }
}

/// Lanes for the reductions below: independent running values vectorise, one does not.
const LANES: usize = 16;

#[allow(clippy::inline_always)] // inlined into the dispatched function
#[inline(always)]
fn lanes_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in chunks.remainder().iter().chain(&acc) {
        m = m.max(x);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::max_abs_diff;

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        att.matmul(v).unwrap()
    }

    #[test]
    fn blocked_attention_is_the_composed_one_on_cache_views() {
        let dev = Device::Cpu;
        let (b, h, n, d, cap, m) = (1, 3, 130, 16, 400, 333);
        let q = Tensor::randn(0f32, 1.0, (b, h, n, d), &dev).unwrap();
        // K/V as narrowed views of a larger cache, as the rolling memory hands them out.
        let kc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let (k, v) = (kc.narrow(2, 0, m).unwrap(), vc.narrow(2, 0, m).unwrap());
        let diff = max_abs_diff(sdpa(&q, &k, &v, 0.25).unwrap(), composed(&q, &k, &v, 0.25));
        assert!(diff < 1e-5, "max difference {diff}");
        // A transposed (non-row-major) K is copied, not misread.
        let kt = k
            .transpose(2, 3)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        let diff = max_abs_diff(sdpa(&q, &kt, &v, 0.25).unwrap(), composed(&q, &k, &v, 0.25));
        assert!(diff < 1e-5, "max difference {diff}");
    }
}
