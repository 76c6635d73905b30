//! `heads/camera_head.py::CameraHead` in streaming mode: the camera token, adaLN-modulated by
//! the current pose estimate, through a trunk whose K/V caches are shared by the refinement
//! iterations and by every earlier frame; 4 iterations refine `absT_quaR_FoV`.

use crate::ops::Linear;
use candle_core::{Module, Tensor, D};
use candle_nn::LayerNorm;

use super::config::VggtConfig;
use super::layers::{Block, BlockSpec, Mlp};
use super::memory::StreamMemory;
use crate::ops::{layer_norm, layer_norm_plain, linear};
use crate::weights::Vb;
use streamrecon_core::error::Result;

/// Pose encoding width: translation (3), quaternion XYZW (4), FoV h/w (2).
pub const POSE_ENC_DIM: usize = 9;

pub struct CameraHead {
    trunk: Vec<Block>,
    token_norm: LayerNorm,
    trunk_norm: LayerNorm,
    empty_pose_tokens: Tensor,
    embed_pose: Linear,
    pose_ln_modulation: Linear,
    adaln_norm: LayerNorm,
    pose_branch: Mlp,
    num_iterations: usize,
}

impl CameraHead {
    /// # Errors
    /// Missing or misshapen weights.
    pub fn new(vb: &Vb, cfg: &VggtConfig) -> Result<Self> {
        let c = &cfg.camera_head;
        let d = c.dim_in;
        let spec = BlockSpec {
            dim: d,
            num_heads: c.num_heads,
            mlp_hidden: (d as f64 * c.mlp_ratio) as usize,
            bias: true,
            qk_norm: None,
            layer_scale: c.init_values > 0.0,
            norm_eps: 1e-5,
        };
        Ok(Self {
            trunk: (0..c.trunk_depth)
                .map(|i| Block::new(&vb.pp("trunk").pp(i), &spec))
                .collect::<Result<_>>()?,
            token_norm: layer_norm(&vb.pp("token_norm"), d, 1e-5)?,
            trunk_norm: layer_norm(&vb.pp("trunk_norm"), d, 1e-5)?,
            empty_pose_tokens: vb.get("empty_pose_tokens", (1, 1, POSE_ENC_DIM))?,
            embed_pose: linear(&vb.pp("embed_pose"), POSE_ENC_DIM, d, true)?,
            pose_ln_modulation: linear(&vb.pp("poseLN_modulation").pp(1), d, 3 * d, true)?,
            adaln_norm: layer_norm_plain(d, 1e-6, vb.dtype())?,
            pose_branch: Mlp::new(&vb.pp("pose_branch"), d, d / 2, POSE_ENC_DIM, true)?,
            num_iterations: c.num_iterations,
        })
    }

    pub fn num_iterations(&self) -> usize {
        self.num_iterations
    }

    /// `tokens_last [1, P, 2E]` of one frame → the activated pose encoding after each iteration,
    /// each `[1, 1, 9]`.
    ///
    /// # Errors
    /// Tensor op failure.
    pub fn forward(
        &self,
        tokens_last: &Tensor,
        frame_index: usize,
        memory: &mut StreamMemory,
        taps: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Vec<Tensor>> {
        let pose_tokens = self.token_norm.forward(&tokens_last.narrow(1, 0, 1)?)?;
        taps("camera.token_norm", &pose_tokens);
        let normed = self.adaln_norm.forward(&pose_tokens)?;
        let mut raw: Option<Tensor> = None;
        let mut activated = Vec::with_capacity(self.num_iterations);
        for it in 0..self.num_iterations {
            let input = match &raw {
                None => self.embed_pose.forward(&self.empty_pose_tokens)?,
                Some(p) => self.embed_pose.forward(p)?,
            };
            let m = self
                .pose_ln_modulation
                .forward(&candle_nn::ops::silu(&input)?)?
                .chunk(3, D::Minus1)?;
            let (shift, scale, gate) = (&m[0], &m[1], &m[2]);
            let modulated = normed
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(shift)?
                .broadcast_mul(gate)?;
            let mut x = (modulated + &pose_tokens)?;
            memory.begin_camera_iteration(frame_index, it, self.num_iterations);
            for (blk, cache) in self.trunk.iter().zip(memory.camera.iter_mut()) {
                x = blk.forward(&x, None, Some(cache))?;
            }
            let delta = self.pose_branch.forward(&self.trunk_norm.forward(&x)?)?;
            let next = match raw {
                None => delta,
                Some(p) => (p + delta)?,
            };
            activated.push(activate_pose(&next)?);
            raw = Some(next);
        }
        Ok(activated)
    }
}

/// T and quaternion linear, FoV through ReLU.
fn activate_pose(enc: &Tensor) -> Result<Tensor> {
    let tq = enc.narrow(D::Minus1, 0, 7)?;
    let fov = enc.narrow(D::Minus1, 7, 2)?.relu()?;
    Ok(Tensor::cat(&[&tq, &fov], D::Minus1)?)
}
