//! What the learned windowed engines (`videoflow`, `streamflow`) share: frames as the models
//! take them, one frame size per stream, and the models' flows as [`FlowField`]s.

use candle_core::{Device, Tensor};

use super::FlowField;
use streamrecon_core::error::{Error, Result};
use streamrecon_core::frame::Frame;

/// A frame as the models take it: `[3, H, W]`, RGB, f32 in 0..255.
///
/// # Errors
/// A tensor op failure.
pub(crate) fn frame_tensor(frame: &Frame) -> Result<Tensor> {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let data: Vec<f32> = frame.image.as_raw().iter().map(|&v| f32::from(v)).collect();
    Ok(Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// Keeps a stream at its first frame's size: the first is checked by `first`, a later frame of
/// another size is refused naming both.
///
/// # Errors
/// `first`'s refusal, or a size change.
pub(crate) fn check_stream_size(
    size: &mut Option<(u32, u32)>,
    frame: &Frame,
    first: impl FnOnce((u32, u32)) -> Result<()>,
) -> Result<()> {
    let now = (frame.width(), frame.height());
    match *size {
        Some(s) if s != now => Err(Error::Flow(format!(
            "frame {} is {}x{}, the stream started at {}x{}",
            frame.index, now.0, now.1, s.0, s.1
        ))),
        Some(_) => Ok(()),
        None => {
            first(now)?;
            *size = Some(now);
            Ok(())
        }
    }
}

/// Flow `i` of a model's `[N, 2, H, W]` output as a field (x, y interleaved per pixel).
///
/// # Errors
/// A tensor op failure.
pub(crate) fn flow_field(flows: &Tensor, i: usize) -> Result<FlowField> {
    let (_, _, h, w) = flows.dims4()?;
    let t = flows.get(i)?.permute((1, 2, 0))?.flatten_all()?;
    Ok(FlowField {
        width: w,
        height: h,
        data: t.to_vec1()?,
    })
}
