//! The kernels on an NVIDIA GPU through cudarc: the driver and NVRTC are loaded at run time
//! (so a machine without them gets an error here, not a failed build or a panic), the sources
//! compiled once per [`Gpu`] and launched on its stream.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileError, Ptx};

use crate::{
    blocks_for, Attention, CorrLookup, Depthwise, DeviceInfo, Error, GridSample, KvPrune, Result,
    Source, SOURCES, THREADS_PER_BLOCK,
};

fn driver_error(e: cudarc::driver::DriverError) -> Error {
    Error::Driver(e.to_string())
}

/// Whether the NVIDIA driver library can be loaded (cudarc panics on first use without it).
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// One source compiled to PTX (needs NVRTC only, no driver or GPU).
///
/// # Errors
/// No NVRTC, or the compiler's log.
pub fn compile(source: &Source) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(Error::NoNvrtc);
    }
    cudarc::nvrtc::compile_ptx(source.text).map_err(|e| Error::Compile {
        file: source.file,
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })
}

fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = CudaContext::device_count().map_err(driver_error)?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(Error::NoDevice { ordinal, count });
    }
    CudaContext::new(ordinal).map_err(driver_error)
}

fn info(ctx: &CudaContext) -> Result<DeviceInfo> {
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(driver_error)?,
        memory_bytes: ctx.total_mem().map_err(driver_error)?,
        compute_capability: ctx.compute_capability().map_err(driver_error)?,
    })
}

/// Opens device `ordinal` and reads what it is.
///
/// # Errors
/// No driver, no such device, or a driver error.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    info(&*context(ordinal)?)
}

/// One device with every kernel loaded.
pub struct Gpu {
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    info: DeviceInfo,
}

fn config(threads: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (blocks_for(threads)?, 1, 1),
        block_dim: (THREADS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Launches `launch` over `threads` threads.
///
/// # Safety
/// The arguments added to `launch` match its kernel's signature, and every buffer is as long as
/// the kernel indexes it for that many threads (the shapes' `check`s).
unsafe fn run(mut launch: LaunchArgs<'_>, threads: usize) -> Result<()> {
    // SAFETY: the caller's.
    unsafe { launch.launch(config(threads)?) }.map_err(driver_error)?;
    Ok(())
}

fn check_slice<T>(kernel: &str, what: &str, s: &CudaSlice<T>, want: usize) -> Result<()> {
    if s.len() == want {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{kernel}: {what} has {} values on the device, the shape needs {want}",
            s.len()
        )))
    }
}

