//! Scaled dot-product attention on the CPU without the whole score tensor.
//!
//! `softmax(q·kᵀ·scale)·v` over `[B, H, N, D]` queries and `[B, H, M, D]` keys and values,
//! computed per (head, block of query rows), a tile of keys at a time with an online softmax: a
//! tile's scores (`tile × rows`) live in one reused per-thread buffer that stays in cache, the
//! two products are `gemm` calls on the blocks in place (the K/V cache views are read through
//! their strides, never copied), the softmax runs vectorised in between, and the blocks run in
//! parallel on rayon. Composed from candle ops, the same attention wrote and re-read the
//! `[B, H, N, M]` scores several times (scale, softmax, dtype casts), which grows with the
//! cache, and kept one core mostly idle.

use std::cell::RefCell;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::gemm::{matmul_into, Product, Strided};
use streamrecon_core::error::Result;
use streamrecon_core::simd::{exp_f32, vectorized, Kernel};

/// Most query rows per task: every query of a 261-token frame in one task, so each head's keys
/// and values are packed for the products once.
const QUERY_BLOCK: usize = 288;

/// Keys per tile: a tile's scores for a full query block (`KEY_TILE × QUERY_BLOCK` f32, 295 KB)
/// stay in a core's L2 between the two products and the softmax.
const KEY_TILE: usize = 256;

/// One thread's working buffers, grown and never shrunk.
#[derive(Default)]
struct Scratch {
    /// The block's queries padded with zero rows (when they are padded).
    q: Vec<f32>,
    /// One key tile's scores, `tile × rows` (a column per query).
    scores: Vec<f32>,
    /// The block's unnormalised output, `rows × d`.
    acc: Vec<f32>,
    /// Per query: running max, running sum, the rescale of earlier tiles, the tile's max.
    max: Vec<f32>,
    sum: Vec<f32>,
    rescale: Vec<f32>,
    tile_max: Vec<f32>,
}

thread_local! {
    /// Borrowed only around single-threaded work (a rayon wait inside could re-enter it).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
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
    let mut out = crate::gemm::filled(b * h * n * d, 0.0);
    let scale = scale as f32;
    // Blocks of equal size, at most QUERY_BLOCK rows.
    let per_block = n.div_ceil(n.div_ceil(QUERY_BLOCK).max(1)).max(1);
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(bh, out_head)| {
            let (bi, hi) = (bh / h, bh % h);
            let q_head = &qd[bh * n * d..(bh + 1) * n * d];
            let k0 = kv.offset + bi * kv.batch_stride + hi * kv.head_stride;
            let v0 = vv.offset + bi * vv.batch_stride + hi * vv.head_stride;
            out_head
                .par_chunks_mut(per_block * d)
                .enumerate()
                .for_each(|(blk, out_rows)| {
                    let rows = out_rows.len() / d;
                    let q_rows = &q_head[blk * per_block * d..][..rows * d];
                    SCRATCH.with(|s| {
                        block(
                            q_rows,
                            (&kv.data[k0..], kv.row_stride),
                            (&vv.data[v0..], vv.row_stride),
                            (rows, m, d),
                            scale,
                            &mut s.borrow_mut(),
                            out_rows,
                        );
                    });
                });
        });
    drop((qs, ks, vs));
    Ok(Tensor::from_vec(out, (b, h, n, d), &Device::Cpu)?)
}

