//! Everything rerun: opening the recording from the standard flags, entity paths, and logging.
//!
//! Conventions (rerun's own examples): `cam_from_world` logged with `ChildFromParent`, a `Pinhole`
//! with RDF axes under the camera, rgb/depth/flow images under it (the viewer back-projects the
//! depth), per-frame decimated points (never one ever-growing entity), plots, and two timelines:
//! `frame` (sequence) and `time` (seconds).

use std::path::PathBuf;

use opencv::core::{Mat, Vec3b, Vector};
use opencv::prelude::*;

use streamrecon_core::error::Result;
use streamrecon_core::frame::{Intrinsics, Pose, RgbImage};
use streamrecon_flow::colorwheel::{self, ChannelOrder};
use streamrecon_flow::FlowField;

/// Entity paths, fixed here and nowhere else.
pub mod paths {
    pub const CAMERA: &str = "world/camera";
    pub const RGB: &str = "world/camera/image/rgb";
    pub const DEPTH: &str = "world/camera/image/depth";
    pub const FLOW: &str = "world/camera/image/flow";
    pub const IMAGE: &str = "world/camera/image";
    pub const POINTS: &str = "world/points";
    /// The fused map, overwritten each time it is logged (the recording stays bounded).
    pub const MAP: &str = "world/map";
    pub const TRAJECTORY: &str = "world/trajectory";
    /// The trajectory after loop closure (logged at the end, beside the online one).
    pub const TRAJECTORY_CORRECTED: &str = "world/trajectory_corrected";
    pub const PLOT_FPS: &str = "plot/fps";
    pub const PLOT_LATENCY: &str = "plot/latency_ms";
    pub const PLOT_MEMORY: &str = "plot/memory_mb";
    pub const PLOT_TRACKED: &str = "plot/tracked_points";
    pub const PLOT_KV_TOKENS: &str = "plot/kv_tokens";
    pub const PLOT_KV_MIB: &str = "plot/kv_mib";
    pub const PLOT_MODEL_MS: &str = "plot/model_ms";
    pub const PLOT_NOVELTY: &str = "plot/novelty";
    pub const PLOT_ADMITTED: &str = "plot/admitted";
    pub const PLOT_STABILIZE_MM: &str = "plot/stabilize_correction_mm";
    pub const PLOT_STABILIZE_DEG: &str = "plot/stabilize_correction_deg";
}

/// Timeline names.
pub const TIMELINE_FRAME: &str = "frame";
pub const TIMELINE_TIME: &str = "time";

/// How long the start of `bytes`, a piece of an .rrd file from `at_start` on, is when cut at
/// the end of its last whole message: where a recording still being written may be cut and
/// stored, the rest to follow. `.rrd` framing (rerun's re_log_encoding, stable since 0.23): a
/// 12-byte stream header (`RRF2`, version, options), then messages, each a 16-byte header
/// (kind, payload length; u64 little-endian) and its payload. The stream footer after the end
/// message is not a message and is not counted (the recording reads without it).
pub fn rrd_whole_len(bytes: &[u8], at_start: u64) -> usize {
    const STREAM_HEADER: usize = 12;
    const MESSAGE_HEADER: usize = 16;
    // Kinds: end, store info, arrow data, blueprint activation.
    const KINDS: u64 = 4;
    let mut at = 0;
    if at_start == 0 {
        if bytes.len() < STREAM_HEADER || &bytes[..4] != b"RRF2" {
            return 0;
        }
        at = STREAM_HEADER;
    }
    while let Some(header) = bytes.get(at..at + MESSAGE_HEADER) {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let (kind, len) = (word(0), word(8));
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| (at + MESSAGE_HEADER).checked_add(l));
        match end {
            Some(end) if kind < KINDS && end <= bytes.len() => at = end,
            _ => break,
        }
    }
    at
}

/// Where the recording goes (rerun's standard flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RerunTarget {
    /// `--save FILE.rrd`
    pub save: Option<PathBuf>,
    /// `--spawn`: start a viewer process (needs `rerun` on PATH and a display).
    pub spawn: bool,
    /// `--connect [URL]`: a running viewer, e.g. `rerun+http://127.0.0.1:9876/proxy`.
    pub connect: Option<String>,
    /// `--serve`: serve the recording over gRPC on `bind` for viewers to connect to.
    pub serve: Option<String>,
    /// `--map-every N`: the fused map is logged (`world/map`, replacing the last) every N frames;
    /// 0 = only at the end [default: [`MAP_EVERY`]].
    pub map_every: Option<u64>,
    /// `--map-points N`: most points of the logged map (evenly decimated) [default:
    /// [`MAP_POINTS`]].
    pub map_points: Option<usize>,
    /// The recording's id (rerun's default: a new one each run). Recordings with one id are
    /// one recording in the viewer: the service gives a session's parts its id.
    pub recording_id: Option<String>,
}

