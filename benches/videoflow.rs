//! Speed and memory of the `videoflow` model (VideoFlow-MOF), one window of 5 frames on the CPU:
//! the tiny fixture config (60×78, the fixture's weights) and the released full-size config on a
//! 256×448 input (random weights). Each case runs in its own process so its peak RSS is its own.
//!
//! `cargo bench --bench videoflow [-- WINDOWS]` (default 2 windows per case; the first is warm-up
//! when more than one is run).
//!
//! Against the PyTorch reference on the same CPU: `benches/REFERENCE.md` (procedure and last
//! figures); `streamrecon model bench` is the tool for both.

use std::path::Path;
use std::process::Command;

use candle_core::DType;
use streamrecon::models::bench::{bench_flow_window, videoflow_window};
use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
use streamrecon::models::weights::Weights;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let windows: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(2);
    if let Some(case) = args.iter().find_map(|a| a.strip_prefix("--case=")) {
        run_case(case, windows);
        return;
    }
    println!(
        "videoflow, CPU, {} threads, 5-frame windows",
        rayon::current_num_threads()
    );
    let exe = std::env::current_exe().expect("bench executable");
    for case in ["tiny", "full"] {
        let status = Command::new(&exe)
            .arg(format!("--case={case}"))
            .arg(windows.to_string())
            .arg("--bench")
            .status()
            .expect("run case");
        assert!(status.success(), "case {case} failed");
    }
}

fn run_case(case: &str, windows: usize) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/videoflow-tiny");
    let (net, h, w) = if case == "tiny" {
        let cfg = VideoFlowConfig::from_json_file(&fixture.join("config.json")).expect("config");
        (
            MofNet::load(&fixture.join("model.safetensors"), cfg).expect("weights"),
            60,
            78,
        )
    } else {
        let net = MofNet::new(
            &Weights::random(0, DType::F32),
            VideoFlowConfig::mof_released(),
        )
        .expect("full model");
        (net, 256, 448)
    };
    let frames = videoflow_window(5, h, w).expect("frames");
    let r = bench_flow_window(
        &|x| net.forward(x, None),
        &frames,
        net.config.mof.decoder_depth,
        2,
        windows,
        &mut |_, _| {},
    )
    .expect("forward");
    println!(
        "{case:<5} {w}×{h}, {} iterations: {:.0} ms per window (3 middle frames, fwd+bwd), peak RSS {:.0} MiB",
        r.iters,
        r.s_per_window * 1e3,
        r.peak_rss_mib
    );
}
