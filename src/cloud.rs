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
