//! Speed and memory of the `streamflow` model (StreamFlow, T = 4) on the CPU, beside VideoFlow-MOF
//! per frame pair: the tiny fixture config (131×139, the fixture's weights), and the released
//! full-size configs on a 256×448 input (random weights): StreamFlow's window of 4 frames (3 new
//! forward flows; the engine adds a reversed pass for the backward ones) and VideoFlow's window
//! of 5 (2 new pairs, both directions, at its default 32 iterations). Each case runs in its own
//! process so its peak RSS is its own.
//!
//! `cargo bench --bench streamflow [-- WINDOWS]` (default 2 windows per case; the first is warm-up
//! when more than one is run).
//!
//! Against the PyTorch reference on the same CPU: `benches/REFERENCE.md` (procedure and last
//! figures); `streamrecon model bench streamflow` is the tool.

use std::path::Path;
use std::process::Command;

use candle_core::DType;
use streamrecon::models::bench::{bench_flow_window, videoflow_window, FlowWindowBench};
use streamrecon::models::streamflow::{StreamFlow, StreamFlowConfig};
use streamrecon::models::videoflow::{MofNet, VideoFlowConfig};
use streamrecon::models::weights::Weights;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let windows: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(2);
    if let Some(case) = args.iter().find_map(|a| a.strip_prefix("--case=")) {
        run_case(case, windows);
        return;
    }
    println!("flow models, CPU, {} threads", rayon::current_num_threads());
    let exe = std::env::current_exe().expect("bench executable");
    for case in ["tiny", "full", "videoflow-full"] {
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
    let (h, w) = if case == "tiny" {
        (131, 139)
    } else {
        (256, 448)
    };
    let r: FlowWindowBench = if case == "videoflow-full" {
        let net = MofNet::new(
            &Weights::random(0, DType::F32),
            VideoFlowConfig::mof_released(),
        )
        .expect("full VideoFlow");
        let frames = videoflow_window(5, h, w).expect("frames");
        bench_flow_window(
            &|x| net.forward(x, None),
            &frames,
            net.config.mof.decoder_depth,
            2,
            windows,
            &mut |_, _| {},
        )
        .expect("forward")
    } else {
        let net = if case == "tiny" {
            let fixture =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/streamflow-tiny");
            let cfg =
                StreamFlowConfig::from_json_file(&fixture.join("config.json")).expect("config");
            StreamFlow::load(&fixture.join("model.safetensors"), cfg).expect("weights")
        } else {
            StreamFlow::new(
                &Weights::random(0, DType::F32),
                StreamFlowConfig::released(),
            )
            .expect("full StreamFlow")
        };
        let t = net.frames();
        let frames = videoflow_window(t, h, w).expect("frames");
        bench_flow_window(
            &|x| net.forward(x, None),
            &frames,
            net.config.args.iters,
            t - 1,
            windows,
            &mut |_, _| {},
        )
        .expect("forward")
    };
    println!(
        "{case:<14} {}×{w}×{h}, {} iterations: {:.0} ms per window, {:.0} ms per new pair \
         ({} a window), peak RSS {:.0} MiB",
        r.frames,
        r.iters,
        r.s_per_window * 1e3,
        r.s_per_pair * 1e3,
        r.new_pairs,
        r.peak_rss_mib
    );
}
