//! Checkpoint tensors by their official key names, with accounting: every tensor a model asks
//! for must be present with the expected shape, and every tensor the file holds must be used (or
//! knowingly skipped), so a wrong or partial checkpoint is an error that names the key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};

use streamrecon_core::error::{Error, Result};

/// Reads a `.safetensors` file one tensor at a time, so loading holds the checkpoint once (plus
/// one tensor's bytes), not the whole file and then its tensors: VGGT-1B's 5 GB checkpoint
/// would otherwise peak near 10 GB.
/// The header is parsed here because the `safetensors` crate's `read_metadata` checks the offsets
/// against a buffer holding the whole file.
///
/// # Errors
/// The file cannot be read, or its header or sizes are not a safetensors file's.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    use std::io::{Read, Seek, SeekFrom};
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [u64; 2],
    }
    let bad = |m: String| Error::format(path, format!("safetensors: {m}"));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(bad(format!(
            "header of {header_len} bytes in a file of {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    entries.remove("__metadata__");
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        let e: Entry =
            serde_json::from_value(value).map_err(|err| bad(format!("tensor {name}: {err}")))?;
        let dtype = match e.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => return Err(bad(format!("tensor {name}: unsupported dtype {other}"))),
        };
        let [start, end] = e.data_offsets;
        let want = e.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if end < start || end - start != want || data_start + end > file_len {
            return Err(bad(format!(
                "tensor {name}: bytes {start}..{end} for shape {:?} {} in a file of {file_len}",
                e.shape, e.dtype
            )));
        }
        f.seek(SeekFrom::Start(data_start + start))
            .map_err(|err| Error::io(path, err))?;
        let t = if dtype == DType::F32 && cfg!(target_endian = "little") {
            // Straight into the tensor's own buffer: no second copy of the bytes.
            let mut values = vec![0f32; e.shape.iter().product()];
            f.read_exact(bytemuck::cast_slice_mut(&mut values))
                .map_err(|err| Error::io(path, err))?;
            Tensor::from_vec(values, e.shape.as_slice(), &Device::Cpu)
        } else {
            let mut bytes = vec![0u8; (end - start) as usize];
            f.read_exact(&mut bytes)
                .map_err(|err| Error::io(path, err))?;
            Tensor::from_raw_buffer(&bytes, dtype, &e.shape, &Device::Cpu)
        }
        .map_err(|err| bad(format!("tensor {name}: {err}")))?;
        out.push((name, t));
    }
    Ok(out)
}

/// Tensors of one checkpoint, by key. Each is handed over once: a model that keeps it in
/// another layout (a transposed linear weight) then holds the only copy, so building a model
/// peaks at about the checkpoint's size, not twice it.
pub struct Weights {
    tensors: Mutex<BTreeMap<String, Tensor>>,
    used: Mutex<HashSet<String>>,
    dtype: DType,
    origin: String,
    /// Seed of made-up weights for keys the map lacks (benchmarks of sizes with no checkpoint).
    random_seed: Option<u64>,
}