impl Gpu {
    /// Opens device `ordinal` and compiles and loads every kernel.
    ///
    /// # Errors
    /// No driver, no NVRTC, no such device, a compile or driver error.
    pub fn open(ordinal: usize) -> Result<Self> {
        let ctx = context(ordinal)?;
        let info = info(&ctx)?;
        let mut functions = HashMap::new();
        for source in SOURCES {
            let module = ctx.load_module(compile(source)?).map_err(driver_error)?;
            for &name in source.kernels {
                functions.insert(name, module.load_function(name).map_err(driver_error)?);
            }
        }
        Ok(Self {
            stream: ctx.default_stream(),
            functions,
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The stream every launch goes on (for copies to and from the device).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A launch of kernel `name` on this device's stream: add its arguments, then [`run`].
    fn kernel(&self, name: &str) -> Result<LaunchArgs<'_>> {
        let f = self
            .functions
            .get(name)
            .ok_or_else(|| Error::Driver(format!("no kernel {name} loaded")))?;
        Ok(self.stream.launch_builder(f))
    }

    /// `grid_sample_pixels_f32` (see [`crate::emulate::grid_sample_pixels`]).
    ///
    /// # Errors
    /// Shape mismatch or a launch error.
    pub fn grid_sample_pixels(
        &self,
        s: GridSample,
        img: &CudaSlice<f32>,
        coords: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dims = s.check(img.len(), coords.len(), out.len())?;
        let mut l = self.kernel("grid_sample_pixels_f32")?;
        l.arg(img).arg(coords).arg(out);
        for v in &dims {
            l.arg(v);
        }
        // SAFETY: the argument list matches the kernel's signature, and the buffers' lengths
        // were checked against the shape it indexes by.
        unsafe { run(l, s.threads()) }
    }

    /// `depthwise_conv2d_f32` (see [`crate::emulate::depthwise_conv2d`]).
    ///
    /// # Errors
    /// Shape mismatch or a launch error.
    pub fn depthwise_conv2d(
        &self,
        s: Depthwise,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        residual_gelu: bool,
    ) -> Result<()> {
        let dims = s.check(x.len(), weight.len(), bias.len(), out.len())?;
        let gelu = i32::from(residual_gelu);
        let mut l = self.kernel("depthwise_conv2d_f32")?;
        l.arg(x).arg(weight).arg(bias).arg(out);
        for v in &dims {
            l.arg(v);
        }
        l.arg(&gelu);
        // SAFETY: as for grid_sample_pixels.
        unsafe { run(l, s.threads()) }
    }

    /// `corr_lookup_f32` for one level (see [`crate::emulate::corr_lookup`]).
    ///
    /// # Errors
    /// Shape mismatch or a launch error.
    pub fn corr_lookup(
        &self,
        s: CorrLookup,
        corr: &CudaSlice<f32>,
        coords: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let [batch, h1, w1, hl, wl, radius, channel0, channels] =
            s.check(corr.len(), coords.len(), out.len())?;
        let mut l = self.kernel("corr_lookup_f32")?;
        l.arg(corr).arg(coords).arg(out);
        for v in [&batch, &h1, &w1, &hl, &wl, &radius] {
            l.arg(v);
        }
        l.arg(&s.scale).arg(&channel0).arg(&channels);
        // SAFETY: as for grid_sample_pixels.
        unsafe { run(l, s.threads()) }
    }

    /// `attention_f32` (see [`crate::emulate::attention`]).
    ///
    /// # Errors
    /// Shape mismatch or a launch error.
    pub fn attention(
        &self,
        s: Attention,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dims = s.check(q.len(), k.len(), v.len(), out.len())?;
        let mut l = self.kernel("attention_f32")?;
        l.arg(q).arg(k).arg(v).arg(out);
        for x in &dims {
            l.arg(x);
        }
        l.arg(&s.scale);
        // SAFETY: as for grid_sample_pixels.
        unsafe { run(l, s.threads()) }
    }

    /// The selection launches of `kv_prune.cu`: scores `[heads, cand]` and slots (`-1`:
    /// dropped), left on the device.
    ///
    /// # Errors
    /// Shape mismatch or a driver error.
    pub fn kv_select(
        &self,
        s: KvPrune,
        keys: &CudaSlice<f32>,
        priority: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<i32>)> {
        let [heads, cap, d, anchor, cand, keep] = s.check(keys.len(), priority.len())?;
        let per_row = s.heads * s.cand;
        let alloc_f = |n: usize| self.stream.alloc_zeros::<f32>(n).map_err(driver_error);
        let alloc_i = |n: usize| self.stream.alloc_zeros::<i32>(n).map_err(driver_error);
        let (mut norms, mut mean, mut scores) = (
            alloc_f(per_row)?,
            alloc_f(s.heads * s.d)?,
            alloc_f(per_row)?,
        );
        let (mut kept, mut slot) = (alloc_i(per_row)?, alloc_i(per_row)?);
        let dims = [heads, cap, anchor, cand, d];
        // SAFETY (all five): each argument list matches its kernel's signature, and every
        // buffer was sized from the checked shape.
        unsafe {
            let mut l = self.kernel("kv_key_norms_f32")?;
            l.arg(keys).arg(&mut norms);
            for v in &dims {
                l.arg(v);
            }
            run(l, per_row)?;

            let mut l = self.kernel("kv_mean_key_f32")?;
            l.arg(keys).arg(&norms).arg(&mut mean);
            for v in &dims {
                l.arg(v);
            }
            run(l, s.heads * s.d)?;

            let mut l = self.kernel("kv_scores_f32")?;
            l.arg(keys)
                .arg(&norms)
                .arg(&mean)
                .arg(priority)
                .arg(&mut scores);
            for v in &dims {
                l.arg(v);
            }
            run(l, per_row)?;

            let mut l = self.kernel("kv_rank_keep_f32")?;
            l.arg(&scores)
                .arg(&mut kept)
                .arg(&heads)
                .arg(&cand)
                .arg(&keep);
            run(l, per_row)?;

            let mut l = self.kernel("kv_keep_slots")?;
            l.arg(&kept).arg(&mut slot).arg(&heads).arg(&cand);
            run(l, s.heads)?;
        }
        Ok((scores, slot))
    }

    /// `kv_compact_f32`: the anchors and kept rows of `src` into `dst` (both `[heads, cap, d]`),
    /// with slots from [`Gpu::kv_select`].
    ///
    /// # Errors
    /// Shape mismatch or a launch error.
    pub fn kv_compact(
        &self,
        s: KvPrune,
        slot: &CudaSlice<i32>,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let [heads, cap, d, anchor, cand, _] = s.check(src.len(), slot.len())?;
        check_slice("kv_compact", "dst", dst, src.len())?;
        let mut l = self.kernel("kv_compact_f32")?;
        l.arg(src).arg(slot).arg(dst);
        for v in [&heads, &cap, &anchor, &cand, &d] {
            l.arg(v);
        }
        // SAFETY: as for grid_sample_pixels; slots come from kv_select over the same shape.
        unsafe { run(l, s.heads * (s.anchor + s.cand) * s.d) }
    }
}
