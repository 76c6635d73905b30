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

/// `eˣ` in f32 without a libm call, so loops over it vectorise: Cephes' range reduction to
/// `x − n·ln 2` and a degree-6 polynomial, `2ⁿ` put into the exponent bits. Relative error
/// below 3e-7 for x in [−87, 88]; below −87.3 the result is about 1e-38, not 0. Written with
/// fused multiply-adds: inside a dispatched kernel (AVX2 + FMA) each is one instruction; called
/// elsewhere, each is a libm `fmaf` call.
#[allow(clippy::inline_always, clippy::excessive_precision)] // inlined into dispatched kernels
#[inline(always)]
#[must_use]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.376_26);
    // Round x·log₂e to the nearest integer by the 1.5·2²³ trick (no floor call).
    let n = x.mul_add(std::f32::consts::LOG2_E, 12_582_912.0) - 12_582_912.0;
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_375, x));
    let p = 1.987_569_2e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 5.000_000_1e-1);
    let y = (p * r).mul_add(r, r + 1.0);
    y * f32::from_bits((small_int(n).wrapping_add(127)) << 23)
}

/// `erf(x)` in f32 as `x·P(x²)/Q(x²)` on [−4, 4] (beyond, ±1 to f32 precision), P of degree 6
/// and Q of degree 4: absolute error below 5e-7 evaluated in f32. Twelve fused multiply-adds
/// and one division, no exponential: Abramowitz & Stegun's 7.1.26 with [`exp_f32`] took about
/// three times the instructions, and GELU twice the time (1.7-1.8 against 0.8-0.9 ns a value,
/// one thread, AVX2). The coefficients are a weighted least-squares fit of the absolute error on
/// 20,001 points of [0, 4] (numpy and scipy's `erf`, made for this function).
#[allow(clippy::inline_always, clippy::excessive_precision)] // inlined into dispatched kernels
#[inline(always)]
#[must_use]
pub fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let t = x * x;
    let p = 1.922_074_9e-8f32
        .mul_add(t, -1.990_229_1e-6)
        .mul_add(t, 1.554_808_8e-4)
        .mul_add(t, 4.290_535_7e-3)
        .mul_add(t, 5.242_540_4e-2)
        .mul_add(t, 2.138_844_2e-1)
        .mul_add(t, 1.128_378_7);
    let q = 1.097_442_8e-3f32
        .mul_add(t, 1.554_593_1e-2)
        .mul_add(t, 1.207_746_3e-1)
        .mul_add(t, 5.228_778e-1)
        .mul_add(t, 1.0);
    x * p / q
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_and_erf_are_close_to_libm() {
        let mut worst = (0f64, 0f64);
        for i in 0..=200_000 {
            let x = f64::from((-87.0 + 175.0 * f64::from(i) / 200_000.0) as f32);
            let e = f64::from(super::exp_f32(x as f32));
            worst.0 = worst.0.max(((e - x.exp()) / x.exp()).abs());
            let z = (x / 10.0) as f32;
            let erf = f64::from(super::erf_f32(z));
            worst.1 = worst.1.max((erf - libm_erf(f64::from(z))).abs());
        }
        assert!(worst.0 < 3e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 5e-7, "erf absolute error {}", worst.1);
    }

    /// erf by its Taylor series (|x| ≤ 3) or 1 − erfc's continued fraction, in f64.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let (mut term, mut sum, mut k) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                k += 1.0;
                term *= -a * a / k;
                sum += term / (2.0 * k + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = f64::from(k) / 2.0 / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        v.copysign(x)
    }

    #[test]
    fn small_int_is_exact_across_its_range() {
        for n in [-4_194_303i32, -70_000, -1, 0, 1, 639, 4_194_303] {
            assert_eq!(super::small_int(n as f32), n as u32, "{n}");
        }
    }
}
