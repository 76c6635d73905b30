//! Model sizes. JSON fields follow the fixture's `model_config` section (unknown fields ignored),
//! so any config written that way loads; [`VggtConfig::vggt_1b`] is the official StreamVGGT size.

use std::path::Path;

use serde::{Deserialize, Serialize};

use streamrecon_core::error::Result;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VggtConfig {
    /// `img_size` handed to DINOv2: its stored pos-embed grid is `img_size / patch_size` square.
    #[serde(rename = "img_size_param_of_dino", alias = "img_size")]
    pub img_size: usize,
    pub patch_size: usize,
    pub aggregator: AggregatorConfig,
    pub dino_patch_embed: DinoConfig,
    pub camera_head: CameraHeadConfig,
    pub depth_head: DptConfig,
    pub point_head: DptConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AggregatorConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(default = "four_usize")]
    pub num_register_tokens: usize,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default = "yes")]
    pub proj_bias: bool,
    #[serde(default = "yes")]
    pub ffn_bias: bool,
    #[serde(default = "yes")]
    pub qk_norm: bool,
    #[serde(default = "hundred")]
    pub rope_freq: f64,
    #[serde(
        rename = "init_values(layerscale)",
        alias = "init_values",
        default = "cent"
    )]
    pub init_values: f64,
    #[serde(default = "one")]
    pub aa_block_size: usize,
    #[serde(default = "eps5")]
    pub layernorm_eps: f64,
    #[serde(default = "eps5")]
    pub qk_norm_eps: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DinoConfig {
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(default = "four_usize")]
    pub num_register_tokens: usize,
    #[serde(
        rename = "init_values(layerscale)",
        alias = "init_values",
        default = "unit"
    )]
    pub init_values: f64,
    #[serde(default = "yes")]
    pub interpolate_antialias: bool,
    #[serde(default)]
    pub interpolate_offset: f64,
    #[serde(default = "eps6")]
    pub layernorm_eps: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CameraHeadConfig {
    pub dim_in: usize,
    pub trunk_depth: usize,
    pub num_heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f64,
    #[serde(
        rename = "init_values(layerscale)",
        alias = "init_values",
        default = "cent"
    )]
    pub init_values: f64,
    #[serde(default = "four_usize")]
    pub num_iterations: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DptConfig {
    pub dim_in: usize,
    pub output_dim: usize,
    pub activation: String,
    #[serde(default = "expp1")]
    pub conf_activation: String,
    pub features: usize,
    pub out_channels: [usize; 4],
    pub intermediate_layer_idx: [usize; 4],
    #[serde(default = "yes")]
    pub pos_embed: bool,
    #[serde(default = "one")]
    pub down_ratio: usize,
}

fn four() -> f64 {
    4.0
}
fn four_usize() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn hundred() -> f64 {
    100.0
}
fn cent() -> f64 {
    0.01
}
fn unit() -> f64 {
    1.0
}
fn one() -> usize {
    1
}
fn eps5() -> f64 {
    1e-5
}
fn eps6() -> f64 {
    1e-6
}
fn expp1() -> String {
    "expp1".into()
}

