//! The source stage: frames from a video file, a live camera or stream URL, an image folder or a
//! dataset folder, as one [`Frame`] type, with stride / start / max-frames / resize options.

use std::path::{Path, PathBuf};

use opencv::core::Mat;
use opencv::prelude::*;
use opencv::videoio::{self, VideoCapture};

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{check_frame_size, Frame, Intrinsics, RgbImage};
use streamrecon_datasets::formats::rgb::read_rgb;

use crate::calibration::Calibration;
use streamrecon_datasets::native::NativeDataset;

/// What a source string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `camera:N`
    Camera(i32),
    /// `rtsp://…`, `http://…`, `https://…`
    Url(String),
    VideoFile(PathBuf),
    ImageFolder(PathBuf),
    /// A folder in the native dataset layout (ground truth attached).
    Dataset(PathBuf),
    /// A benchmark layout (TUM RGB-D, a Sintel scene, Long3D, 7-Scenes) with whatever ground truth it has.
    Benchmark(PathBuf, BenchmarkKind),
    /// Frames pushed by a client of the service (made with [`Source::pushed`], never parsed).
    Pushed(String),
}

/// Benchmark layouts readable as a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchmarkKind {
    TumRgbd,
    /// A scene folder `…/training/<pass>/<scene>`.
    SintelScene,
    Long3d,
    SevenScenes,
}

fn detect_benchmark(p: &Path) -> Option<BenchmarkKind> {
    use streamrecon_datasets::layouts::{detect, Layout};
    match detect(p) {
        Some(Layout::Tum) => return Some(BenchmarkKind::TumRgbd),
        Some(Layout::Long3d) => return Some(BenchmarkKind::Long3d),
        _ => {}
    }
    let training = p.parent().and_then(Path::parent);
    if training
        .is_some_and(|t| t.file_name().is_some_and(|n| n == "training") && t.join("flow").is_dir())
    {
        return Some(BenchmarkKind::SintelScene);
    }
    let has_color = std::fs::read_dir(p)
        .ok()?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().ends_with(".color.png"));
    has_color.then_some(BenchmarkKind::SevenScenes)
}

impl SourceSpec {
    /// Interprets a source string.
    ///
    /// # Errors
    /// A bad camera index or a path that does not exist.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(idx) = s.strip_prefix("camera:") {
            return idx
                .parse()
                .map(Self::Camera)
                .map_err(|_| Error::source(s, "camera index must be a number, e.g. camera:0"));
        }
        if ["rtsp://", "rtsps://", "http://", "https://"]
            .iter()
            .any(|p| s.starts_with(p))
        {
            return Ok(Self::Url(s.to_string()));
        }
        let p = PathBuf::from(s);
        if p.is_dir() {
            if NativeDataset::detect(&p) {
                return Ok(Self::Dataset(p));
            }
            if let Some(kind) = detect_benchmark(&p) {
                return Ok(Self::Benchmark(p, kind));
            }
            return Ok(Self::ImageFolder(p));
        }
        if p.is_file() {
            return Ok(Self::VideoFile(p));
        }
        Err(Error::source(
            s,
            "no such file, folder, camera:N or stream URL",
        ))
    }

    /// Live sources drop frames when the pipeline falls behind; offline sources never do.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Camera(_) | Self::Url(_) | Self::Pushed(_))
    }
}

/// How to read a source.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Keep every k-th frame (0 or 1 = all).
    pub stride: usize,
    /// Skip this many source frames first.
    pub start: usize,
    pub max_frames: Option<usize>,
    /// Resize so the width is this many pixels, keeping the aspect ratio (height rounded to even).
    pub width: Option<u32>,
    /// Intrinsics at the original resolution, overriding what the source says.
    pub intrinsics: Option<(f64, f64, f64, f64)>,
    /// Read ground-truth depth from datasets (costs I/O).
    pub gt_depth: bool,
    /// An OpenCV calibration file: every frame is undistorted with it and takes its camera
    /// matrix as intrinsics.
    pub intrinsics_file: Option<PathBuf>,
}

