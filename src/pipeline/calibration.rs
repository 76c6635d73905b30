//! A camera calibration with lens distortion, read from OpenCV's calibration files (the YAML or
//! XML `calibrate_camera` and `stereo_calib` write), and the undistortion every frame goes through
//! before flow and geometry: one map made at the first frame, then a bilinear remap per frame.

use std::path::{Path, PathBuf};

use opencv::calib3d::init_undistort_rectify_map;
use opencv::core::{FileStorage, FileStorage_READ, Mat, Size, CV_32FC1, CV_8UC3};
use opencv::imgproc::{remap, INTER_LINEAR};
use opencv::prelude::*;

use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::{Intrinsics, RgbImage};

/// Names a calibration file may give the camera matrix and the distortion coefficients under
/// (OpenCV's calibration sample, its stereo sample's first camera, common short forms).
const MATRIX_KEYS: [&str; 4] = ["camera_matrix", "M1", "K", "cameraMatrix"];
const DISTORTION_KEYS: [&str; 5] = [
    "distortion_coefficients",
    "D1",
    "D",
    "dist_coeffs",
    "distCoeffs",
];

/// A pinhole camera matrix with OpenCV's distortion model, and the undistortion maps once made.
#[derive(Debug)]
pub struct Calibration {
    path: PathBuf,
    /// 3×3, f64.
    matrix: Mat,
    /// fx, fy, cx, cy of `matrix`.
    pinhole: [f64; 4],
    /// 1×N, f64 (k1, k2, p1, p2[, k3[, k4, k5, k6 …]]).
    distortion: Mat,
    /// The image size the calibration was made at, when the file says.
    size: Option<(u32, u32)>,
    maps: Option<(Mat, Mat, (u32, u32))>,
}

