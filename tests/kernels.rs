//! The CUDA kernels (`kernels/*.cu`) run in their CPU emulation against the CPU twins the models
//! use (`streamrecon-models`): the same sources NVRTC compiles for a GPU, so a wrong index or tap
//! in a kernel fails here, on machines without one. `kernels/tests/gpu.rs` runs them on a device.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use streamrecon_kernels::{emulate, CorrLookup, Depthwise, GridSample, KvPrune};
use streamrecon_models::ops::{depthwise_conv2d, depthwise_residual_gelu, grid_sample_pixels};
use streamrecon_models::vggt::memory::{kept_candidates, redundancy_scores};
use streamrecon_models::videoflow::corr::CorrBlock;

fn random(rng: &mut rand_pcg::Pcg64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest difference over the largest reference magnitude.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

#[test]
fn grid_sample_matches_its_cpu_twin() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(1);
    let s = GridSample {
        n: 2,
        c: 3,
        h: 9,
        w: 11,
        ho: 7,
        wo: 5,
    };
    let img = random(&mut rng, s.n * s.c * s.h * s.w, -1.0, 1.0);
    // Inside, on the border, outside, on integer taps, and not finite.
    let mut coords = random(&mut rng, s.n * s.ho * s.wo * 2, -2.0, 12.0);
    coords[0..6].copy_from_slice(&[0.0, 0.0, 10.0, 8.0, 3.0, 4.0]);
    coords[6] = f32::NAN;
    coords[9] = f32::INFINITY;
    let want = grid_sample_pixels(
        &Tensor::from_slice(&img, (s.n, s.c, s.h, s.w), &Device::Cpu).unwrap(),
        &Tensor::from_slice(&coords, (s.n, s.ho, s.wo, 2), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let mut got = vec![f32::NAN; s.n * s.c * s.ho * s.wo];
    emulate::grid_sample_pixels(s, &img, &coords, &mut got).unwrap();
    let err = relative_error(&got, &values(&want));
    assert!(err <= 1e-6, "grid_sample: relative error {err:e}");
}

#[test]
fn depthwise_convolution_matches_its_cpu_twin() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(2);
    for k in [3, 7, 15] {
        let s = Depthwise {
            n: 2,
            c: 3,
            h: 13,
            w: 17,
            k,
        };
        let x = random(&mut rng, s.n * s.c * s.h * s.w, -1.0, 1.0);
        let weight = random(&mut rng, s.c * k * k, -0.3, 0.3);
        let bias = random(&mut rng, s.c, -0.5, 0.5);
        let xt = Tensor::from_slice(&x, (s.n, s.c, s.h, s.w), &Device::Cpu).unwrap();
        let wt = Tensor::from_slice(&weight, (s.c, 1, k, k), &Device::Cpu).unwrap();
        let bt = Tensor::from_slice(&bias, s.c, &Device::Cpu).unwrap();
        for residual_gelu in [false, true] {
            let want = if residual_gelu {
                depthwise_residual_gelu(&xt, &wt, &bt).unwrap()
            } else {
                depthwise_conv2d(&xt, &wt, Some(&bt)).unwrap()
            };
            let mut got = vec![f32::NAN; x.len()];
            emulate::depthwise_conv2d(s, &x, &weight, &bias, &mut got, residual_gelu).unwrap();
            // The CPU twin sums the taps in four interleaved partial sums.
            let err = relative_error(&got, &values(&want));
            assert!(
                err <= 1e-5,
                "depthwise k={k} gelu={residual_gelu}: relative error {err:e}"
            );
        }
    }
    let even = Depthwise {
        n: 1,
        c: 1,
        h: 4,
        w: 4,
        k: 4,
    };
    let err =
        emulate::depthwise_conv2d(even, &[0.0; 16], &[0.0; 16], &[0.0], &mut [0.0; 16], false)
            .unwrap_err();
    assert!(err.to_string().contains("even"), "{err}");
}

#[test]
fn correlation_lookup_matches_its_cpu_twin() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(3);
    let (b, c, h, w, levels, radius) = (1, 8, 8, 7, 3, 2);
    let fmap = |rng: &mut rand_pcg::Pcg64| {
        Tensor::from_vec(
            random(rng, b * c * h * w, -1.0, 1.0),
            (b, c, h, w),
            &Device::Cpu,
        )
        .unwrap()
    };
    let block = CorrBlock::new(&fmap(&mut rng), &fmap(&mut rng), levels, radius).unwrap();
    let coords = random(&mut rng, b * 2 * h * w, -3.0, 10.0);
    let want = block
        .lookup(&Tensor::from_slice(&coords, (b, 2, h, w), &Device::Cpu).unwrap())
        .unwrap();
    let window = (2 * radius + 1) * (2 * radius + 1);
    let channels = levels * window;
    let mut got = vec![f32::NAN; b * channels * h * w];
    for (level, corr) in block.pyramid().iter().enumerate() {
        let (_, _, hl, wl) = corr.dims4().unwrap();
        let s = CorrLookup {
            batch: b,
            h1: h,
            w1: w,
            hl,
            wl,
            radius,
            scale: (1u32 << level) as f32,
            channel0: level * window,
            channels,
        };
        emulate::corr_lookup(s, &values(corr), &coords, &mut got).unwrap();
    }
    let err = relative_error(&got, &values(&want));
    assert!(err <= 1e-6, "corr lookup: relative error {err:e}");
}