/// What the source stage yields per step.
pub enum SourceItem {
    Frame(Box<Frame>),
    /// A frame that could not be decoded: skipped and counted.
    Skipped {
        what: String,
    },
}

/// Anything that produces raw frames.
trait RawSource: Send {
    /// `None` at the end of the stream.
    fn next_raw(&mut self) -> Option<Result<RawFrame>>;
    fn len_hint(&self) -> Option<usize>;
    fn fps(&self) -> Option<f64>;
}

struct RawFrame {
    image: RgbImage,
    /// When a pushed frame was uploaded.
    arrived: Option<std::time::Instant>,
    timestamp: Option<f64>,
    intrinsics: Option<Intrinsics>,
    gt: Option<streamrecon_core::frame::GroundTruth>,
}

/// A source opened from a [`SourceSpec`], applying [`SourceOptions`].
pub struct Source {
    spec: SourceSpec,
    name: String,
    raw: Box<dyn RawSource>,
    options: SourceOptions,
    /// Live, but never dropping frames.
    lossless: bool,
    raw_index: u64,
    emitted: u64,
    size: Option<(u32, u32)>,
    /// Intrinsics at the original resolution (after overrides), once known.
    intrinsics_original: Option<Intrinsics>,
    /// Whether the source itself supplied them.
    intrinsics_supplied: bool,
    /// Lens distortion taken out of every frame (`intrinsics_file`).
    calibration: Option<Calibration>,
    /// The upload time of the last frame, if it was pushed.
    last_arrived: Option<std::time::Instant>,
    done: bool,
}

impl Source {
    /// Opens a source.
    ///
    /// # Errors
    /// A file or folder that cannot be read, an empty folder or video, or a camera/URL that does not open.
    pub fn open(spec: &SourceSpec, options: SourceOptions) -> Result<Self> {
        let name = match spec {
            SourceSpec::Camera(i) => format!("camera:{i}"),
            SourceSpec::Url(u) | SourceSpec::Pushed(u) => u.clone(),
            SourceSpec::VideoFile(p)
            | SourceSpec::ImageFolder(p)
            | SourceSpec::Dataset(p)
            | SourceSpec::Benchmark(p, _) => p.display().to_string(),
        };
        let raw: Box<dyn RawSource> = match spec {
            SourceSpec::Camera(i) => Box::new(CaptureSource::open_camera(*i, &name)?),
            SourceSpec::Url(u) => Box::new(CaptureSource::open_file(u, &name)?),
            SourceSpec::VideoFile(p) => {
                Box::new(CaptureSource::open_file(&p.display().to_string(), &name)?)
            }
            SourceSpec::ImageFolder(p) => Box::new(FolderSource::open(p)?),
            SourceSpec::Dataset(p) => Box::new(DatasetSource::open(p, options.gt_depth)?),
            SourceSpec::Benchmark(p, kind) => {
                Box::new(BenchmarkSource::open(p, *kind, options.gt_depth)?)
            }
            SourceSpec::Pushed(n) => {
                return Err(Error::source(
                    n,
                    "pushed sources are made with Source::pushed",
                ))
            }
        };
        let calibration = options
            .intrinsics_file
            .as_deref()
            .map(Calibration::read)
            .transpose()?;
        let mut source = Self::with_raw(spec.clone(), name, raw, options);
        source.calibration = calibration;
        Ok(source)
    }

    fn with_raw(
        spec: SourceSpec,
        name: String,
        raw: Box<dyn RawSource>,
        options: SourceOptions,
    ) -> Self {
        Self {
            spec,
            name,
            raw,
            options,
            raw_index: 0,
            emitted: 0,
            size: None,
            intrinsics_original: None,
            intrinsics_supplied: false,
            calibration: None,
            last_arrived: None,
            done: false,
            lossless: false,
        }
    }

    /// Never drop this source's frames, even if it is live (a client pushing a recorded
    /// sequence waits for the pipeline instead).
    #[must_use]
    pub fn lossless(mut self) -> Self {
        self.lossless = true;
        self
    }