impl Weights {
    /// Loads `.safetensors` or a PyTorch `.pth`/`.pt` zip pickle (a bare state dict, or one under
    /// `model`/`state_dict`); a `module.` prefix (DataParallel checkpoints) is removed.
    ///
    /// # Errors
    /// The file cannot be read or is not a checkpoint.
    pub fn load(path: &Path, dtype: DType) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let origin = path.display().to_string();
        let bad = |e: &dyn std::fmt::Display| Error::format(path, format!("checkpoint: {e}"));
        let list: Vec<(String, Tensor)> = if ext == "safetensors" {
            read_safetensors(path)?
        } else {
            if !path.exists() {
                return Err(Error::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
            let mut list = candle_core::pickle::read_all(path).map_err(|e| bad(&e))?;
            for key in ["model", "state_dict"] {
                if list.is_empty() {
                    list = candle_core::pickle::read_all_with_key(path, Some(key))
                        .map_err(|e| bad(&e))?;
                }
            }
            list
        };
        if list.is_empty() {
            return Err(Error::format(path, "checkpoint holds no tensors"));
        }
        let tensors = list
            .into_iter()
            .map(|(k, t)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), t))
            .collect();
        Ok(Self::from_map(tensors, dtype, origin))
    }

    /// Wraps tensors already in memory (tests, shape-only key checks).
    pub fn from_map(tensors: BTreeMap<String, Tensor>, dtype: DType, origin: String) -> Self {
        Self {
            tensors: Mutex::new(tensors),
            used: Mutex::new(HashSet::new()),
            dtype,
            origin,
            random_seed: None,
        }
    }

    /// Deterministic random weights of whatever shapes the model asks for: matrices and kernels
    /// ~ N(0, 1/fan_in), norm weights 1, biases 0, layer scales 0.01, tokens ~ N(0, 1). For speed
    /// and memory benchmarks of configurations with no checkpoint.
    pub fn random(seed: u64, dtype: DType) -> Self {
        let mut w = Self::from_map(BTreeMap::new(), dtype, format!("random(seed {seed})"));
        w.random_seed = Some(seed);
        w
    }

    fn made_up(seed: u64, key: &str, shape: &Shape) -> Result<Tensor> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let h = key.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(h);
        let dims = shape.dims();
        let n = shape.elem_count();
        let fill = |v: f32| Tensor::full(v, dims, &candle_core::Device::Cpu);
        let leaf = key.rsplit('.').next().unwrap_or(key);
        let t = if leaf == "gamma" {
            fill(0.01)?
        } else if leaf == "bias" {
            fill(0.0)?
        } else if dims.len() == 1 {
            fill(1.0)?
        } else {
            let fan_in = if key.ends_with("_token")
                || key.ends_with("_tokens")
                || key.ends_with("pos_embed")
            {
                1
            } else {
                dims[1..].iter().product::<usize>().max(1)
            };
            let normal = rand_distr::Normal::new(0.0f32, 1.0 / (fan_in as f32).sqrt())
                .map_err(|e| Error::Model(e.to_string()))?;
            let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?
        };
        Ok(t)
    }

    /// The tensor `key` with shape `shape`, in the model's dtype.
    ///
    /// # Errors
    /// Missing key or wrong shape, naming the key.
    pub fn get(&self, key: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let poisoned = || Error::Model("weights: lock poisoned".into());
        let mut tensors = self.tensors.lock().map_err(|_| poisoned())?;
        let Some(t) = tensors.get(key) else {
            if let Some(seed) = self.random_seed {
                return Ok(Self::made_up(seed, key, &shape)?.to_dtype(self.dtype)?);
            }
            let taken = self.used.lock().map_err(|_| poisoned())?.contains(key);
            return Err(Error::Model(format!(
                "weights {}: {} tensor `{key}` (expected shape {shape:?})",
                self.origin,
                if taken {
                    "a second request for"
                } else {
                    "missing"
                }
            )));
        };
        if t.shape() != &shape {
            return Err(Error::Model(format!(
                "weights {}: tensor `{key}` has shape {:?}, the model config expects {shape:?}",
                self.origin,
                t.shape()
            )));
        }
        let t = tensors.remove(key).ok_or_else(poisoned)?;
        self.used
            .lock()
            .map_err(|_| poisoned())?
            .insert(key.to_string());
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Keys the model never asked for, except those under `skippable` prefixes (returned apart).
    pub fn unused(&self, skippable: &[&str]) -> (Vec<String>, Vec<String>) {
        // What is left in the map is what no one asked for.
        let left: Vec<String> = self
            .tensors
            .lock()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let mut unexpected = Vec::new();
        let mut skipped = Vec::new();
        for k in left {
            if skippable.iter().any(|p| k.starts_with(p)) {
                skipped.push(k);
            } else {
                unexpected.push(k);
            }
        }
        (unexpected, skipped)
    }

    /// Fails on unexpected keys; warns once about skipped ones.
    ///
    /// # Errors
    /// The checkpoint has tensors this model does not use.
    pub fn finish(&self, skippable: &[&str]) -> Result<()> {
        let (unexpected, skipped) = self.unused(skippable);
        if !unexpected.is_empty() {
            let shown: Vec<_> = unexpected.iter().take(8).cloned().collect();
            return Err(Error::Model(format!(
                "weights {}: {} tensors do not belong to this model config, e.g. {}",
                self.origin,
                unexpected.len(),
                shown.join(", ")
            )));
        }
        if !skipped.is_empty() {
            log::warn!(
                "weights {}: skipping {} tensors not used for inference ({}…)",
                self.origin,
                skipped.len(),
                skipped[0]
            );
        }
        // Their memory back before the model runs.
        if let Ok(mut t) = self.tensors.lock() {
            t.clear();
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A prefixed view, mirroring the PyTorch module tree.
    pub fn pp(&self, prefix: &str) -> Vb<'_> {
        Vb {
            w: self,
            prefix: prefix.to_string(),
        }
    }
}

/// Writes named tensors to a `.safetensors` file atomically (temporary name, then rename).
///
/// # Errors
/// The file cannot be written.
#[allow(clippy::implicit_hasher)] // candle's `save` takes the default hasher
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = streamrecon_core::io_util::tmp_name(path);
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::format(path, format!("cannot write tensors: {e}")));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A view of [`Weights`] under a module path, like candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct Vb<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> Vb<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Vb { w: self.w, prefix }
    }

    /// # Errors
    /// Missing tensor or wrong shape.
    pub fn get(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.w.get(&format!("{}.{name}", self.prefix), shape)
    }

    pub fn dtype(&self) -> DType {
        self.w.dtype()
    }
}