/// Frames between two logs of the fused map.
pub const MAP_EVERY: u64 = 100;
/// Most points of the logged map: the viewer stays smooth, the recording bounded.
pub const MAP_POINTS: usize = 200_000;

impl RerunTarget {
    pub fn is_enabled(&self) -> bool {
        self.save.is_some() || self.spawn || self.connect.is_some() || self.serve.is_some()
    }
}

/// What the sinks get per processed frame.
pub struct FrameLog<'a> {
    pub index: u64,
    pub timestamp: f64,
    /// `None` for a frame the engine could not place.
    pub cam_from_world: Option<Pose>,
    pub intrinsics: &'a Intrinsics,
    pub images: &'a ViewImages,
    /// Depth in millimetres, 0 = unknown (`datasets::formats::depth::depth_millimetres`).
    pub depth_mm: Option<&'a [u16]>,
    pub points: &'a [[f32; 3]],
    pub colors: &'a [[u8; 3]],
}

/// A frame's images as the viewer gets them, JPEG-encoded.
///
/// Raw, a 640×480 frame and its flow image were 1.8 MB a frame: the recording grew by 1.4 MB a
/// frame after rerun's LZ4, and compressing, copying and writing that took 13–17 % of the
/// pipeline's CPU (perf, pipeline bench). JPEG at quality 90 (OpenCV's libjpeg-turbo) takes
/// about 1 ms an image and gives 50–90 kB; the `image` crate's encoder took 9 ms.
pub struct ViewImages {
    pub rgb: Vec<u8>,
    /// The colour-coded flow (Middlebury wheel).
    pub flow: Option<Vec<u8>>,
}

/// JPEG quality of the viewer's images.
const JPEG_QUALITY: i32 = 90;

impl ViewImages {
    /// Encodes a frame and, if given, its colour-coded flow.
    ///
    /// # Errors
    /// OpenCV cannot encode (an empty image).
    pub fn encode(image: &RgbImage, flow: Option<&FlowField>) -> Result<Self> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut bgr = vec![0; image.as_raw().len()];
        for (d, s) in bgr.chunks_exact_mut(3).zip(image.as_raw().chunks_exact(3)) {
            (d[0], d[1], d[2]) = (s[2], s[1], s[0]);
        }
        let rgb = jpeg_from_bgr(&bgr, w, h)?;
        let flow = match flow {
            Some(f) => {
                colorwheel::flow_to_bytes(f, None, ChannelOrder::Bgr, &mut bgr);
                Some(jpeg_from_bgr(&bgr, f.width, f.height)?)
            }
            None => None,
        };
        Ok(Self { rgb, flow })
    }
}

/// JPEG bytes of a `w` × `h` BGR image (OpenCV's order).
fn jpeg_from_bgr(bgr: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let m = Mat::new_rows_cols_with_bytes::<Vec3b>(h as i32, w as i32, bgr)?;
    let mut out = Vector::<u8>::new();
    let params = Vector::from_slice(&[opencv::imgcodecs::IMWRITE_JPEG_QUALITY, JPEG_QUALITY]);
    opencv::imgcodecs::imencode(".jpg", &m, &mut out, &params)?;
    Ok(out.to_vec())
}

#[cfg(feature = "rerun")]
mod recording;
#[cfg(feature = "rerun")]
pub use recording::{open, Viewer};

#[cfg(not(feature = "rerun"))]
mod no_recording;
#[cfg(not(feature = "rerun"))]
pub use no_recording::{open, Viewer};

/// The service's web page (`streamrecon serve`, `GET /`): sessions and webcam capture.
pub const WEB_PAGE: &str = include_str!("web/index.html");