    /// A live source fed through a channel (the service's sessions); it ends when every sender
    /// is dropped.
    pub fn pushed(
        name: &str,
        rx: crossbeam_channel::Receiver<PushedFrame>,
        options: SourceOptions,
    ) -> Self {
        Self::with_raw(
            SourceSpec::Pushed(name.to_string()),
            name.to_string(),
            Box::new(PushedSource { rx }),
            options,
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Numbers the next frame `next` (a continued stream keeps its frame numbers).
    pub fn continue_at(&mut self, next: u64) {
        self.raw_index = next;
        self.emitted = next;
    }

    /// When the last frame was uploaded, if it was pushed.
    pub fn last_arrived(&self) -> Option<std::time::Instant> {
        self.last_arrived
    }

    /// Whether frames come from a client (not a file, camera or URL).
    pub fn is_pushed(&self) -> bool {
        matches!(self.spec, SourceSpec::Pushed(_))
    }

    pub fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    pub fn is_live(&self) -> bool {
        self.spec.is_live() && !self.lossless
    }

    /// Frames this source will yield, when known.
    pub fn len_hint(&self) -> Option<usize> {
        let n = self.raw.len_hint()?.saturating_sub(self.options.start);
        let stride = self.options.stride.max(1);
        let n = n.div_ceil(stride);
        Some(self.options.max_frames.map_or(n, |m| n.min(m)))
    }

    /// Where the intrinsics come from.
    pub fn intrinsics_origin(&self) -> &'static str {
        if self.calibration.is_some() {
            "calibration file (--intrinsics-file; frames undistorted)"
        } else if self.options.intrinsics.is_some() {
            "user (--intrinsics)"
        } else if matches!(
            self.spec,
            SourceSpec::Dataset(_) | SourceSpec::Benchmark(..)
        ) && self.intrinsics_supplied
        {
            "dataset"
        } else {
            "default 60° horizontal FoV"
        }
    }

    /// Intrinsics at the original resolution, known after the first frame.
    pub fn original_intrinsics(&self) -> Option<Intrinsics> {
        self.intrinsics_original
    }

    /// The next item, or `None` at the end of the stream.
    ///
    /// # Errors
    /// A frame whose size differs from the stream's first frame, or a source failure.
    pub fn next_item(&mut self) -> Option<Result<SourceItem>> {
        if self.done
            || self
                .options
                .max_frames
                .is_some_and(|m| self.emitted >= m as u64)
        {
            return None;
        }
        let stride = self.options.stride.max(1) as u64;
        loop {
            let raw = match self.raw.next_raw() {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(Error::Format { what, path })) => {
                    let idx = self.raw_index;
                    self.raw_index += 1;
                    if idx < self.options.start as u64
                        || !(idx - self.options.start as u64).is_multiple_of(stride)
                    {
                        continue;
                    }
                    return Some(Ok(SourceItem::Skipped {
                        what: format!("{what}: {}", path.display()),
                    }));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(r)) => r,
            };
            let idx = self.raw_index;
            self.raw_index += 1;
            if idx < self.options.start as u64
                || !(idx - self.options.start as u64).is_multiple_of(stride)
            {
                continue;
            }
            return Some(
                self.finish_frame(raw, idx)
                    .map(|f| SourceItem::Frame(Box::new(f))),
            );
        }
    }

