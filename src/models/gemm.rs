//! Matrix products straight into slices, by the `gemm` crate (candle's own CPU matmul engine):
//! for the kernels that multiply parts of buffers they own (attention blocks, convolution
//! bands) without wrapping each part in a tensor, copying it in and copying the product out.

/// Runs `f` on the values of an f32 CPU tensor in row-major order, read in place when the
/// tensor is contiguous (copied once otherwise).
///
/// # Errors
/// Another dtype or device.
pub fn with_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    let data = cpu.as_slice::<f32>()?;
    Ok(f(
        &data[layout.start_offset()..layout.start_offset() + t.elem_count()]
    ))
}

/// A matrix in a slice: element (i, j) at `data[i·row + j·col]`.
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub row: usize,
    pub col: usize,
}

impl<'a> Strided<'a> {
    /// Row-major with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row: cols,
            col: 1,
        }
    }

    /// Whether an `r × c` matrix lies inside the slice.
    fn holds(&self, r: usize, c: usize) -> bool {
        fits(self.data.len(), self.row, self.col, r, c)
    }
}

fn fits(len: usize, row: usize, col: usize, r: usize, c: usize) -> bool {
    r == 0 || c == 0 || (r - 1) * row + (c - 1) * col < len
}

/// How a product is computed.
#[derive(Clone, Copy)]
pub struct Product {
    /// Multiplies `lhs · rhs`.
    pub scale: f32,
    /// Adds to what `dst` holds instead of overwriting it.
    pub accumulate: bool,
    /// Splits the product over rayon's threads (for one large product; blocks that already
    /// run in parallel use one thread each).
    pub parallel: bool,
}

impl Product {
    pub const ONE_THREAD: Self = Self {
        scale: 1.0,
        accumulate: false,
        parallel: false,
    };
}

/// `n` copies of `value`, written here rather than `calloc`ed: for a recycled large block,
/// jemalloc's `calloc` zeroes by dropping the pages, which then fault back in on first touch
/// (one VideoFlow window: 1.12 M page faults with `vec![0.0; n]` for the models' buffers,
/// 0.72 M with this).
#[must_use]
pub fn filled(n: usize, value: f32) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, value);
    v
}

/// `dst[m × n] (+)= scale · lhs[m × k] · rhs[k × n]`, element (i, j) of `dst` at
/// `dst[i·dst_row + j]`.
///
/// # Panics
/// If a matrix does not fit its slice (a bug in the caller, never data-dependent).
#[allow(unsafe_code)] // gemm's entry point takes raw pointers and strides
pub fn matmul_into(
    (dst, dst_row): (&mut [f32], usize),
    (m, n, k): (usize, usize, usize),
    lhs: &Strided,
    rhs: &Strided,
    p: Product,
) {
    assert!(
        fits(dst.len(), dst_row, 1, m, n) && lhs.holds(m, k) && rhs.holds(k, n),
        "matmul_into: a {m}×{n}×{k} product does not fit its buffers"
    );
    let s = |x: usize| x as isize;
    let parallelism = if p.parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assertion above keeps every element gemm reads or writes inside its slice;
    // `dst` is a unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(dst_row),
            p.accumulate,
            lhs.data.as_ptr(),
            s(lhs.col),
            s(lhs.row),
            rhs.data.as_ptr(),
            s(rhs.col),
            s(rhs.row),
            if p.accumulate { 1.0 } else { 0.0 },
            p.scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_a_naive_loop() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        // b stored transposed: element (i, j) at j·k + i.
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 1.5).collect();
        let mut out = vec![1f32; m * 9];
        matmul_into(
            (&mut out, 9),
            (m, n, k),
            &Strided::rows(&a, k),
            &Strided {
                data: &b,
                row: 1,
                col: k,
            },
            Product {
                scale: 2.0,
                accumulate: true,
                parallel: false,
            },
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 =
                    1.0 + 2.0 * (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum::<f32>();
                assert!((out[i * 9 + j] - want).abs() < 1e-4);
            }
            assert!(
                out[i * 9 + 8].to_bits() == 1f32.to_bits(),
                "columns past n are untouched"
            );
        }
    }
}
