//! Mutation fuzzing of every file reader: thousands of corrupted variants of valid files (bit flips,
//! truncations, insertions, overwritten header numbers, garbage) must give `Ok` or a clear `Err`,
//! never a panic or an unbounded allocation. Deterministic (fixed seed), fast enough for CI.

use std::path::Path;

use rand::{Rng, SeedableRng};
use streamrecon::cloud::PointCloud;
use streamrecon::datasets::formats::pcd::{pcd_from_bytes, pcd_to_bytes, PcdData};
use streamrecon::datasets::formats::ply::{ply_from_bytes, ply_to_bytes};
use streamrecon::datasets::formats::tum::{tum_from_str, tum_to_string, StampedPose};
use streamrecon::datasets::formats::{flo, kitti_flow};
use streamrecon::flow::FlowField;
use streamrecon::frame::Pose;

const ROUNDS: usize = 20_000;

fn mutate(rng: &mut rand_pcg::Pcg64, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                if !b.is_empty() {
                    let i = rng.random_range(0..b.len());
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => b.truncate(rng.random_range(0..=b.len())),
        2 => {
            let i = rng.random_range(0..=b.len());
            let n = rng.random_range(1..64);
            let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            b.splice(i..i, junk);
        }
        3 => {
            // Overwrite a 4-byte word (sizes and counts in binary headers) with an extreme value.
            if b.len() >= 4 {
                let i = rng.random_range(0..b.len() - 3);
                let v: u32 = [0, 1, u32::MAX, i32::MAX as u32, 0x8000_0000, rng.random()]
                    [rng.random_range(0..6)];
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        4 => {
            // Replace a decimal number in a text header with a huge or negative one.
            let s = String::from_utf8_lossy(&b).to_string();
            if let Some(pos) = s.find(|c: char| c.is_ascii_digit()) {
                let repl = ["99999999999", "-1", "0", "18446744073709551615", "nan"]
                    [rng.random_range(0..5)];
                let end = s[pos..]
                    .find(|c: char| !c.is_ascii_digit())
                    .map_or(s.len(), |e| pos + e);
                b = format!("{}{}{}", &s[..pos], repl, &s[end..]).into_bytes();
            }
        }
        _ => {
            b = (0..rng.random_range(0..256))
                .map(|_| rng.random())
                .collect();
        }
    }
    b
}

fn fuzz(name: &str, base: &[u8], read: impl Fn(&[u8])) {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0xf022 ^ name.len() as u64);
    read(base);
    for _ in 0..ROUNDS {
        read(&mutate(&mut rng, base));
    }
}

fn sample_flow() -> FlowField {
    let mut f = FlowField::zeros(9, 5);
    for (i, v) in f.data.iter_mut().enumerate() {
        *v = (i as f32 * 0.7).cos() * 12.0;
    }
    f
}

fn sample_cloud() -> PointCloud {
    PointCloud {
        points: (0..20).map(|i| [i as f32, -(i as f32), 0.5]).collect(),
        colors: Some((0..20).map(|i| [i as u8, 3, 250]).collect()),
        confidence: Some(vec![0.5; 20]),
        normals: None,
    }
}

#[test]
fn flo_reader_survives_mutations() {
    let p = Path::new("fuzz.flo");
    fuzz("flo", &flo::flo_to_bytes(&sample_flow()), |b| {
        let _ = flo::flo_from_bytes(b, p);
    });
}

#[test]
fn kitti_png_reader_survives_mutations() {
    let p = Path::new("fuzz.png");
    fuzz(
        "kitti",
        &kitti_flow::kitti_flow_to_bytes(&sample_flow(), None),
        |b| {
            let _ = kitti_flow::kitti_flow_from_bytes(b, p);
        },
    );
}

#[test]
fn pcd_reader_survives_mutations() {
    let p = Path::new("fuzz.pcd");
    for kind in [PcdData::Ascii, PcdData::Binary, PcdData::BinaryCompressed] {
        fuzz(
            &format!("pcd{kind:?}"),
            &pcd_to_bytes(&sample_cloud(), kind),
            |b| {
                let _ = pcd_from_bytes(b, p);
            },
        );
    }
}

#[test]
fn ply_reader_survives_mutations() {
    let p = Path::new("fuzz.ply");
    fuzz("ply", &ply_to_bytes(&sample_cloud()), |b| {
        let _ = ply_from_bytes(b, p);
    });
    let ascii = b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n1 2 3 4 5 6\n7 8 9 10 11 12\n";
    fuzz("ply-ascii", ascii, |b| {
        let _ = ply_from_bytes(b, p);
    });
}

#[test]
fn tum_reader_survives_mutations() {
    let p = Path::new("fuzz.txt");
    let poses: Vec<StampedPose> = (0..4)
        .map(|i| StampedPose {
            timestamp: f64::from(i),
            world_from_cam: Pose::translation(f64::from(i), 0.0, 1.0),
        })
        .collect();
    fuzz("tum", tum_to_string(&poses).as_bytes(), |b| {
        let _ = tum_from_str(&String::from_utf8_lossy(b), p);
    });
}

/// Found by `scripts/fuzz` (cargo-fuzz, pcd target): a one-byte `rgb` field was read as a 4-byte
/// colour word and panicked.
#[test]
fn pcd_with_a_one_byte_colour_field_is_an_error() {
    let mut bytes = b"VERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 1\nTYPE F F F U\nCOUNT 1 1 1 1\n\
WIDTH 1\nHEIGHT 1\nPOINTS 1\nDATA binary\n"
        .to_vec();
    bytes.extend_from_slice(&[0u8; 13]);
    let err = pcd_from_bytes(&bytes, Path::new("colour.pcd")).expect_err("SIZE 1 colour");
    assert!(err.to_string().contains("colour.pcd"), "{err}");
}
