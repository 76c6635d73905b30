//! StreamFlow sizes, read from JSON following the fixture's `model_config` section (the
//! arguments of `evaluate_mf.py` the model reads, plus the Twins sizes; unknown fields ignored).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::videoflow::config::TwinsConfig;
use streamrecon_core::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamFlowConfig {
    #[serde(rename = "evaluate_mf_args_used_by_the_model", alias = "args")]
    pub args: StreamFlowArgs,
    #[serde(
        rename = "twins_encoder (cnet and fnet, separate weights)",
        alias = "twins"
    )]
    pub twins: TwinsConfig,
}

/// The `evaluate_mf.py` arguments `SKFlow_MF8` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamFlowArgs {
    /// Frames per pass; the joint flow head's width depends on it, so a checkpoint is tied to it.
    #[serde(rename = "T")]
    pub frames: usize,
    pub iters: usize,
    /// Hidden + context width (each half of it).
    pub decoder_dim: usize,
    #[serde(default = "one")]
    pub num_heads: usize,
    #[serde(default = "k_conv")]
    pub k_conv: Vec<usize>,
    #[serde(rename = "PCUpdater_conv", default = "pc_conv")]
    pub pc_updater_conv: Vec<usize>,
}

fn one() -> usize {
    1
}
fn k_conv() -> Vec<usize> {
    vec![1, 15]
}
fn pc_conv() -> Vec<usize> {
    vec![1, 7]
}

/// `SKFlow_MF8.__init__` forces these whatever the arguments say.
pub const CORR_LEVELS: usize = 4;
pub const CORR_RADIUS: usize = 4;
/// Feature maps are at 1/8 of the (padded) frame.
pub const DOWN_RATIO: usize = 8;
/// The smallest padded side: below it the coarsest correlation level has one row or column,
/// where the reference divides by zero (`W − 1`) and returns NaN.
pub const MIN_PADDED_SIDE: usize = DOWN_RATIO << (CORR_LEVELS - 1) << 1;

impl StreamFlowConfig {
    /// # Errors
    /// Unreadable file, malformed JSON or sizes that do not fit together.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        crate::weights::read_model_config(path, "StreamFlow", Self::validate)
    }

    /// Whether a JSON config file describes StreamFlow rather than another model: it carries
    /// `evaluate_mf.py`'s arguments (at the top or under `model_config`).
    pub fn describes(path: &Path) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        let root = v.get("model_config").unwrap_or(&v);
        ["evaluate_mf_args_used_by_the_model", "args"]
            .iter()
            .any(|k| root.get(k).is_some())
    }

    /// The released checkpoints (`scripts/infer.sh`: T = 4, 15 iterations, decoder_dim 256,
    /// twins_svt_large's first two stages).
    pub fn released() -> Self {
        Self {
            args: StreamFlowArgs {
                frames: 4,
                iters: 15,
                decoder_dim: 256,
                num_heads: 1,
                k_conv: k_conv(),
                pc_updater_conv: pc_conv(),
            },
            twins: TwinsConfig::svt_large(),
        }
    }

    /// Hidden (and context) width, `decoder_dim / 2`.
    pub fn hidden_dim(&self) -> usize {
        self.args.decoder_dim / 2
    }

    /// Correlation channels.
    pub fn cor_planes(&self) -> usize {
        (2 * CORR_RADIUS + 1).pow(2) * CORR_LEVELS
    }

    /// # Errors
    /// A description of the first inconsistency.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.twins.validate_first_stages()?;
        let a = &self.args;
        if a.frames < 2 {
            return Err(format!(
                "T = {} frames: StreamFlow needs at least 2",
                a.frames
            ));
        }
        if a.iters == 0 {
            return Err("iters must be at least 1".into());
        }
        if a.decoder_dim < 4 || !a.decoder_dim.is_multiple_of(2) {
            return Err(format!("decoder_dim {} must be even", a.decoder_dim));
        }
        if self.twins.embed_dims[1] != a.decoder_dim {
            return Err(format!(
                "decoder_dim {} must equal the second Twins stage's width {}",
                a.decoder_dim, self.twins.embed_dims[1]
            ));
        }
        if a.num_heads != 1 {
            return Err(format!(
                "num_heads {}: only the released single-head GMA is supported",
                a.num_heads
            ));
        }
        if a.k_conv
            .iter()
            .chain(&a.pc_updater_conv)
            .any(|k| k % 2 == 0)
        {
            return Err("k_conv and PCUpdater_conv kernels must be odd".into());
        }
        Ok(())
    }
}