    fn finish_frame(&mut self, mut raw: RawFrame, source_index: u64) -> Result<Frame> {
        self.last_arrived = raw.arrived;
        let (w0, h0) = raw.image.dimensions();
        check_frame_size(w0, h0).map_err(|why| {
            self.done = true;
            Error::source(&self.name, format!("frame {source_index}: {why}"))
        })?;
        match self.size {
            None => self.size = Some((w0, h0)),
            Some((w, h)) if (w, h) != (w0, h0) => {
                self.done = true;
                return Err(Error::source(
                    &self.name,
                    format!("frame {source_index} is {w0}x{h0} but the stream started at {w}x{h}"),
                ));
            }
            Some(_) => {}
        }
        if let Some(c) = &mut self.calibration {
            raw.image = c.undistort(&raw.image).inspect_err(|_| self.done = true)?;
            raw.intrinsics = Some(c.intrinsics(w0, h0));
        }
        let original = match self.options.intrinsics {
            Some((fx, fy, cx, cy)) => Some(Intrinsics {
                fx,
                fy,
                cx,
                cy,
                width: w0,
                height: h0,
            }),
            None => raw.intrinsics,
        };
        if self.intrinsics_original.is_none() {
            self.intrinsics_supplied = raw.intrinsics.is_some();
            self.intrinsics_original = Some(original.unwrap_or_else(|| {
                Intrinsics::from_hfov(w0, h0, streamrecon_core::frame::DEFAULT_HFOV_DEG)
            }));
        }
        let (image, intrinsics) = match self.options.width {
            Some(tw) if tw != w0 => {
                let th = (((f64::from(h0) * f64::from(tw) / f64::from(w0)) / 2.0).round() as u32
                    * 2)
                .max(2);
                let img = image::imageops::resize(
                    &raw.image,
                    tw,
                    th,
                    image::imageops::FilterType::Triangle,
                );
                (img, original.map(|k| k.scaled_to(tw, th)))
            }
            _ => (raw.image, original),
        };
        let fps = self.raw.fps().unwrap_or(30.0);
        let frame = Frame {
            index: self.emitted,
            source_index,
            timestamp: raw.timestamp.unwrap_or(source_index as f64 / fps),
            image,
            intrinsics,
            gt: raw.gt,
        };
        self.emitted += 1;
        Ok(frame)
    }
}

/// Converts an 8-bit BGR OpenCV matrix into an RGB image.
///
/// # Errors
/// A matrix that is not 8-bit with 1, 3 or 4 channels.
pub fn rgb_from_bgr_mat(m: &Mat) -> Result<RgbImage> {
    let (w, h) = (m.cols() as u32, m.rows() as u32);
    let ch = m.channels() as usize;
    if m.depth() != opencv::core::CV_8U || !matches!(ch, 1 | 3 | 4) {
        return Err(Error::Invalid(format!(
            "unsupported frame type {}",
            m.typ()
        )));
    }
    let m = if m.is_continuous() {
        m.clone()
    } else {
        m.try_clone()?
    };
    let bytes = m.data_bytes()?;
    let mut img = RgbImage::new(w, h);
    for (px, src) in img.pixels_mut().zip(bytes.chunks_exact(ch)) {
        *px = match ch {
            1 => image::Rgb([src[0], src[0], src[0]]),
            _ => image::Rgb([src[2], src[1], src[0]]),
        };
    }
    Ok(img)
}

/// OpenCV `VideoCapture`: video files, cameras and stream URLs.
struct CaptureSource {
    cap: VideoCapture,
    name: String,
    frames: Option<usize>,
    fps: Option<f64>,
    read: usize,
    failures_in_a_row: usize,
}

/// Consecutive unreadable frames after which a stream counts as ended.
const MAX_READ_FAILURES: usize = 3;

impl CaptureSource {
    fn open_file(path: &str, name: &str) -> Result<Self> {
        let cap = VideoCapture::from_file(path, videoio::CAP_ANY)?;
        Self::finish_open(cap, name)
    }

    fn open_camera(index: i32, name: &str) -> Result<Self> {
        let cap = VideoCapture::new(index, videoio::CAP_ANY)?;
        Self::finish_open(cap, name)
    }

