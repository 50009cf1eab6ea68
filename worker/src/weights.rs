//! Checkpoint tensors: `model.safetensors.index.json` + shards, memory-mapped.
//!
//! Nothing is copied at load except tiny tensors (norms, biases, FP8 block scales): matrices
//! stay in the mapped file in their stored dtype and the kernels read them there, so resident
//! memory is the pages actually touched — an expert shard touches only its experts.

use crate::error::{Error, Result};
use memmap2::Mmap;
use serde_json::Value;
use shardseek_kernels::weight::{FP8_BLOCK, Weight, WeightData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Stored dtypes the engine reads (safetensors' names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    F8E4m3,
}

impl Dtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Self::F32,
            "BF16" => Self::Bf16,
            "F16" => Self::F16,
            "F8_E4M3" => Self::F8E4m3,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::F8E4m3 => 1,
        }
    }
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the file.
    pub start: usize,
    pub end: usize,
}

/// The mapped shards of a checkpoint and the table of its tensors.
pub struct Store {
    pub dir: PathBuf,
    files: Vec<(String, Mmap)>,
    tensors: HashMap<String, TensorInfo>,
}

fn tensor_err(tensor: &str, file: &str, detail: impl Into<String>) -> Error {
    Error::Tensor {
        tensor: tensor.to_string(),
        file: file.to_string(),
        detail: detail.into(),
    }
}

impl Store {
    /// Opens `DIR/model.safetensors.index.json` and every shard it names (or a lone
    /// `model.safetensors`).
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<String> = Vec::new();
        let mut mapped: HashMap<String, String> = HashMap::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
                path: index.clone(),
                source,
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
            let wm = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    tensor_err(
                        "<weight_map>",
                        "model.safetensors.index.json",
                        "missing `weight_map` object",
                    )
                })?;
            for (name, f) in wm {
                let f = f.as_str().ok_or_else(|| {
                    tensor_err(
                        name,
                        "model.safetensors.index.json",
                        "file name is not a string",
                    )
                })?;
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
                mapped.insert(name.clone(), f.to_string());
            }
            files.sort();
        } else if dir.join("model.safetensors").exists() {
            files.push("model.safetensors".to_string());
        } else {
            return Err(Error::Io {
                path: index,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors.index.json or model.safetensors",
                ),
            });
        }
        let mut store = Self {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for (fi, fname) in files.iter().enumerate() {
            let path = dir.join(fname);
            let file = std::fs::File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the checkpoint is read-only input; we never write through the map. A file
            // truncated underneath us would SIGBUS, as with every mmap-based loader.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            for (name, info) in parse_header(fname, &mmap, fi)? {
                if let Some(expected) = mapped.get(&name)
                    && expected != fname
                {
                    continue; // the index names another shard for this tensor: trust the index
                }
                store.tensors.insert(name, info);
            }
            store.files.push((fname.clone(), mmap));
        }
        for (name, f) in &mapped {
            if !store.tensors.contains_key(name) {
                return Err(tensor_err(
                    name,
                    f,
                    "listed in the index but not present in the shard",
                ));
            }
        }
        Ok(Arc::new(store))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Bytes of the tensors a process holds: all of them, or without the routed experts
    /// (`.mlp.experts.`) when `remote_experts` (an attention pod with expert shards).
    pub fn resident_bytes(&self, remote_experts: bool) -> usize {
        self.tensors
            .iter()
            .filter(|(name, _)| !(remote_experts && name.contains(".mlp.experts.")))
            .map(|(_, t)| t.end - t.start)
            .sum()
    }

    /// Total bytes of the mapped shards.
    pub fn file_bytes(&self) -> usize {
        self.files.iter().map(|f| f.1.len()).sum()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            tensor_err(
                name,
                &self.dir.display().to_string(),
                "missing from the checkpoint",
            )
        })
    }

    pub fn file_name(&self, info: &TensorInfo) -> &str {
        &self.files[info.file].0
    }

    /// The raw bytes of a tensor.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.files[info.file].1[info.start..info.end]
    }

    fn check_shape(&self, name: &str, info: &TensorInfo, shape: &[usize]) -> Result<()> {
        if info.shape != shape {
            return Err(tensor_err(
                name,
                self.file_name(info),
                format!("shape {:?}, expected {:?}", info.shape, shape),
            ));
        }
        Ok(())
    }

    /// A small tensor copied into f32 (norm weights, biases, scales).
    pub fn vector_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        self.check_shape(name, info, shape)?;
        let b = self.bytes(info);
        Ok(match info.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::Bf16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F8E4m3 => {
                return Err(tensor_err(
                    name,
                    self.file_name(info),
                    "FP8 is not supported for vectors",
                ));
            }
        })
    }

    /// A `[rows, cols]` matrix in its stored dtype, with its block scales when FP8.
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let info = self.info(name)?.clone();
        self.check_shape(name, &info, &[rows, cols])?;
        let scale_inv = if info.dtype == Dtype::F8E4m3 {
            let sname = format!("{}_scale_inv", name);
            let sshape = [rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)];
            Some(self.vector_f32(&sname, &sshape)?)
        } else {
            None
        };
        Ok(Linear {
            name: name.to_string(),
            rows,
            cols,
            info,
            scale_inv,
        })
    }
}

