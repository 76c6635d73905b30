//! VideoFlow-MOF sizes, read from JSON following the fixture's `model_config` section (the
//! reference's yacs config plus the Twins sizes; unknown fields ignored).

use std::path::Path;

use serde::{Deserialize, Serialize};

use streamrecon_core::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VideoFlowConfig {
    #[serde(rename = "yacs_MOFNetStack", alias = "mof")]
    pub mof: MofConfig,
    #[serde(
        rename = "twins_encoder (cnet and fnet, separate weights)",
        alias = "twins"
    )]
    pub twins: TwinsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MofConfig {
    pub feat_dim: usize,
    #[serde(default = "three")]
    pub corr_levels: usize,
    #[serde(default = "four")]
    pub corr_radius: usize,
    pub decoder_depth: usize,
    #[serde(default = "eight")]
    pub down_ratio: usize,
    #[serde(default = "k_conv")]
    pub k_conv: Vec<usize>,
    #[serde(rename = "PCUpdater_conv", default = "pc_conv")]
    pub pc_updater_conv: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinsConfig {
    pub embed_dims: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub mlp_ratios: Vec<f64>,
    pub depths: Vec<usize>,
    pub wss: Vec<usize>,
    pub sr_ratios: Vec<usize>,
}

impl TwinsConfig {
    /// timm's `twins_svt_large`, whose first two stages both released flow models use.
    pub fn svt_large() -> Self {
        Self {
            embed_dims: vec![128, 256, 512, 1024],
            num_heads: vec![4, 8, 16, 32],
            mlp_ratios: vec![4.0; 4],
            depths: vec![2, 2, 18, 2],
            wss: vec![7; 4],
            sr_ratios: vec![8, 4, 2, 1],
        }
    }

    /// The two stages the flow models use are described, with two blocks each.
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn validate_first_stages(&self) -> std::result::Result<(), String> {
        if self.embed_dims.len() < 2
            || self.num_heads.len() < 2
            || self.depths.len() < 2
            || self.wss.len() < 2
            || self.sr_ratios.len() < 2
            || self.mlp_ratios.len() < 2
        {
            return Err("twins sizes need at least the two stages the flow models use".into());
        }
        if self.depths[0] != 2 || self.depths[1] != 2 {
            return Err("the flow models' Twins stages have two blocks each".into());
        }
        if (0..2).any(|s| {
            self.num_heads[s] == 0 || !self.embed_dims[s].is_multiple_of(self.num_heads[s])
        }) {
            return Err("each Twins stage's width must be a multiple of its heads".into());
        }
        if self.wss[..2].contains(&0) || self.sr_ratios[..2].contains(&0) {
            return Err("window sizes and sub-sampling ratios must be at least 1".into());
        }
        Ok(())
    }
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}
fn k_conv() -> Vec<usize> {
    vec![1, 15]
}
fn pc_conv() -> Vec<usize> {
    vec![1, 7]
}

impl VideoFlowConfig {
    /// # Errors
    /// Unreadable file, malformed JSON or sizes that do not fit together.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        crate::weights::read_model_config(path, "VideoFlow", Self::validate)
    }

    /// The released VideoFlow-MOF (`MOF_sintel`/`MOF_things`) sizes.
    pub fn mof_released() -> Self {
        Self {
            mof: MofConfig {
                feat_dim: 256,
                corr_levels: 4,
                corr_radius: 4,
                decoder_depth: 32,
                down_ratio: 8,
                k_conv: k_conv(),
                pc_updater_conv: pc_conv(),
            },
            twins: TwinsConfig::svt_large(),
        }
    }

    /// Hidden/context width (`feat_dim / 2`).
    pub fn hidden_dim(&self) -> usize {
        self.mof.feat_dim / 2
    }

    /// `128 / (256 / feat_dim)`: the update block's and GMA's width.
    pub fn update_dim(&self) -> usize {
        128 / (256 / self.mof.feat_dim)
    }

    /// Correlation channels per direction.
    pub fn cor_planes(&self) -> usize {
        (2 * self.mof.corr_radius + 1).pow(2) * self.mof.corr_levels
    }

    /// # Errors
    /// A description of the first inconsistency.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.twins.validate_first_stages()?;
        if self.twins.embed_dims[1] != self.mof.feat_dim {
            return Err("feat_dim must equal the second Twins stage's width".into());
        }
        if self.mof.down_ratio != 8 {
            return Err("only down_ratio 8 (the released models) is supported".into());
        }
        if !(16..=256).contains(&self.mof.feat_dim) || 256 % self.mof.feat_dim != 0 {
            return Err("feat_dim must divide 256".into());
        }
        if self.hidden_dim() + self.hidden_dim() != self.mof.feat_dim {
            return Err("feat_dim must be even".into());
        }
        Ok(())
    }
}
