//! The kernels run on the CPU: the `.cu` sources built as C++ (see `build.rs`), each launch a
//! loop over every (block, thread) of the grid the GPU launch would have. Slow and exact: for
//! tests against the CPU twins, not for use.

use std::os::raw::{c_float, c_int, c_uint};

use crate::{
    blocks_for, Attention, CorrLookup, Depthwise, GridSample, KvPrune, Result, THREADS_PER_BLOCK,
};

extern "C" {
    fn streamrecon_emu_index(block: c_uint, thread: c_uint, block_dim: c_uint, grid_dim: c_uint);
    fn grid_sample_pixels_f32(
        img: *const c_float,
        coords: *const c_float,
        out: *mut c_float,
        n: c_int,
        c: c_int,
        h: c_int,
        w: c_int,
        ho: c_int,
        wo: c_int,
    );
    fn depthwise_conv2d_f32(
        x: *const c_float,
        weight: *const c_float,
        bias: *const c_float,
        out: *mut c_float,
        n: c_int,
        c: c_int,
        h: c_int,
        w: c_int,
        k: c_int,
        residual_gelu: c_int,
    );
    fn corr_lookup_f32(
        corr: *const c_float,
        coords: *const c_float,
        out: *mut c_float,
        batch: c_int,
        h1: c_int,
        w1: c_int,
        hl: c_int,
        wl: c_int,
        radius: c_int,
        scale: c_float,
        channel0: c_int,
        channels: c_int,
    );
    fn attention_f32(
        q: *const c_float,
        k: *const c_float,
        v: *const c_float,
        out: *mut c_float,
        heads: c_int,
        n: c_int,
        m: c_int,
        cap: c_int,
        d: c_int,
        scale: c_float,
    );
    fn kv_key_norms_f32(
        keys: *const c_float,
        norms: *mut c_float,
        heads: c_int,
        cap: c_int,
        anchor: c_int,
        cand: c_int,
        d: c_int,
    );
    fn kv_mean_key_f32(
        keys: *const c_float,
        norms: *const c_float,
        mean: *mut c_float,
        heads: c_int,
        cap: c_int,
        anchor: c_int,
        cand: c_int,
        d: c_int,
    );
    fn kv_scores_f32(
        keys: *const c_float,
        norms: *const c_float,
        mean: *const c_float,
        priority: *const c_float,
        scores: *mut c_float,
        heads: c_int,
        cap: c_int,
        anchor: c_int,
        cand: c_int,
        d: c_int,
    );
    fn kv_rank_keep_f32(
        scores: *const c_float,
        kept: *mut c_int,
        heads: c_int,
        cand: c_int,
        keep: c_int,
    );
    fn kv_keep_slots(kept: *const c_int, slot: *mut c_int, heads: c_int, cand: c_int);
    fn kv_compact_f32(
        src: *const c_float,
        slot: *const c_int,
        dst: *mut c_float,
        heads: c_int,
        cap: c_int,
        anchor: c_int,
        cand: c_int,
        d: c_int,
    );
}

/// One launch of `threads` threads: every (block, thread) of the grid in turn, on this thread
/// (the emulation's launch indices are thread-local).
fn launch(threads: usize, mut kernel: impl FnMut()) -> Result<()> {
    let blocks = blocks_for(threads)?;
    for block in 0..blocks {
        for thread in 0..THREADS_PER_BLOCK {
            // SAFETY: sets four thread-local integers.
            unsafe { streamrecon_emu_index(block, thread, THREADS_PER_BLOCK, blocks) };
            kernel();
        }
    }
    Ok(())
}

/// `grid_sample_pixels_f32` into `out`.
///
/// # Errors
/// Buffer lengths that do not match the shape.
pub fn grid_sample_pixels(
    s: GridSample,
    img: &[f32],
    coords: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let [n, c, h, w, ho, wo] = s.check(img.len(), coords.len(), out.len())?;
    let out = out.as_mut_ptr();
    // SAFETY: the lengths were checked against the shape the kernel indexes by, and each
    // thread returns past the last output.
    launch(s.threads(), || unsafe {
        grid_sample_pixels_f32(img.as_ptr(), coords.as_ptr(), out, n, c, h, w, ho, wo);
    })
}

/// `depthwise_conv2d_f32` into `out`; `residual_gelu` makes it `gelu(x + conv(x))`.
///
/// # Errors
/// Buffer lengths that do not match the shape, or an even kernel.
pub fn depthwise_conv2d(
    s: Depthwise,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
    residual_gelu: bool,
) -> Result<()> {
    let [n, c, h, w, k] = s.check(x.len(), weight.len(), bias.len(), out.len())?;
    let out = out.as_mut_ptr();
    // SAFETY: as for grid_sample_pixels.
    launch(s.threads(), || unsafe {
        depthwise_conv2d_f32(
            x.as_ptr(),
            weight.as_ptr(),
            bias.as_ptr(),
            out,
            n,
            c,
            h,
            w,
            k,
            c_int::from(residual_gelu),
        );
    })
}