/// A weight matrix located in the store; [`Linear::weight`] gives the kernels' view.
#[derive(Clone, Debug)]
pub struct Linear {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    info: TensorInfo,
    scale_inv: Option<Vec<f32>>,
}

impl Linear {
    pub fn dtype(&self) -> Dtype {
        self.info.dtype
    }

    /// The matrix as the kernels see it, borrowing the mapped bytes.
    pub fn weight<'a>(&'a self, store: &'a Store) -> Weight<'a> {
        let b = store.bytes(&self.info);
        let data = match (self.info.dtype, &self.scale_inv) {
            (Dtype::F8E4m3, Some(s)) => WeightData::Fp8E4m3 { q: b, scale_inv: s },
            (Dtype::Bf16, _) => WeightData::Bf16(b),
            (Dtype::F16, _) => WeightData::F16(b),
            _ => WeightData::F32(b),
        };
        Weight {
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }

    /// Maps the matrix's pages into this process now, in one `MADV_POPULATE_READ` per tensor
    /// (Linux ≥ 5.14), instead of one page fault per 4 KiB the first time a kernel reads it.
    /// On `main` before this, kernel time was ~19% of the profile of medium's first 512-token
    /// prefill, mostly those faults (fault handling, page-cache lookups, memcg charging), and
    /// the prefill GEMM's software prefetches are dropped on unmapped pages. Only tensors a process prepares are populated, so an expert
    /// shard still maps only its experts. A kernel without the advice (or a failure) leaves
    /// the pages to fault in lazily, as before: the result is the same, only slower.
    pub fn prefault(&self, store: &Store) {
        #[cfg(target_os = "linux")]
        {
            let map = &store.files[self.info.file].1;
            let len = self.info.end - self.info.start;
            let _ = map.advise_range(memmap2::Advice::PopulateRead, self.info.start, len);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = store;
    }

    /// Bytes of weights plus scales.
    pub fn stored_bytes(&self) -> usize {
        (self.info.end - self.info.start) + self.scale_inv.as_ref().map_or(0, |s| s.len() * 4)
    }
}

fn parse_header(fname: &str, mmap: &[u8], fi: usize) -> Result<Vec<(String, TensorInfo)>> {
    if mmap.len() < 8 {
        return Err(tensor_err(
            "<header>",
            fname,
            format!("file is {} bytes: truncated", mmap.len()),
        ));
    }
    let n = u64::from_le_bytes(mmap[..8].try_into().unwrap_or([0; 8])) as usize;
    if n > mmap.len() - 8 {
        return Err(tensor_err(
            "<header>",
            fname,
            format!("header of {n} bytes exceeds the file: truncated"),
        ));
    }
    let header: Value = serde_json::from_slice(&mmap[8..8 + n]).map_err(|e| {
        tensor_err(
            "<header>",
            fname,
            format!("invalid safetensors header: {e}"),
        )
    })?;
    let obj = header
        .as_object()
        .ok_or_else(|| tensor_err("<header>", fname, "header is not an object"))?;
    let data_start = 8 + n;
    let data_len = mmap.len() - data_start;
    let mut out = Vec::new();
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_s = t.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| tensor_err(name, fname, "no shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| tensor_err(name, fname, "bad shape"))
            })
            .collect::<Result<_>>()?;
        let offs = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or_else(|| tensor_err(name, fname, "no data_offsets"))?;
        let (s, e) = match (
            offs.first().and_then(Value::as_u64),
            offs.get(1).and_then(Value::as_u64),
        ) {
            (Some(s), Some(e)) if s <= e => (s as usize, e as usize),
            _ => return Err(tensor_err(name, fname, "bad data_offsets")),
        };
        if e > data_len {
            return Err(tensor_err(
                name,
                fname,
                format!("data ends at byte {e} but the file holds {data_len}: truncated"),
            ));
        }
        let Some(dtype) = Dtype::parse(dtype_s) else {
            // Tensors of other dtypes (e.g. I64 buffers) are not used by the engine; skip them
            // but remember nothing, so a lookup names them as missing.
            continue;
        };
        let count: usize = shape.iter().product();
        if count * dtype.size() != e - s {
            return Err(tensor_err(
                name,
                fname,
                format!("{} bytes for shape {shape:?} of {dtype_s}", e - s),
            ));
        }
        out.push((
            name.clone(),
            TensorInfo {
                file: fi,
                dtype,
                shape,
                start: data_start + s,
                end: data_start + e,
            },
        ));
    }
    Ok(out)
}