/// One block of query rows against all `m` keys of one head, a tile of keys at a time with a
/// running (online) softmax per query, so no score matrix over all keys is ever made. Scores
/// are kept a column per query: the second product then reads them as a column-major left-hand
/// side, which gemm uses in place (row-major, it copied the whole block's scores first), and the
/// softmax's reductions run across queries, vectorised.
fn block(
    q: &[f32],
    (k, k_rs): (&[f32], usize),
    (v, v_rs): (&[f32], usize),
    (rows, m, d): (usize, usize, usize),
    scale: f32,
    s: &mut Scratch,
    out: &mut [f32],
) {
    if m == 0 {
        out.fill(0.0);
        return;
    }
    // Rows padded to the vector width (the left-hand side gemm reads in place), for blocks
    // large enough that the padding costs little.
    let padded = if rows >= 64 {
        rows.next_multiple_of(8)
    } else {
        rows
    };
    // The queries are copied only to be padded.
    let qb: &[f32] = if padded == rows {
        q
    } else {
        grow(&mut s.q, padded * d);
        s.q[..rows * d].copy_from_slice(q);
        s.q[rows * d..padded * d].fill(0.0);
        &s.q[..padded * d]
    };
    grow(&mut s.scores, KEY_TILE.min(m) * padded);
    grow(&mut s.acc, padded * d);
    for b in [&mut s.max, &mut s.sum, &mut s.rescale, &mut s.tile_max] {
        grow(b, padded);
    }
    let acc = &mut s.acc[..padded * d];
    for start in (0..m).step_by(KEY_TILE) {
        let tile = KEY_TILE.min(m - start);
        let scores = &mut s.scores[..tile * padded];
        // scores[tile × padded] = scale · k[tile × d] · qᵀ[d × padded]
        matmul_into(
            (scores, padded),
            (tile, padded, d),
            &Strided {
                data: &k[start * k_rs..],
                row: k_rs,
                col: 1,
            },
            &Strided {
                data: qb,
                row: 1,
                col: d,
            },
            Product {
                scale,
                ..Product::ONE_THREAD
            },
        );
        let first = start == 0;
        vectorized(OnlineSoftmax {
            scores,
            cols: padded,
            max: &mut s.max[..padded],
            sum: &mut s.sum[..padded],
            rescale: &mut s.rescale[..padded],
            tile_max: &mut s.tile_max[..padded],
            first,
        });
        if !first {
            for (row, &r) in acc.chunks_exact_mut(d).zip(&s.rescale[..padded]) {
                for x in row.iter_mut() {
                    *x *= r;
                }
            }
        }
        // acc[padded × d] (+)= p[padded × tile] · v[tile × d]
        matmul_into(
            (acc, d),
            (padded, d, tile),
            &Strided {
                data: scores,
                row: 1,
                col: padded,
            },
            &Strided {
                data: &v[start * v_rs..],
                row: v_rs,
                col: 1,
            },
            Product {
                accumulate: !first,
                ..Product::ONE_THREAD
            },
        );
    }
    for ((o, a), &sum) in out
        .chunks_exact_mut(d)
        .zip(acc.chunks_exact(d))
        .zip(&s.sum[..rows])
    {
        let inv = 1.0 / sum;
        for (o, &a) in o.iter_mut().zip(a) {
            *o = a * inv;
        }
    }
}

/// Makes `b` at least `n` long (its values are overwritten before they are read).
fn grow(b: &mut Vec<f32>, n: usize) {
    if b.len() < n {
        b.resize(n, 0.0);
    }
}

/// One key tile of the online softmax, scores `tile × cols` (a column per query): each
/// column's running max and sum brought up to date, the factor earlier tiles' sums and outputs
/// are rescaled by, and the scores replaced by `exp(score − max)`.
struct OnlineSoftmax<'a> {
    scores: &'a mut [f32],
    cols: usize,
    max: &'a mut [f32],
    sum: &'a mut [f32],
    rescale: &'a mut [f32],
    tile_max: &'a mut [f32],
    first: bool,
}

impl Kernel for OnlineSoftmax<'_> {
    type Output = ();

    #[allow(clippy::inline_always)] // inlined into the dispatched function
    #[inline(always)]
    fn run(self) {
        // Plain indexed loops over slices cut to one length: the compiler then drops the bounds
        // checks and vectorises (with them, the exp loop ran a lane at a time).
        let n = self.cols;
        let (max, sum) = (&mut self.max[..n], &mut self.sum[..n]);
        let (rescale, tile_max) = (&mut self.rescale[..n], &mut self.tile_max[..n]);
        let mut rows = self.scores.chunks_exact_mut(n);
        let Some(first_row) = rows.next() else {
            return;
        };
        tile_max.copy_from_slice(first_row);
        for row in rows {
            let row = &row[..n];
            for j in 0..n {
                tile_max[j] = tile_max[j].max(row[j]);
            }
        }
        if self.first {
            max.copy_from_slice(tile_max);
            sum.fill(0.0);
        } else {
            for j in 0..n {
                let new = max[j].max(tile_max[j]);
                rescale[j] = exp_f32(max[j] - new);
                sum[j] *= rescale[j];
                max[j] = new;
            }
        }
        for row in self.scores.chunks_exact_mut(n) {
            let row = &mut row[..n];
            for j in 0..n {
                row[j] = exp_f32(row[j] - max[j]);
                sum[j] += row[j];
            }
        }
    }
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

    #[test]
    fn tiles_and_blocks_of_every_shape_give_the_composed_attention() {
        let dev = Device::Cpu;
        // (queries, keys, scale): a block under 64 rows (not padded) over three key tiles; two
        // query blocks of a padded size over one whole tile; one key; and sharp scores (scale
        // 4: a later tile's max far above the first's) where the running rescale matters.
        for (n, m, scale) in [
            (5, 2 * KEY_TILE + 77, 0.25),
            (QUERY_BLOCK + 13, KEY_TILE, 0.25),
            (70, 1, 0.25),
            (261, 3 * KEY_TILE + 1, 4.0),
        ] {
            let q = Tensor::randn(0f32, 1.0, (1, 2, n, 16), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (1, 2, m, 16), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, 2, m, 16), &dev).unwrap();
            let want = composed(&q, &k, &v, scale);
            let diff = max_abs_diff(sdpa(&q, &k, &v, scale).unwrap(), want);
            assert!(diff < 1e-5, "{n} queries, {m} keys: max difference {diff}");
        }
    }
}
