//! A plain point cloud: what fusion produces, what PLY/PCD files hold and what evaluation reads.

/// Points with optional per-point colour, confidence and normal (all the same length when present).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PointCloud {
    pub points: Vec<[f32; 3]>,
    pub colors: Option<Vec<[u8; 3]>>,
    pub confidence: Option<Vec<f32>>,
    pub normals: Option<Vec<[f32; 3]>>,
}

impl PointCloud {
    pub fn from_points(points: Vec<[f32; 3]>) -> Self {
        Self {
            points,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Keeps the points whose index passes `keep`, in every attribute.
    pub fn retain_indices(&self, keep: &[usize]) -> Self {
        Self {
            points: keep.iter().map(|&i| self.points[i]).collect(),
            colors: self
                .colors
                .as_ref()
                .map(|c| keep.iter().map(|&i| c[i]).collect()),
            confidence: self
                .confidence
                .as_ref()
                .map(|c| keep.iter().map(|&i| c[i]).collect()),
            normals: self
                .normals
                .as_ref()
                .map(|c| keep.iter().map(|&i| c[i]).collect()),
        }
    }
}

/// Unit normal of a neighbourhood (direction of least variance).
pub fn pca_normal(points: impl Iterator<Item = [f64; 3]>) -> [f64; 3] {
    let pts: Vec<nalgebra::Vector3<f64>> = points.map(nalgebra::Vector3::from).collect();
    if pts.len() < 3 {
        return [0.0, 0.0, 1.0];
    }
    let mean = pts.iter().sum::<nalgebra::Vector3<f64>>() / pts.len() as f64;
    let mut cov = nalgebra::Matrix3::zeros();
    for p in &pts {
        let d = p - mean;
        cov += d * d.transpose();
    }
    let eig = nalgebra::SymmetricEigen::new(cov);
    let i = eig.eigenvalues.imin();
    let n = eig.eigenvectors.column(i);
    [n[0], n[1], n[2]]
}