/// `corr_lookup_f32` for one level, into its channels of `out`.
///
/// # Errors
/// Buffer lengths that do not match the shape.
pub fn corr_lookup(s: CorrLookup, corr: &[f32], coords: &[f32], out: &mut [f32]) -> Result<()> {
    let [batch, h1, w1, hl, wl, radius, channel0, channels] =
        s.check(corr.len(), coords.len(), out.len())?;
    let out = out.as_mut_ptr();
    // SAFETY: as for grid_sample_pixels.
    launch(s.threads(), || unsafe {
        corr_lookup_f32(
            corr.as_ptr(),
            coords.as_ptr(),
            out,
            batch,
            h1,
            w1,
            hl,
            wl,
            radius,
            s.scale,
            channel0,
            channels,
        );
    })
}

/// `attention_f32` into `out`.
///
/// # Errors
/// Buffer lengths that do not match the shape, a head size over 256 or no cache rows.
pub fn attention(s: Attention, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) -> Result<()> {
    let [heads, n, m, cap, d] = s.check(q.len(), k.len(), v.len(), out.len())?;
    let out = out.as_mut_ptr();
    // SAFETY: as for grid_sample_pixels.
    launch(s.threads(), || unsafe {
        attention_f32(
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            out,
            heads,
            n,
            m,
            cap,
            d,
            s.scale,
        );
    })
}

/// What the pruning kernels chose: each candidate's score (`[heads, cand]`) and its row after
/// the anchors in the compacted cache (`-1`: dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct KvSelection {
    pub scores: Vec<f32>,
    pub slot: Vec<i32>,
}

/// The four selection launches of `kv_prune.cu` over a `[heads, cap, d]` key cache.
///
/// # Errors
/// Buffer lengths that do not match the shape.
pub fn kv_select(s: KvPrune, keys: &[f32], priority: &[f32]) -> Result<KvSelection> {
    let [heads, cap, d, anchor, cand, keep] = s.check(keys.len(), priority.len())?;
    let mut norms = vec![0f32; s.heads * s.cand];
    let mut mean = vec![0f32; s.heads * s.d];
    let mut scores = vec![0f32; s.heads * s.cand];
    let mut kept = vec![0 as c_int; s.heads * s.cand];
    let mut slot = vec![0 as c_int; s.heads * s.cand];
    let k = keys.as_ptr();
    // SAFETY: every buffer was sized from the checked shape above.
    unsafe {
        let p = norms.as_mut_ptr();
        launch(s.heads * s.cand, || {
            kv_key_norms_f32(k, p, heads, cap, anchor, cand, d);
        })?;
        let (nm, p) = (norms.as_ptr(), mean.as_mut_ptr());
        launch(s.heads * s.d, || {
            kv_mean_key_f32(k, nm, p, heads, cap, anchor, cand, d);
        })?;
        let (m, p) = (mean.as_ptr(), scores.as_mut_ptr());
        launch(s.heads * s.cand, || {
            kv_scores_f32(k, nm, m, priority.as_ptr(), p, heads, cap, anchor, cand, d);
        })?;
        let (sc, p) = (scores.as_ptr(), kept.as_mut_ptr());
        launch(s.heads * s.cand, || {
            kv_rank_keep_f32(sc, p, heads, cand, keep);
        })?;
        let (kp, p) = (kept.as_ptr(), slot.as_mut_ptr());
        launch(s.heads, || kv_keep_slots(kp, p, heads, cand))?;
    }
    Ok(KvSelection { scores, slot })
}

/// `kv_compact_f32`: the anchors and the kept candidates of `src` into `dst` (both
/// `[heads, cap, d]`; rows past the kept ones are left as they were).
///
/// # Errors
/// Buffer lengths that do not match the shape.
pub fn kv_compact(s: KvPrune, slot: &[i32], src: &[f32], dst: &mut [f32]) -> Result<()> {
    let [heads, cap, d, anchor, cand, _] = s.check(src.len(), slot.len())?;
    if dst.len() != src.len() {
        return Err(crate::Error::Shape(format!(
            "kv_compact: {} values into {}",
            src.len(),
            dst.len()
        )));
    }
    if let Some(bad) = slot.iter().find(|&&v| v < -1 || v >= cand) {
        return Err(crate::Error::Shape(format!(
            "kv_compact: slot {bad} outside -1..{cand}"
        )));
    }
    let out = dst.as_mut_ptr();
    // SAFETY: as for grid_sample_pixels; slots (checked) index rows below anchor + cand ≤ cap.
    launch(s.heads * (s.anchor + s.cand) * s.d, || unsafe {
        kv_compact_f32(
            src.as_ptr(),
            slot.as_ptr(),
            out,
            heads,
            cap,
            anchor,
            cand,
            d,
        );
    })
}