impl Calibration {
    /// Reads a calibration file.
    ///
    /// # Errors
    /// A file that cannot be read, or one without a 3×3 camera matrix and distortion
    /// coefficients under any of the names OpenCV's samples use.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::format(path, what);
        let name = path
            .to_str()
            .ok_or_else(|| bad("the path is not UTF-8".into()))?;
        if !path.is_file() {
            return Err(bad("no such calibration file".into()));
        }
        let fs = FileStorage::new_def(name, FileStorage_READ)
            .map_err(|e| bad(format!("not an OpenCV calibration file: {e}")))?;
        let find = |keys: &[&str]| -> Option<Mat> {
            keys.iter().find_map(|k| {
                let node = fs.get(k).ok()?;
                if node.empty().unwrap_or(true) {
                    return None;
                }
                node.mat().ok().filter(|m| !m.empty())
            })
        };
        let to_f64 = |m: Mat| -> Result<Mat> {
            let mut out = Mat::default();
            m.convert_to_def(&mut out, opencv::core::CV_64F)?;
            Ok(out)
        };
        let matrix = find(&MATRIX_KEYS)
            .ok_or_else(|| bad(format!("no camera matrix ({})", MATRIX_KEYS.join(", "))))?;
        if matrix.rows() != 3 || matrix.cols() != 3 {
            return Err(bad(format!(
                "the camera matrix is {}x{}, not 3x3",
                matrix.rows(),
                matrix.cols()
            )));
        }
        let distortion = find(&DISTORTION_KEYS).ok_or_else(|| {
            bad(format!(
                "no distortion coefficients ({})",
                DISTORTION_KEYS.join(", ")
            ))
        })?;
        let n = distortion.total();
        if ![4, 5, 8, 12, 14].contains(&n) {
            return Err(bad(format!(
                "{n} distortion coefficients (4, 5, 8, 12 or 14)"
            )));
        }
        let distortion = to_f64(distortion.reshape(1, 1)?.try_clone()?)?;
        let matrix = to_f64(matrix)?;
        let values = matrix.data_typed::<f64>()?.to_vec();
        if !(values.iter().all(|v| v.is_finite()) && values[0] > 0.0 && values[4] > 0.0) {
            return Err(bad(
                "the camera matrix needs finite values and positive focal lengths".into(),
            ));
        }
        let dim = |k: &str| {
            fs.get(k)
                .ok()
                .and_then(|n| n.to_i32().ok())
                .filter(|&v| v > 0)
        };
        let size = match (dim("image_width"), dim("image_height")) {
            (Some(w), Some(h)) => Some((w as u32, h as u32)),
            _ => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            // OpenCV's pixel centres sit at integers, as ours do.
            pinhole: [values[0], values[4], values[2], values[5]],
            matrix,
            distortion,
            size,
            maps: None,
        })
    }

    /// The pinhole intrinsics of the undistorted frames (the calibration's camera matrix).
    pub fn intrinsics(&self, width: u32, height: u32) -> Intrinsics {
        let [fx, fy, cx, cy] = self.pinhole;
        Intrinsics {
            fx,
            fy,
            cx,
            cy,
            width,
            height,
        }
    }

    /// `image` without its lens distortion, seen through the same camera matrix (bilinear, black
    /// where nothing maps).
    ///
    /// # Errors
    /// A frame of another size than the calibration's (when the file says which), or an OpenCV
    /// failure.
    pub fn undistort(&mut self, image: &RgbImage) -> Result<RgbImage> {
        let (w, h) = image.dimensions();
        if let Some((cw, ch)) = self.size {
            if (cw, ch) != (w, h) {
                return Err(Error::format(
                    &self.path,
                    format!("the calibration is for {cw}x{ch} frames, the source's are {w}x{h}"),
                ));
            }
        }
        if self.maps.as_ref().is_none_or(|m| m.2 != (w, h)) {
            let (mut x, mut y) = (Mat::default(), Mat::default());
            init_undistort_rectify_map(
                &self.matrix,
                &self.distortion,
                &Mat::default(),
                &self.matrix,
                Size::new(w as i32, h as i32),
                CV_32FC1,
                &mut x,
                &mut y,
            )?;
            self.maps = Some((x, y, (w, h)));
        }
        let Some((x, y, _)) = &self.maps else {
            return Err(Error::Invalid("undistortion maps missing".into()));
        };
        let src = Mat::new_rows_cols_with_data(h as i32, (w * 3) as i32, image.as_raw())?
            .reshape(3, h as i32)?
            .try_clone()?;
        debug_assert_eq!(src.typ(), CV_8UC3);
        let mut out = Mat::default();
        remap(
            &src,
            &mut out,
            x,
            y,
            INTER_LINEAR,
            opencv::core::BORDER_CONSTANT,
            opencv::core::Scalar::all(0.0),
        )?;
        let bytes = out.data_bytes()?.to_vec();
        RgbImage::from_raw(w, h, bytes)
            .ok_or_else(|| Error::Invalid("undistorted frame of the wrong size".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A calibration file as OpenCV's calibration sample writes it.
    fn write_calibration(path: &Path, with_size: bool) {
        let mut fs =
            FileStorage::new_def(path.to_str().unwrap(), opencv::core::FileStorage_WRITE).unwrap();
        if with_size {
            fs.write_i32("image_width", 160).unwrap();
            fs.write_i32("image_height", 120).unwrap();
        }
        let k =
            Mat::from_slice_2d(&[[140.0, 0.0, 81.5], [0.0, 138.0, 58.0], [0.0, 0.0, 1.0]]).unwrap();
        let d = Mat::from_slice_2d(&[[-0.28, 0.09, 0.001, -0.0005, 0.0]]).unwrap();
        fs.write_mat("camera_matrix", &k).unwrap();
        fs.write_mat("distortion_coefficients", &d).unwrap();
        fs.release().unwrap();
    }

    fn test_image() -> RgbImage {
        RgbImage::from_fn(160, 120, |x, y| {
            let v = if (x / 10 + y / 10) % 2 == 0 { 230 } else { 20 };
            image::Rgb([v, (x * 3 % 256) as u8, (y * 2 % 256) as u8])
        })
    }

    /// Our undistortion of `img` against OpenCV's `undistort`: (mean absolute difference in
    /// grey levels, fraction of values within 8).
    fn against_opencv(c: &mut Calibration, img: &RgbImage) -> (f64, f64) {
        let (w, h) = img.dimensions();
        let ours = c.undistort(img).unwrap();
        assert_ne!(ours.as_raw(), img.as_raw(), "the distortion is real");
        let src = Mat::new_rows_cols_with_data(h as i32, (w * 3) as i32, img.as_raw())
            .unwrap()
            .reshape(3, h as i32)
            .unwrap()
            .try_clone()
            .unwrap();
        let mut theirs = Mat::default();
        opencv::calib3d::undistort_def(&src, &mut theirs, &c.matrix, &c.distortion).unwrap();
        let diff: Vec<u32> = ours
            .as_raw()
            .iter()
            .zip(theirs.data_bytes().unwrap())
            .map(|(&a, &b)| u32::from(a.abs_diff(b)))
            .collect();
        let mean = f64::from(diff.iter().sum::<u32>()) / diff.len() as f64;
        let within = diff.iter().filter(|&&d| d <= 8).count() as f64 / diff.len() as f64;
        (mean, within)
    }

    #[test]
    fn undistortion_matches_opencvs_undistort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.yml");
        write_calibration(&path, true);
        let mut c = Calibration::read(&path).unwrap();
        // The same maps and interpolation as `undistort`'s: equal up to rounding.
        let (mean, within) = against_opencv(&mut c, &test_image());
        eprintln!("synthetic: mean |diff| {mean:.3}, within 8: {within:.4}");
        assert!(
            mean < 0.05 && within > 0.999,
            "mean {mean}, within 8: {within}"
        );
        // A real calibration image and its calibration (opencv-doc), where installed.
        let data = Path::new("/usr/share/doc/opencv-doc/examples/data");
        match (
            Calibration::read(&data.join("left_intrinsics.yml")),
            image::open(data.join("left01.jpg")),
        ) {
            (Ok(mut real), Ok(img)) => {
                let (mean, within) = against_opencv(&mut real, &img.into_rgb8());
                eprintln!("left01.jpg: mean |diff| {mean:.3}, within 8: {within:.4}");
                assert!(
                    mean < 0.05 && within > 0.999,
                    "mean {mean}, within 8: {within}"
                );
            }
            _ => eprintln!("skipped left01.jpg: opencv-doc is not installed"),
        }
        let k = c.intrinsics(160, 120);
        assert_eq!((k.fx, k.fy, k.cx, k.cy), (140.0, 138.0, 81.5, 58.0));
        // A frame of another size than the calibration's is refused, naming both.
        let e = c
            .undistort(&RgbImage::new(320, 240))
            .unwrap_err()
            .to_string();
        assert!(e.contains("160x120") && e.contains("320x240"), "{e}");
    }

    #[test]
    fn calibration_files_without_what_is_needed_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yml");
        assert!(Calibration::read(&missing)
            .unwrap_err()
            .to_string()
            .contains("nope.yml"));
        let empty = dir.path().join("empty.yml");
        std::fs::write(&empty, "%YAML:1.0\nfoo: 1\n").unwrap();
        let e = Calibration::read(&empty).unwrap_err().to_string();
        assert!(e.contains("no camera matrix"), "{e}");
        let garbage = dir.path().join("garbage.yml");
        std::fs::write(&garbage, "\u{0}\u{1}not yaml").unwrap();
        assert!(Calibration::read(&garbage).is_err());
    }
}