/// Config files may hold the model config at the top level or under `model_config`.
impl VggtConfig {
    /// Reads a JSON config (bare, or the `model_config` of a fixture-style `config.json`).
    ///
    /// # Errors
    /// Unreadable file, malformed JSON or sizes that do not fit together.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        crate::weights::read_model_config(path, "model", Self::validate)
    }

    /// The official StreamVGGT / VGGT-1B sizes (DINOv2 ViT-L/14 with registers, 24 blocks).
    pub fn vggt_1b() -> Self {
        let dpt = |output_dim: usize, activation: &str| DptConfig {
            dim_in: 2048,
            output_dim,
            activation: activation.into(),
            conf_activation: expp1(),
            features: 256,
            out_channels: [256, 512, 1024, 1024],
            intermediate_layer_idx: [4, 11, 17, 23],
            pos_embed: true,
            down_ratio: 1,
        };
        Self {
            img_size: 518,
            patch_size: 14,
            aggregator: AggregatorConfig {
                embed_dim: 1024,
                depth: 24,
                num_heads: 16,
                mlp_ratio: 4.0,
                num_register_tokens: 4,
                qkv_bias: true,
                proj_bias: true,
                ffn_bias: true,
                qk_norm: true,
                rope_freq: 100.0,
                init_values: 0.01,
                aa_block_size: 1,
                layernorm_eps: 1e-5,
                qk_norm_eps: 1e-5,
            },
            dino_patch_embed: DinoConfig {
                embed_dim: 1024,
                depth: 24,
                num_heads: 16,
                mlp_ratio: 4.0,
                num_register_tokens: 4,
                init_values: 1.0,
                interpolate_antialias: true,
                interpolate_offset: 0.0,
                layernorm_eps: 1e-6,
            },
            camera_head: CameraHeadConfig {
                dim_in: 2048,
                trunk_depth: 4,
                num_heads: 16,
                mlp_ratio: 4.0,
                init_values: 0.01,
                num_iterations: 4,
            },
            depth_head: dpt(2, "exp"),
            point_head: dpt(4, "inv_log"),
        }
    }

    /// The "small" benchmark config of issue 6 (random weights only).
    pub fn small() -> Self {
        let mut c = Self::vggt_1b();
        c.img_size = 224;
        c.aggregator.embed_dim = 256;
        c.aggregator.depth = 8;
        c.aggregator.num_heads = 8;
        c.dino_patch_embed.embed_dim = 256;
        c.dino_patch_embed.depth = 4;
        c.dino_patch_embed.num_heads = 8;
        c.camera_head.dim_in = 512;
        c.camera_head.trunk_depth = 2;
        c.camera_head.num_heads = 8;
        for h in [&mut c.depth_head, &mut c.point_head] {
            h.dim_in = 512;
            h.features = 64;
            h.out_channels = [32, 64, 128, 128];
            h.intermediate_layer_idx = [1, 3, 5, 7];
        }
        c
    }

    /// Tokens per frame: camera + registers + patches of an `h × w` image.
    pub fn tokens_per_frame(&self, h: usize, w: usize) -> usize {
        1 + self.aggregator.num_register_tokens + (h / self.patch_size) * (w / self.patch_size)
    }

    /// # Errors
    /// A description of the first inconsistency.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let a = &self.aggregator;
        let d = &self.dino_patch_embed;
        if self.patch_size == 0 || self.img_size < self.patch_size {
            return Err("patch_size must be ≥ 1 and ≤ img_size".into());
        }
        if a.num_heads == 0
            || !a.embed_dim.is_multiple_of(a.num_heads)
            || !(a.embed_dim / a.num_heads).is_multiple_of(4)
        {
            return Err("aggregator head_dim must be an integer multiple of 4 (2D RoPE)".into());
        }
        if d.num_heads == 0 || !d.embed_dim.is_multiple_of(d.num_heads) {
            return Err("dino embed_dim must be divisible by num_heads".into());
        }
        if d.embed_dim != a.embed_dim {
            return Err("dino embed_dim must equal the aggregator's".into());
        }
        if a.aa_block_size != 1 {
            return Err("only aa_block_size = 1 (the released model) is supported".into());
        }
        let c = &self.camera_head;
        if c.num_heads == 0 || !c.dim_in.is_multiple_of(c.num_heads) || c.dim_in != 2 * a.embed_dim
        {
            return Err(
                "camera_head dim_in must be 2 × embed_dim and divisible by num_heads".into(),
            );
        }
        for (name, h) in [
            ("depth_head", &self.depth_head),
            ("point_head", &self.point_head),
        ] {
            if h.dim_in != 2 * a.embed_dim {
                return Err(format!("{name} dim_in must be 2 × embed_dim"));
            }
            if h.intermediate_layer_idx.iter().any(|&l| l >= a.depth) {
                return Err(format!(
                    "{name} intermediate_layer_idx beyond the aggregator depth"
                ));
            }
            if h.features < 2 || h.output_dim < 2 {
                return Err(format!("{name}: features and output_dim must be ≥ 2"));
            }
        }
        Ok(())
    }
}
