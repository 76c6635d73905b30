//! The `dis` engine against plain two-frame OpenCV DIS on real image pairs with ground truth
//! that ship in packages:
//! - scikit-image's Middlebury "motorcycle" stereo pair (`skimage/data/motorcycle_*`), read as a
//!   two-frame flow: u = −disparity, v = 0, scored where the disparity is finite;
//! - OpenCV's `graf1.png` → `graf3.png` with the true homography `H1to3p.xml` (opencv-doc): every
//!   pixel's flow is known, a large viewpoint change; scored where it lands inside the image;
//! - OpenCV's Middlebury "Aloe" stereo pair with `aloeGT.png` (disparity in pixels, 0 = unknown).
//!
//! Per pair and preset: EPE and ms of plain OpenCV DIS (forward, its own threads), and of the
//! engine on the two frames (forward flow of the pair; the engine also makes the backward one
//! and their confidence), with its default refinement and without it. Then the times per pair of
//! a video stream in its steady state (opencv-doc's `vtest.avi`), where the engine prepares each
//! frame once for its two pairs and plain DIS keeps its instances. Pairs whose files are
//! missing are skipped with a message (`apt install opencv-doc`, `pip install scikit-image`;
//! `SKIMAGE_DATA` names scikit-image's data folder when `python3` cannot find it).
//!
//! `cargo bench --bench flow_real [-- ROUNDS]` (default 5; times are medians over the rounds, each
//! round running every method once, back to back).

use std::path::{Path, PathBuf};
use std::time::Instant;

use opencv::core::{FileStorage, FileStorage_READ, Mat};
use opencv::prelude::*;
use streamrecon::flow::dis::{DisConfig, DisEngine, DisPreset};
use streamrecon::flow::metrics::FlowMetricsAcc;
use streamrecon::flow::{FlowEngine, FlowField};
use streamrecon::frame::Frame;
use streamrecon::source::{Source, SourceItem, SourceOptions, SourceSpec};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const OPENCV_DATA: &str = "/usr/share/doc/opencv-doc/examples/data";

/// A real pair and its ground-truth flow (`valid`: where it is known).
struct Pair {
    name: &'static str,
    a: image::RgbImage,
    b: image::RgbImage,
    gt: FlowField,
    valid: Vec<bool>,
}

fn read(path: &Path) -> Option<image::RgbImage> {
    match image::open(path) {
        Ok(i) => Some(i.into_rgb8()),
        Err(e) => {
            println!("skipped: {} ({e})", path.display());
            None
        }
    }
}

/// Flow `(−d, 0)` from a disparity map (`d` not finite or ≤ 0: unknown).
fn from_disparity(name: &'static str, a: image::RgbImage, b: image::RgbImage, d: &[f32]) -> Pair {
    let (w, h) = (a.width() as usize, a.height() as usize);
    let mut gt = FlowField::zeros(w, h);
    let mut valid = vec![false; w * h];
    for (i, &v) in d.iter().enumerate() {
        if v.is_finite() && v > 0.0 {
            gt.data[2 * i] = -v;
            valid[i] = true;
        }
    }
    Pair {
        name,
        a,
        b,
        gt,
        valid,
    }
}

fn skimage_data() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("SKIMAGE_DATA") {
        return Some(PathBuf::from(d));
    }
    let o = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data'))",
        ])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

fn motorcycle() -> Option<Pair> {
    let Some(dir) = skimage_data() else {
        println!("skipped: motorcycle (no scikit-image: set SKIMAGE_DATA)");
        return None;
    };
    let a = read(&dir.join("motorcycle_left.png"))?;
    let b = read(&dir.join("motorcycle_right.png"))?;
    let mut npz = npyz::npz::NpzArchive::open(dir.join("motorcycle_disp.npz")).ok()?;
    let d: Vec<f32> = npz.by_name("arr_0").ok()??.into_vec().ok()?;
    Some(from_disparity("motorcycle (Middlebury)", a, b, &d))
}

fn aloe() -> Option<Pair> {
    let dir = Path::new(OPENCV_DATA);
    let a = read(&dir.join("aloeL.jpg"))?;
    let b = read(&dir.join("aloeR.jpg"))?;
    let gt = image::open(dir.join("aloeGT.png")).ok()?.into_luma8();
    let d: Vec<f32> = gt.as_raw().iter().map(|&v| f32::from(v)).collect();
    Some(from_disparity("aloe (Middlebury)", a, b, &d))
}