/// A model config from JSON: bare, or the `model_config` section of a fixture-style
/// `config.json`; `what` names the model in errors, `validate` says what does not fit.
///
/// # Errors
/// Unreadable file, malformed JSON or sizes that do not fit together, naming the file.
pub fn read_model_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    validate: impl Fn(&T) -> std::result::Result<(), String>,
) -> Result<T> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum ConfigFile<T> {
        Wrapped { model_config: T },
        Bare(T),
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file: ConfigFile<T> = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("{what} config: {e}")))?;
    let cfg = match file {
        ConfigFile::Wrapped { model_config } => model_config,
        ConfigFile::Bare(c) => c,
    };
    validate(&cfg).map_err(|e| Error::format(path, format!("{what} config: {e}")))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor handed to the model leaves the checkpoint's map, so a model that re-lays it out
    /// holds the only copy (VGGT-1B's 4.8 GiB checkpoint: peak RSS 9.2 GiB before, 5.0 after);
    /// the skipped ones go at `finish`.
    #[test]
    fn each_tensor_is_handed_over_once_and_the_rest_freed_at_finish() {
        let dev = Device::Cpu;
        let map = BTreeMap::from([
            (
                "a".to_string(),
                Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            ),
            (
                "track.b".to_string(),
                Tensor::zeros(4, DType::F32, &dev).unwrap(),
            ),
        ]);
        let w = Weights::from_map(map, DType::F32, "test".into());
        w.get("a", (2, 3)).unwrap();
        // The map kept no reference: the caller's is the only one.
        assert!(!w.tensors.lock().unwrap().contains_key("a"));
        let again = w.get("a", (2, 3)).unwrap_err().to_string();
        assert!(again.contains("second request"), "{again}");
        assert!(w.get("c", 1).unwrap_err().to_string().contains("missing"));
        assert_eq!(w.unused(&["track."]), (vec![], vec!["track.b".to_string()]));
        w.finish(&["track."]).unwrap();
        assert!(w.tensors.lock().unwrap().is_empty());
    }

    #[test]
    fn safetensors_read_tensor_by_tensor_are_candles_and_truncation_is_named() {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        map.insert(
            "a.weight".to_string(),
            Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap(),
        );
        map.insert("b".to_string(), Tensor::arange(0i64, 7, &dev).unwrap());
        map.insert(
            "c.half".to_string(),
            Tensor::ones((2, 2), DType::F16, &dev).unwrap(),
        );
        let path = std::env::temp_dir().join(format!(
            "streamrecon-weights-{}.safetensors",
            std::process::id()
        ));
        candle_core::safetensors::save(&map, &path).unwrap();
        let ours = read_safetensors(&path).unwrap();
        assert_eq!(ours.len(), 3);
        for (name, t) in &ours {
            let want = &map[name];
            assert_eq!((t.dims(), t.dtype()), (want.dims(), want.dtype()), "{name}");
            let diff = (t.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff == 0.0, "{name}");
        }
        // A truncated file is an error that names it, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\xffxx").unwrap();
        assert!(read_safetensors(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