#[test]
fn kv_pruning_keeps_and_moves_what_the_cpu_does() {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(4);
    let mut s = KvPrune {
        heads: 3,
        cap: 48,
        d: 8,
        anchor: 5,
        cand: 37,
        keep: 0,
    };
    let mut keys = random(&mut rng, s.heads * s.cap * s.d, -1.0, 1.0);
    let mut priority = random(&mut rng, s.heads * s.cand, 0.0, 0.2);
    priority[..s.cand].fill(0.0);
    let cpu_scores = |keys: &[f32], h: usize| {
        let rows = &keys[(h * s.cap + s.anchor) * s.d..][..s.cand * s.d];
        let mut scores = redundancy_scores(rows, s.d);
        for (sc, p) in scores.iter_mut().zip(&priority[h * s.cand..]) {
            *sc -= p;
        }
        scores
    };
    // Head 0 (no priority): candidate 3 copied over candidate 20 and the cut put right after
    // it, so two candidates tie on score across the cut and only the position decides (the
    // earlier stays).
    let row = |r: usize| (s.anchor + r) * s.d;
    let copy = keys[row(3)..row(3) + s.d].to_vec();
    keys[row(20)..row(20) + s.d].copy_from_slice(&copy);
    let scores = cpu_scores(&keys, 0);
    let rank = (0..s.cand)
        .filter(|&r| scores[r].total_cmp(&scores[3]).then(r.cmp(&3)).is_lt())
        .count();
    s.keep = rank + 1;
    assert!(s.keep < s.cand, "the tie's cut is past the candidates");
    let tied = kept_candidates(&scores, s.keep);
    assert!(tied.contains(&3) && !tied.contains(&20), "{tied:?}");
    let got = emulate::kv_select(s, &keys, &priority).unwrap();

    let values_cache = random(&mut rng, keys.len(), -5.0, 5.0);
    let mut compacted = vec![f32::NAN; keys.len()];
    emulate::kv_compact(s, &got.slot, &values_cache, &mut compacted).unwrap();

    for h in 0..s.heads {
        let scores = cpu_scores(&keys, h);
        let head_scores = &got.scores[h * s.cand..(h + 1) * s.cand];
        let err = relative_error(head_scores, &scores);
        assert!(err <= 1e-6, "head {h}: scores differ by {err:e}");
        let want = kept_candidates(&scores, s.keep);
        let kept: Vec<u32> = (0..s.cand as u32)
            .filter(|&r| got.slot[h * s.cand + r as usize] >= 0)
            .collect();
        assert_eq!(kept, want, "head {h}: kept candidates");
        // Anchors stay, kept rows follow them in order, the rest is untouched.
        let head = |buf: &[f32], r: usize| buf[(h * s.cap + r) * s.d..][..s.d].to_vec();
        for r in 0..s.anchor {
            assert_eq!(
                head(&compacted, r),
                head(&values_cache, r),
                "head {h} anchor {r}"
            );
        }
        for (slot, &c) in want.iter().enumerate() {
            assert_eq!(
                head(&compacted, s.anchor + slot),
                head(&values_cache, s.anchor + c as usize),
                "head {h} slot {slot}"
            );
        }
        assert!(head(&compacted, s.anchor + s.keep)
            .iter()
            .all(|v| v.is_nan()));
    }
}

#[test]
fn attention_over_a_cache_matches_its_cpu_twin() {
    use streamrecon_kernels::Attention;
    use streamrecon_models::attention::sdpa;
    let mut rng = rand_pcg::Pcg64::seed_from_u64(5);
    let s = Attention {
        heads: 3,
        n: 10,
        m: 37,
        cap: 50,
        d: 16,
        scale: 0.25,
    };
    let q = random(&mut rng, s.heads * s.n * s.d, -2.0, 2.0);
    // Large logits on purpose: the online softmax must rescale as its maximum moves.
    let k = random(&mut rng, s.heads * s.cap * s.d, -3.0, 3.0);
    let v = random(&mut rng, s.heads * s.cap * s.d, -1.0, 1.0);
    let cache = |x: &[f32]| {
        Tensor::from_slice(x, (1, s.heads, s.cap, s.d), &Device::Cpu)
            .unwrap()
            .narrow(2, 0, s.m)
            .unwrap()
    };
    let qt = Tensor::from_slice(&q, (1, s.heads, s.n, s.d), &Device::Cpu).unwrap();
    let want = sdpa(&qt, &cache(&k), &cache(&v), f64::from(s.scale)).unwrap();
    let mut got = vec![f32::NAN; q.len()];
    emulate::attention(s, &q, &k, &v, &mut got).unwrap();
    let err = relative_error(&got, &values(&want));
    assert!(err <= 1e-5, "attention: relative error {err:e}");
    let none = Attention { m: 0, ..s };
    assert!(emulate::attention(none, &q, &k, &v, &mut got).is_err());
}