fn graf() -> Option<Pair> {
    let dir = Path::new(OPENCV_DATA);
    let a = read(&dir.join("graf1.png"))?;
    let b = read(&dir.join("graf3.png"))?;
    let fs = FileStorage::new_def(dir.join("H1to3p.xml").to_str()?, FileStorage_READ).ok()?;
    let m: Mat = fs.get("H13").ok()?.mat().ok()?;
    let h: Vec<f64> = (0..9)
        .map(|i| m.at_2d::<f64>(i / 3, i % 3).copied())
        .collect::<Result<_, _>>()
        .ok()?;
    let (w, hh) = (a.width() as usize, a.height() as usize);
    let mut gt = FlowField::zeros(w, hh);
    let mut valid = vec![false; w * hh];
    for y in 0..hh {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let s = h[6] * xf + h[7] * yf + h[8];
            let u = (h[0] * xf + h[1] * yf + h[2]) / s;
            let v = (h[3] * xf + h[4] * yf + h[5]) / s;
            let i = y * w + x;
            gt.data[2 * i] = (u - xf) as f32;
            gt.data[2 * i + 1] = (v - yf) as f32;
            valid[i] = u >= 0.0 && v >= 0.0 && u <= (w - 1) as f64 && v <= (hh - 1) as f64;
        }
    }
    Some(Pair {
        name: "graf 1→3 (homography)",
        a,
        b,
        gt,
        valid,
    })
}

fn epe(p: &Pair, f: &FlowField) -> f64 {
    let mut acc = FlowMetricsAcc::default();
    acc.add(&p.gt, f, Some(&p.valid), None).expect("metrics");
    acc.finish().epe
}

