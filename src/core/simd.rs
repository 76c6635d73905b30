//! Hot per-pixel loops compiled for the CPU they run on.
//!
//! The crate is built for baseline x86-64 (SSE2), so a loop the compiler vectorises uses 4
//! float lanes and no gathers. [`vectorized`] runs a [`Kernel`] inside a function compiled for
//! AVX2 + FMA (x86-64-v3) when the CPU has them, chosen at run time by `pulp`, so the same
//! loop gets 8 lanes. Floating-point results do not change: Rust never contracts `a * b + c`
//! into an FMA by itself.

/// A loop to run through [`vectorized`]. Implementations mark `run` `#[inline(always)]`, and
/// so does everything it calls per element: code that is not inlined into the dispatched
/// function is compiled for the baseline (a closure is not enough, as the compiler may keep
/// its body out of line).
pub trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

struct Dispatch<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatch<K> {
    type Output = K::Output;

    #[allow(clippy::inline_always)] // the kernel must be inlined here to get the features
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> K::Output {
        self.0.run()
    }
}

/// Runs `kernel` compiled for the best instruction set this CPU has (see the module docs).
#[inline]
pub fn vectorized<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Dispatch(kernel))
}

/// An integral float `n`, |n| < 2²², as its two's-complement `u32`, without the fix-ups of a
/// saturating `as` conversion (which keep a loop's float → int conversions from vectorising
/// well). Out of that range the result is garbage, not undefined.
#[allow(clippy::inline_always)] // inlined into dispatched kernels
#[inline(always)]
#[must_use]
pub fn small_int(n: f32) -> u32 {
    // n + 1.5·2²³ has an ulp of 1, so its bits are those of 1.5·2²³ plus n.
    (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn small_int_is_exact_across_its_range() {
        for n in [-4_194_303i32, -70_000, -1, 0, 1, 639, 4_194_303] {
            assert_eq!(super::small_int(n as f32), n as u32, "{n}");
        }
    }
}