    fn finish_open(cap: VideoCapture, name: &str) -> Result<Self> {
        if !cap.is_opened()? {
            return Err(Error::source(
                name,
                "cannot open (not a video, camera unavailable, or stream unreachable)",
            ));
        }
        // A stream whose frames are out of bounds is refused before the first is decoded.
        let (w, h) = (
            cap.get(videoio::CAP_PROP_FRAME_WIDTH).unwrap_or(0.0),
            cap.get(videoio::CAP_PROP_FRAME_HEIGHT).unwrap_or(0.0),
        );
        if w >= 1.0 && h >= 1.0 {
            check_frame_size(w as u32, h as u32).map_err(|why| Error::source(name, why))?;
        }
        let n = cap.get(videoio::CAP_PROP_FRAME_COUNT).unwrap_or(0.0);
        let fps = cap.get(videoio::CAP_PROP_FPS).unwrap_or(0.0);
        Ok(Self {
            cap,
            name: name.to_string(),
            frames: (n > 0.0).then_some(n as usize),
            fps: (fps > 0.0 && fps.is_finite()).then_some(fps),
            read: 0,
            failures_in_a_row: 0,
        })
    }
}

impl RawSource for CaptureSource {
    fn next_raw(&mut self) -> Option<Result<RawFrame>> {
        let mut m = Mat::default();
        let ok = match self.cap.read(&mut m) {
            Ok(ok) => ok,
            Err(e) => return Some(Err(e.into())),
        };
        if !ok || m.empty() {
            // Past the known frame count (or with none known) an unreadable frame is the end.
            if self.frames.is_none_or(|n| self.read + 1 >= n)
                || self.failures_in_a_row >= MAX_READ_FAILURES
            {
                if self.read == 0 {
                    return Some(Err(Error::source(&self.name, "no frame could be read")));
                }
                return None;
            }
            self.failures_in_a_row += 1;
            self.read += 1;
            return Some(Err(Error::format(
                &self.name,
                format!("undecodable frame {}", self.read - 1),
            )));
        }
        self.failures_in_a_row = 0;
        self.read += 1;
        let ts = self
            .cap
            .get(videoio::CAP_PROP_POS_MSEC)
            .ok()
            .filter(|t| *t > 0.0)
            .map(|t| t / 1000.0);
        Some(rgb_from_bgr_mat(&m).map(|image| RawFrame {
            arrived: None,
            image,
            timestamp: ts,
            intrinsics: None,
            gt: None,
        }))
    }

    fn len_hint(&self) -> Option<usize> {
        self.frames
    }

    fn fps(&self) -> Option<f64> {
        self.fps
    }
}

/// A folder of PNG/JPEG images, read in name order.
struct FolderSource {
    files: Vec<PathBuf>,
    next: usize,
}

impl FolderSource {
    fn open(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::source(
                dir.display().to_string(),
                "folder holds no .png/.jpg images",
            ));
        }
        Ok(Self { files, next: 0 })
    }
}

impl RawSource for FolderSource {
    fn next_raw(&mut self) -> Option<Result<RawFrame>> {
        let p = self.files.get(self.next)?.clone();
        self.next += 1;
        Some(read_rgb(&p).map(|image| RawFrame {
            arrived: None,
            image,
            timestamp: None,
            intrinsics: None,
            gt: None,
        }))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.files.len())
    }

    fn fps(&self) -> Option<f64> {
        None
    }
}

/// A native-layout dataset with ground truth.
struct DatasetSource {
    ds: NativeDataset,
    next: usize,
    with_depth: bool,
}

impl DatasetSource {
    fn open(dir: &Path, with_depth: bool) -> Result<Self> {
        let ds = NativeDataset::open(dir)?;
        if ds.is_empty() {
            return Err(Error::source(
                dir.display().to_string(),
                "dataset has no frames",
            ));
        }
        Ok(Self {
            ds,
            next: 0,
            with_depth,
        })
    }
}

impl RawSource for DatasetSource {
    fn next_raw(&mut self) -> Option<Result<RawFrame>> {
        if self.next >= self.ds.len() {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(self.ds.frame(i, self.with_depth).map(|f| RawFrame {
            arrived: None,
            image: f.image,
            timestamp: Some(f.timestamp),
            intrinsics: f.intrinsics,
            gt: f.gt,
        }))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.ds.len())
    }

