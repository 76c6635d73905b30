//! The kernels through CUDA (feature `cuda`): NVRTC compiles every source (this needs only
//! libnvrtc, no GPU: `scripts/test` installs it and sets `STREAMRECON_REQUIRE_NVRTC`), a machine
//! without a driver gets a clear error, and on a machine with a GPU every kernel's device result
//! is checked against its CPU emulation (`STREAMRECON_REQUIRE_GPU` makes a missing GPU a
//! failure rather than a skip).
#![cfg(feature = "cuda")]

use streamrecon_kernels::cuda::{self, Gpu};
use streamrecon_kernels::SOURCES;
use streamrecon_kernels::{
    emulate, probe, Attention, CorrLookup, Depthwise, Error, GridSample, KvPrune,
};

fn required(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == "1")
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !cuda::nvrtc_present() {
        assert!(
            !required("STREAMRECON_REQUIRE_NVRTC"),
            "STREAMRECON_REQUIRE_NVRTC=1 but libnvrtc could not be loaded"
        );
        eprintln!("skipped: no libnvrtc on this machine");
        return;
    }
    for source in SOURCES {
        let ptx = cuda::compile(source).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for kernel in source.kernels {
            assert!(
                text.contains(&format!(".entry {kernel}(")),
                "{}: no entry {kernel} in the PTX",
                source.file
            );
        }
    }
}

#[test]
fn no_driver_is_one_clear_error() {
    if cuda::driver_present() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let err = probe(0).unwrap_err();
    assert!(matches!(err, Error::NoDriver), "{err:?}");
    assert!(err.to_string().starts_with("CUDA"), "{err}");
    assert!(matches!(Gpu::open(0), Err(Error::NoDriver)));
}

/// A small deterministic generator (no rand in this crate).
struct Lcg(u64);

impl Lcg {
    fn values(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }
}

fn close(name: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // The device contracts multiply-adds; the emulation does not.
    assert!(
        diff / scale <= 1e-5,
        "{name}: relative error {:e}",
        diff / scale
    );
}

#[test]
fn kernels_on_the_device_match_their_emulation() {
    let gpu = match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            assert!(
                !required("STREAMRECON_REQUIRE_GPU"),
                "STREAMRECON_REQUIRE_GPU=1: {e}"
            );
            eprintln!("skipped: {e}");
            return;
        }
    };
    eprintln!("device: {:?}", gpu.info());
    let st = gpu.stream();
    let up = |v: &[f32]| st.clone_htod(v).unwrap();
    let down = |d: &cudarc::driver::CudaSlice<f32>| st.clone_dtoh(d).unwrap();
    let mut rng = Lcg(7);

    let s = GridSample {
        n: 2,
        c: 5,
        h: 33,
        w: 41,
        ho: 17,
        wo: 19,
    };
    let (img, coords) = (
        rng.values(s.n * s.c * s.h * s.w, -1.0, 1.0),
        rng.values(s.n * s.ho * s.wo * 2, -3.0, 44.0),
    );
    let mut want = vec![0.0; s.n * s.c * s.ho * s.wo];
    emulate::grid_sample_pixels(s, &img, &coords, &mut want).unwrap();
    let mut out = st.alloc_zeros::<f32>(want.len()).unwrap();
    gpu.grid_sample_pixels(s, &up(&img), &up(&coords), &mut out)
        .unwrap();
    close("grid_sample", &down(&out), &want);

    let s = Depthwise {
        n: 1,
        c: 6,
        h: 40,
        w: 56,
        k: 15,
    };
    let x = rng.values(s.n * s.c * s.h * s.w, -1.0, 1.0);
    let (wt, bias) = (
        rng.values(s.c * s.k * s.k, -0.2, 0.2),
        rng.values(s.c, -0.5, 0.5),
    );
    for gelu in [false, true] {
        let mut want = vec![0.0; x.len()];
        emulate::depthwise_conv2d(s, &x, &wt, &bias, &mut want, gelu).unwrap();
        let mut out = st.alloc_zeros::<f32>(x.len()).unwrap();
        gpu.depthwise_conv2d(s, &up(&x), &up(&wt), &up(&bias), &mut out, gelu)
            .unwrap();
        close("depthwise", &down(&out), &want);
    }

    let s = CorrLookup {
        batch: 1,
        h1: 12,
        w1: 14,
        hl: 6,
        wl: 7,
        radius: 4,
        scale: 2.0,
        channel0: 81,
        channels: 162,
    };
    let corr = rng.values(s.batch * s.h1 * s.w1 * s.hl * s.wl, -1.0, 1.0);
    let coords = rng.values(s.batch * 2 * s.h1 * s.w1, -2.0, 16.0);
    let mut want = vec![0.0; s.batch * s.channels * s.h1 * s.w1];
    emulate::corr_lookup(s, &corr, &coords, &mut want).unwrap();
    let mut out = st.alloc_zeros::<f32>(want.len()).unwrap();
    gpu.corr_lookup(s, &up(&corr), &up(&coords), &mut out)
        .unwrap();
    close("corr_lookup", &down(&out), &want);

    let s = Attention {
        heads: 4,
        n: 70,
        m: 900,
        cap: 1000,
        d: 64,
        scale: 0.125,
    };
    let q = rng.values(s.heads * s.n * s.d, -2.0, 2.0);
    let (k, v) = (
        rng.values(s.heads * s.cap * s.d, -2.0, 2.0),
        rng.values(s.heads * s.cap * s.d, -1.0, 1.0),
    );
    let mut want = vec![0.0; q.len()];
    emulate::attention(s, &q, &k, &v, &mut want).unwrap();
    let mut out = st.alloc_zeros::<f32>(q.len()).unwrap();
    gpu.attention(s, &up(&q), &up(&k), &up(&v), &mut out)
        .unwrap();
    close("attention", &down(&out), &want);

    let s = KvPrune {
        heads: 4,
        cap: 600,
        d: 64,
        anchor: 40,
        cand: 500,
        keep: 300,
    };
    let keys = rng.values(s.heads * s.cap * s.d, -1.0, 1.0);
    let priority = rng.values(s.heads * s.cand, 0.0, 0.1);
    let want = emulate::kv_select(s, &keys, &priority).unwrap();
    let (scores, slot) = gpu.kv_select(s, &up(&keys), &up(&priority)).unwrap();
    close("kv scores", &down(&scores), &want.scores);
    let slot = st.clone_dtoh(&slot).unwrap();
    // Contracted multiply-adds may reorder candidates whose scores are within rounding.
    let differ = slot
        .iter()
        .zip(&want.slot)
        .filter(|(a, b)| (**a >= 0) != (**b >= 0))
        .count();
    assert!(differ <= 4, "{differ} candidates kept on one side only");
    let mut want_cache = keys.clone();
    emulate::kv_compact(s, &want.slot, &keys, &mut want_cache).unwrap();
    let mut out = up(&keys);
    gpu.kv_compact(s, &st.clone_htod(&want.slot).unwrap(), &up(&keys), &mut out)
        .unwrap();
    close("kv_compact", &down(&out), &want_cache);
}
