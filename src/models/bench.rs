//! Speed and memory of the learned engines on synthetic input: what `streamrecon model bench`
//! prints and what the side-by-side comparison with the PyTorch reference reads. The frames are
//! a formula (no files), so the reference side can make the same ones:
//! `sin(0.001·k + 0.05·i)·0.5 + 0.5` over the flat index `k` of frame `i` (vggt) and
//! `120·sin(0.0007·k) + 128` over the flat index of the whole window (VideoFlow).

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::vggt::StreamVggt;
use streamrecon_core::error::Result;
use streamrecon_core::stats::peak_rss_mib;

/// One vggt stream: its speed, per-frame times and memory.
#[derive(Debug, Clone, Serialize)]
pub struct VggtBench {
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    /// `None`: no pruning.
    pub total_budget: Option<usize>,
    pub fps: f64,
    /// Mean ms of frames 1–5, 25–30 and 55–60 (1-based; `None` where the run is shorter).
    pub ms_first: Option<f64>,
    pub ms_mid: Option<f64>,
    pub ms_last: Option<f64>,
    /// Mean ms per frame in the aggregator, camera head, depth head and point head.
    pub stage_ms: [f64; 4],
    /// Global-attention cache length of layer 0 after the last frame.
    pub kv_len_last: usize,
    pub peak_rss_mib: f64,
}

/// One window size of a multi-frame flow model (VideoFlow-MOF, StreamFlow): seconds per window
/// and memory.
#[derive(Debug, Clone, Serialize)]
pub struct FlowWindowBench {
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    pub iters: usize,
    /// Windows timed (after one warm-up window when more than one is asked for).
    pub windows: usize,
    pub s_per_window: f64,
    /// Pairs a window adds when the engine streams (VideoFlow: N − 3, each with both
    /// directions; StreamFlow: T − 1 forward flows, its engine adds a reversed pass for the
    /// backward ones).
    pub new_pairs: usize,
    pub s_per_pair: f64,
    pub peak_rss_mib: f64,
}

/// Frame `i` of the vggt bench stream, `[1, 3, h, w]` in [0, 1]: a slowly panning smooth pattern.
///
/// # Errors
/// A tensor op failure.
pub fn vggt_frame(h: usize, w: usize, i: usize) -> Result<Tensor> {
    let t = Tensor::arange(0f32, (3 * h * w) as f32, &Device::Cpu)?;
    let t = ((t * 0.001)? + i as f64 * 0.05)?.sin()?;
    Ok(((t * 0.5)? + 0.5)?.reshape((1, 3, h, w))?)
}

/// The flow models' bench window, `[n, 3, h, w]` in 0..255.
///
/// # Errors
/// A tensor op failure.
pub fn videoflow_window(n: usize, h: usize, w: usize) -> Result<Tensor> {
    let t = Tensor::arange(0f32, (n * 3 * h * w) as f32, &Device::Cpu)?;
    Ok((((t * 0.0007)?.sin()? * 120.0)? + 128.0)?.reshape((n, 3, h, w))?)
}

/// Mean of the 1-based frames `first..=last` of `ms`, if the run reached `last`.
fn mean_of(ms: &[f64], first: usize, last: usize) -> Option<f64> {
    let s = ms.get(first - 1..last)?;
    Some(s.iter().sum::<f64>() / s.len() as f64)
}

/// Streams `frames` bench frames of `w × h` through `model` with a fresh memory.
/// `on_frame(index, ms)` sees every frame's time.
///
/// # Errors
/// As [`StreamVggt::step`].
pub fn bench_vggt(
    model: &StreamVggt,
    (w, h): (usize, usize),
    frames: usize,
    total_budget: Option<usize>,
    on_frame: &mut dyn FnMut(usize, f64),
) -> Result<VggtBench> {
    let mut memory = model.new_stream(total_budget);
    let mut ms = Vec::with_capacity(frames);
    let mut stage_ms = [0f64; 4];
    let mut busy = 0.0;
    for i in 0..frames {
        let img = vggt_frame(h, w, i)?;
        let t0 = Instant::now();
        let out = model.step(&img, i, &mut memory, &mut |_, _| {})?;
        let dt = t0.elapsed().as_secs_f64();
        busy += dt;
        for (s, v) in stage_ms.iter_mut().zip(out.stage_ms) {
            *s += v / frames as f64;
        }
        ms.push(dt * 1e3);
        on_frame(i, dt * 1e3);
    }
    Ok(VggtBench {
        frames,
        width: w,
        height: h,
        total_budget,
        fps: frames as f64 / busy,
        ms_first: mean_of(&ms, 1, 5),
        ms_mid: mean_of(&ms, 25, 30),
        ms_last: mean_of(&ms, 55, 60),
        stage_ms,
        kv_len_last: memory
            .global
            .first()
            .map_or(0, crate::vggt::memory::LayerKv::len),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Runs `windows` passes of `forward` over `frames` `[N, 3, H, W]`; the first is a warm-up when
/// there are more than one. `on_window(index, seconds)` sees every window's time.
///
/// # Errors
/// As `forward`.
pub fn bench_flow_window(
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    frames: &Tensor,
    iters: usize,
    new_pairs: usize,
    windows: usize,
    on_window: &mut dyn FnMut(usize, f64),
) -> Result<FlowWindowBench> {
    let (n, _, h, w) = frames.dims4()?;
    let mut seconds = Vec::with_capacity(windows);
    for k in 0..windows.max(1) {
        let t0 = Instant::now();
        forward(frames)?;
        seconds.push(t0.elapsed().as_secs_f64());
        on_window(k, seconds[k]);
    }
    let timed = if seconds.len() > 1 {
        &seconds[1..]
    } else {
        &seconds[..]
    };
    let s_per_window = timed.iter().sum::<f64>() / timed.len() as f64;
    Ok(FlowWindowBench {
        frames: n,
        width: w,
        height: h,
        iters,
        windows: timed.len(),
        s_per_window,
        new_pairs,
        s_per_pair: s_per_window / new_pairs.max(1) as f64,
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_means_are_one_based_and_absent_past_the_run() {
        let ms: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(mean_of(&ms, 1, 5), Some(3.0));
        assert_eq!(mean_of(&ms, 25, 30), Some(27.5));
        assert_eq!(mean_of(&ms, 55, 60), None);
    }

    #[test]
    fn bench_frames_follow_the_formula() {
        let f = vggt_frame(2, 3, 4).unwrap().flatten_all().unwrap();
        let v: Vec<f32> = f.to_vec1().unwrap();
        let expect = |k: usize| (k as f32 * 0.001 + 0.2).sin() * 0.5 + 0.5;
        assert!((v[0] - expect(0)).abs() < 1e-6);
        assert!((v[17] - expect(17)).abs() < 1e-6);
        let wnd = videoflow_window(5, 2, 3).unwrap().flatten_all().unwrap();
        let v: Vec<f32> = wnd.to_vec1().unwrap();
        assert!((v[89] - ((89.0f32 * 0.0007).sin() * 120.0 + 128.0)).abs() < 1e-4);
    }
}