/// A file of rerun's web viewer by the name a browser asks for under the viewer's folder
/// (`""` or `index.html`, `re_viewer.js`, `re_viewer_bg.wasm`, …): its content type and bytes,
/// as the pinned rerun release bundles them, so the viewer works offline and matches the
/// recordings' version. `None` for any other name, and in a build without rerun.
pub fn web_viewer_file(name: &str) -> Option<(&'static str, &'static [u8])> {
    #[cfg(feature = "rerun")]
    {
        use re_web_viewer_server::WebViewerData;
        static DATA: std::sync::OnceLock<Option<WebViewerData>> = std::sync::OnceLock::new();
        let data = DATA
            .get_or_init(|| WebViewerData::load(None).ok())
            .as_ref()?;
        Some(match name {
            "" | "index.html" => ("text/html; charset=utf-8", data.index_html()),
            "favicon.ico" => ("image/x-icon", data.favicon()),
            "apple-touch-icon.png" => ("image/png", data.apple_touch_icon()),
            "sw.js" => ("text/javascript", data.sw_js()),
            "re_viewer.js" => ("text/javascript", data.viewer_js()),
            "re_viewer_bg.wasm" => ("application/wasm", data.viewer_wasm()),
            "signed-in" => ("text/html; charset=utf-8", data.signed_in_html()),
            "signed-out" => ("text/html; charset=utf-8", data.signed_out_html()),
            _ => return None,
        })
    }
    #[cfg(not(feature = "rerun"))]
    {
        let _ = name;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{rrd_whole_len, ViewImages};
    use streamrecon_flow::FlowField;

    #[test]
    fn a_recording_is_cut_after_its_last_whole_message() {
        let message = |kind: u64, payload: &[u8]| {
            let mut m = kind.to_le_bytes().to_vec();
            m.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            m.extend_from_slice(payload);
            m
        };
        let mut rrd = b"RRF2\0\x24\0\0\x01\x02\0\0".to_vec();
        let first = message(1, b"store info");
        let second = message(2, &[7; 100]);
        rrd.extend_from_slice(&first);
        rrd.extend_from_slice(&second);
        let whole = rrd.len();
        rrd.extend_from_slice(&message(2, &[9; 50])[..30]);
        assert_eq!(rrd_whole_len(&rrd, 0), whole);
        // Every cut of the file ends at a message boundary at or before it.
        let boundaries = [12, 12 + first.len(), whole];
        for n in 0..rrd.len() {
            let got = rrd_whole_len(&rrd[..n], 0);
            let expect = boundaries
                .iter()
                .rev()
                .find(|&&b| b <= n)
                .copied()
                .unwrap_or(0);
            assert_eq!(got, expect, "cut at {n}");
        }
        // A piece from a message's start on; a stream footer after the end message is left.
        let piece = &rrd[12 + first.len()..];
        assert_eq!(rrd_whole_len(piece, 12), second.len());
        let mut ended = message(0, b"footer");
        let end_len = ended.len();
        // The stream footer: where the footer message is (offset, length, checksum), then
        // `RRF2FOOT` and the number of footers.
        ended.extend_from_slice(&1_000u64.to_le_bytes());
        ended.extend_from_slice(&6u64.to_le_bytes());
        ended.extend_from_slice(&[0; 4]);
        ended.extend_from_slice(b"RRF2FOOT\x01\0\0\0");
        assert_eq!(rrd_whole_len(&ended, 100), end_len);
        // Not a recording, or a length past any file.
        assert_eq!(rrd_whole_len(b"not an rrd file at all", 0), 0);
        assert_eq!(rrd_whole_len(&message(2, b"x")[..16], 1), 0);
        let mut huge = 2u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(rrd_whole_len(&huge, 1), 0);
    }

    #[test]
    fn viewer_images_are_jpeg_in_rgb_order() {
        // Left half red, right half blue: a channel swap would show at once.
        let image = streamrecon_core::frame::RgbImage::from_fn(64, 48, |x, _| {
            if x < 32 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let flow = FlowField::zeros(64, 48);
        let v = ViewImages::encode(&image, Some(&flow)).unwrap();
        let rgb = image::load_from_memory_with_format(&v.rgb, image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8();
        assert_eq!(rgb.dimensions(), (64, 48));
        let (left, right) = (rgb.get_pixel(8, 24).0, rgb.get_pixel(56, 24).0);
        assert!(left[0] > 230 && left[2] < 25, "{left:?}");
        assert!(right[2] > 230 && right[0] < 25, "{right:?}");
        // Zero flow is white on the wheel.
        let flow = image::load_from_memory_with_format(&v.flow.unwrap(), image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8();
        assert_eq!(flow.dimensions(), (64, 48));
        assert!(flow.pixels().all(|p| p.0.iter().all(|&c| c > 240)));
    }
}