    fn fps(&self) -> Option<f64> {
        self.ds.meta.as_ref().map(|m| m.fps)
    }
}

/// A benchmark layout read through [`streamrecon_datasets::layouts`].
struct BenchmarkSource {
    frames: Vec<streamrecon_datasets::layouts::LayoutFrame>,
    intrinsics: Option<Intrinsics>,
    next: usize,
    with_depth: bool,
    fps: f64,
}

impl BenchmarkSource {
    fn open(dir: &Path, kind: BenchmarkKind, with_depth: bool) -> Result<Self> {
        use streamrecon_datasets::layouts;
        let (frames, fps, calib_dir) = match kind {
            BenchmarkKind::TumRgbd => (layouts::read_tum_rgbd(dir)?, 30.0, dir.to_path_buf()),
            BenchmarkKind::Long3d => (layouts::read_long3d(dir)?.0, 10.0, dir.to_path_buf()),
            BenchmarkKind::SevenScenes => {
                (layouts::read_seven_scenes(dir)?, 30.0, dir.to_path_buf())
            }
            BenchmarkKind::SintelScene => {
                let scene = dir
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                let root = dir
                    .parent()
                    .and_then(Path::parent)
                    .and_then(Path::parent)
                    .unwrap_or(dir);
                (
                    layouts::read_sintel(root, &scene)?,
                    24.0,
                    root.to_path_buf(),
                )
            }
        };
        if frames.is_empty() {
            return Err(Error::source(
                dir.display().to_string(),
                "no frames in this layout",
            ));
        }
        // Our writers leave an intrinsics.json beside the layout; real datasets need --intrinsics.
        let ipath = calib_dir.join("intrinsics.json");
        let intrinsics = std::fs::read(&ipath)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self {
            frames,
            intrinsics,
            next: 0,
            with_depth,
            fps,
        })
    }
}

impl RawSource for BenchmarkSource {
    fn next_raw(&mut self) -> Option<Result<RawFrame>> {
        let f = self.frames.get(self.next)?.clone();
        self.next += 1;
        let image = match read_rgb(&f.rgb) {
            Ok(i) => i,
            Err(e) => return Some(Err(e)),
        };
        let depth = if self.with_depth {
            match &f.depth {
                Some((p, _)) if p.extension().is_some_and(|e| e == "dpt") => {
                    Some(streamrecon_datasets::layouts::read_dpt(p).map(|d| d.data))
                }
                Some((p, scale)) => Some(
                    streamrecon_datasets::formats::depth::read_depth_png(p, *scale).map(|d| d.data),
                ),
                None => None,
            }
        } else {
            None
        };
        let depth = match depth.transpose() {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(RawFrame {
            arrived: None,
            image,
            timestamp: Some(f.timestamp),
            intrinsics: self.intrinsics,
            gt: Some(streamrecon_core::frame::GroundTruth {
                world_from_cam: f.world_from_cam,
                depth,
                flow_fwd: None,
            }),
        }))
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.frames.len())
    }

    fn fps(&self) -> Option<f64> {
        Some(self.fps)
    }
}

/// A frame handed to a pushed source.
pub struct PushedFrame {
    pub image: RgbImage,
    /// When the frame was uploaded: its latency counts from here.
    pub arrived: std::time::Instant,
    /// Seconds; the arrival order when absent.
    pub timestamp: Option<f64>,
    pub intrinsics: Option<Intrinsics>,
}

struct PushedSource {
    rx: crossbeam_channel::Receiver<PushedFrame>,
}

impl RawSource for PushedSource {
    fn next_raw(&mut self) -> Option<Result<RawFrame>> {
        let f = self.rx.recv().ok()?;
        Some(Ok(RawFrame {
            arrived: Some(f.arrived),
            image: f.image,
            timestamp: f.timestamp,
            intrinsics: f.intrinsics,
            gt: None,
        }))
    }

    fn len_hint(&self) -> Option<usize> {
        None
    }

    fn fps(&self) -> Option<f64> {
        None
    }
}