fn opencv_preset(preset: DisPreset) -> i32 {
    match preset {
        DisPreset::Ultrafast => opencv::video::DISOpticalFlow_PRESET_ULTRAFAST,
        DisPreset::Fast => opencv::video::DISOpticalFlow_PRESET_FAST,
        DisPreset::Medium => opencv::video::DISOpticalFlow_PRESET_MEDIUM,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Plain OpenCV DIS a → b on two of OpenCV's threads, grey conversion included, once, into a
/// fresh output (DIS starts from a flow of the right size it is handed): (EPE, ms).
fn plain(p: &Pair, preset: DisPreset) -> (f64, f64) {
    opencv::core::set_num_threads(2).expect("threads");
    let mut dis = opencv::video::DISOpticalFlow::create(opencv_preset(preset)).expect("DIS");
    let mut flow = Mat::default();
    let t = Instant::now();
    let a = streamrecon::flow::dis::grey_mat(&p.a).expect("grey");
    let b = streamrecon::flow::dis::grey_mat(&p.b).expect("grey");
    dis.calc(&a, &b, &mut flow).expect("calc");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let f = streamrecon::flow::dis::flow_from_mat(&flow).expect("flow");
    (epe(p, &f), ms)
}

/// Plain OpenCV DIS in both directions, each on its own core (what the engine outputs), once: ms.
fn plain_both(p: &Pair, preset: DisPreset) -> f64 {
    opencv::core::set_num_threads(1).expect("threads");
    let mk = || opencv::video::DISOpticalFlow::create(opencv_preset(preset)).expect("DIS");
    let (mut f, mut b) = (mk(), mk());
    let (mut ff, mut bf) = (Mat::default(), Mat::default());
    let t = Instant::now();
    let ga = streamrecon::flow::dis::grey_mat(&p.a).expect("grey");
    let gb = streamrecon::flow::dis::grey_mat(&p.b).expect("grey");
    rayon::join(
        || f.calc(&ga, &gb, &mut ff).expect("calc"),
        || b.calc(&gb, &ga, &mut bf).expect("calc"),
    );
    t.elapsed().as_secs_f64() * 1e3
}

fn frame(i: u64, img: &image::RgbImage) -> Frame {
    Frame {
        index: i,
        source_index: i,
        timestamp: i as f64 / 30.0,
        image: img.clone(),
        intrinsics: None,
        gt: None,
    }
}

/// The engine on the two frames, once: (EPE of the forward flow, ms for the pair, both
/// directions).
fn engine(p: &Pair, config: &DisConfig) -> (f64, f64) {
    opencv::core::set_num_threads(1).expect("threads");
    let mut e = DisEngine::new(config.clone()).expect("engine");
    let (fa, fb) = (frame(0, &p.a), frame(1, &p.b));
    let t = Instant::now();
    let mut pairs = e.push(&fa).expect("push");
    pairs.extend(e.push(&fb).expect("push"));
    pairs.extend(e.flush().expect("flush"));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let pair = pairs.iter().find(|q| q.from == 0).expect("the pair's flow");
    (epe(p, &pair.fwd), ms)
}

/// The first `n` frames of opencv-doc's `vtest.avi` (a fixed camera, people walking, 768×576),
/// read by the run's own source, or `None` with a message.
fn video(n: usize) -> Option<Vec<Frame>> {
    let path = Path::new(OPENCV_DATA).join("vtest.avi");
    let options = SourceOptions {
        max_frames: Some(n),
        ..SourceOptions::default()
    };
    let source = SourceSpec::parse(path.to_str()?).and_then(|spec| Source::open(&spec, options));
    let mut source = match source {
        Ok(s) => s,
        Err(e) => {
            println!("skipped: the stream ({e})");
            return None;
        }
    };
    let mut frames = Vec::with_capacity(n);
    while let Some(item) = source.next_item() {
        if let Ok(SourceItem::Frame(f)) = item {
            frames.push(*f);
        }
    }
    if frames.len() < n {
        println!(
            "skipped: the stream ({} gave fewer than {n} frames)",
            path.display()
        );
        return None;
    }
    Some(frames)
}

/// Per pair of a video stream, steady state: ms of plain OpenCV DIS in both directions (a core
/// each, its instances and the previous frame's grey image kept from pair to pair, as a program
/// calling it on a video would), of the engine, and of the engine without refinement. The three
/// advance in lockstep, a frame each in turn; the first `WARM` pairs are not counted. Returns
/// the medians of the times and of each pair's two ratios to plain DIS.
fn stream(frames: &[Frame], preset: DisPreset) -> [f64; 5] {
    const WARM: usize = 3;
    let config = DisConfig {
        preset,
        ..DisConfig::default()
    };
    let mut engine = DisEngine::new(config.clone()).expect("engine");
    let mut bare = DisEngine::new(DisConfig {
        refine_iterations: 0,
        ..config
    })
    .expect("engine");
    opencv::core::set_num_threads(1).expect("threads");
    let mk = || opencv::video::DISOpticalFlow::create(opencv_preset(preset)).expect("DIS");
    let (mut f, mut b) = (mk(), mk());
    let mut prev: Option<Mat> = None;
    let (mut pt, mut et, mut bt, mut er, mut br) = (vec![], vec![], vec![], vec![], vec![]);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for (i, fr) in frames.iter().enumerate() {
        let t = Instant::now();
        let grey = streamrecon::flow::dis::grey_mat(&fr.image).expect("grey");
        if let Some(p) = &prev {
            let (mut ff, mut bf) = (Mat::default(), Mat::default());
            rayon::join(
                || f.calc(p, &grey, &mut ff).expect("calc"),
                || b.calc(&grey, p, &mut bf).expect("calc"),
            );
        }
        let plain = ms(t);
        prev = Some(grey);
        let t = Instant::now();
        engine.push(fr).expect("push");
        let e = ms(t);
        let t = Instant::now();
        bare.push(fr).expect("push");
        let bb = ms(t);
        if i > WARM {
            pt.push(plain);
            et.push(e);
            bt.push(bb);
            er.push(e / plain);
            br.push(bb / plain);
        }
    }
    [median(pt), median(et), median(bt), median(er), median(br)]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let pairs: Vec<Pair> = [motorcycle(), graf(), aloe()]
        .into_iter()
        .flatten()
        .collect();
    println!(
        "EPE of the forward flow; times: plain DIS forward on OpenCV's 2 threads, plain DIS both \
         directions on a core each (what the engine outputs), the engine (both directions, \
         confidence); medians of {rounds} rounds, the time ratios medians of each round's"
    );
    println!("| pair | preset | plain DIS EPE | ms fwd / fwd+bwd | engine EPE | ms | vs plain | `--flow-refine 0` EPE | ms | vs plain |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for p in &pairs {
        for preset in [DisPreset::Ultrafast, DisPreset::Fast, DisPreset::Medium] {
            let config = DisConfig {
                preset,
                ..DisConfig::default()
            };
            let bare = DisConfig {
                refine_iterations: 0,
                ..config.clone()
            };
            // One of each per round, back to back, so that a busy moment of this shared host
            // weighs on all of them alike; the ratios are medians of each round's.
            let (mut pt, mut pbt, mut et, mut bt) = (vec![], vec![], vec![], vec![]);
            let (mut e_ratio, mut b_ratio) = (vec![], vec![]);
            let (mut pe, mut ee, mut be) = (0.0, 0.0, 0.0);
            for _ in 0..rounds {
                let t;
                (pe, t) = plain(p, preset);
                pt.push(t);
                let both = plain_both(p, preset);
                pbt.push(both);
                let t;
                (ee, t) = engine(p, &config);
                et.push(t);
                e_ratio.push(t / both);
                let t;
                (be, t) = engine(p, &bare);
                bt.push(t);
                b_ratio.push(t / both);
            }
            println!(
                "| {} {}x{} | {preset:?} | {pe:.3} | {:.1} / {:.1} | {ee:.3} | {:.1} | {:.2}× EPE, {:.2}× time | {be:.3} | {:.1} | {:.2}× EPE, {:.2}× time |",
                p.name,
                p.a.width(),
                p.a.height(),
                median(pt),
                median(pbt),
                median(et),
                ee / pe,
                median(e_ratio),
                median(bt),
                be / pe,
                median(b_ratio)
            );
        }
    }
    let Some(frames) = video(STREAM_FRAMES) else {
        return;
    };
    println!();
    println!(
        "A video stream, opencv-doc's vtest.avi ({}x{}, {STREAM_FRAMES} frames): ms a pair in the \
         steady state, both directions, medians; the ratios medians of each pair's",
        frames[0].width(),
        frames[0].height()
    );
    println!("| preset | plain DIS | engine | vs plain | `--flow-refine 0` | vs plain |");
    println!("|---|---|---|---|---|---|");
    for preset in [DisPreset::Ultrafast, DisPreset::Fast, DisPreset::Medium] {
        let [p, e, b, er, br] = stream(&frames, preset);
        println!("| {preset:?} | {p:.1} | {e:.1} | {er:.2}× | {b:.1} | {br:.2}× |");
    }
}

/// Frames of the stream timed after the pairs.
const STREAM_FRAMES: usize = 40;
