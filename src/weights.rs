//! Memory-mapped safetensors weights: zero-copy f32 views where the file holds aligned f32,
//! converted once from f16 / bf16 otherwise. Every problem names the file and the tensor.

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The on-disk dtypes we read; anything else is an error naming the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    F16,
    BF16,
    /// Only for the `*.position_ids` buffers older checkpoints carry; never loaded.
    I64,
}

impl DiskDtype {
    pub fn name(self) -> &'static str {
        match self {
            DiskDtype::F32 => "f32",
            DiskDtype::F16 => "f16",
            DiskDtype::BF16 => "bf16",
            DiskDtype::I64 => "i64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DiskDtype::F32 => 4,
            DiskDtype::F16 | DiskDtype::BF16 => 2,
            DiskDtype::I64 => 8,
        }
    }
}

/// Where one tensor lives in the mapped file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: DiskDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// f32 values of one tensor: borrowed from the mapping when possible, owned after conversion.
#[derive(Clone)]
pub enum F32Data {
    Mapped {
        mmap: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<Vec<f32>>),
}

impl Deref for F32Data {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Data::Mapped { mmap, start, len } => {
                bytemuck::cast_slice(&mmap[*start..*start + *len * 4])
            }
            F32Data::Owned(v) => v,
        }
    }
}

impl F32Data {
    pub fn is_mapped(&self) -> bool {
        matches!(self, F32Data::Mapped { .. })
    }
}

impl std::fmt::Debug for F32Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "F32Data({kind}, {} values)", self.len())
    }
}

/// One opened safetensors file.
pub struct WeightsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

/// `--weights` takes a file or a folder holding `model.safetensors`.
pub fn resolve_weights_path(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let file = path.join("model.safetensors");
        if file.is_file() {
            return Ok(file);
        }
        let hint = if path.join("pytorch_model.bin").exists() {
            " (it has pytorch_model.bin: only safetensors is read; convert it or download model.safetensors)"
        } else {
            ""
        };
        return Err(Error::file(
            path,
            format!("folder holds no model.safetensors{hint}"),
        ));
    }
    if !path.exists() {
        return Err(Error::file(path, "no such file or folder"));
    }
    Ok(path.to_path_buf())
}

fn header_error(e: SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            "truncated: shorter than the 8-byte header length".into()
        }
        SafeTensorError::InvalidHeaderLength => {
            "truncated or not a safetensors file: the header length points past the end of the file"
                .into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "truncated (or with trailing bytes): the header's tensors do not cover the file exactly"
                .into()
        }
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("bad safetensors header: {e}")
        }
        other => format!("not a valid safetensors file: {other}"),
    }
}

impl WeightsFile {
    /// Opens a `.safetensors` file (or a folder with `model.safetensors`) and checks its header.
    pub fn open(path: &Path) -> Result<WeightsFile> {
        let path = resolve_weights_path(path)?;
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only; like every mmap user we assume nobody truncates
        // it while the engine runs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::file(&path, header_error(e)))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                Dtype::F32 => DiskDtype::F32,
                Dtype::F16 => DiskDtype::F16,
                Dtype::BF16 => DiskDtype::BF16,
                Dtype::I64 => DiskDtype::I64,
                other => {
                    return Err(Error::tensor(
                        &path,
                        name,
                        format!("unsupported dtype {other:?} (f32, f16 and bf16 are read)"),
                    ))
                }
            };
            let (s, e) = info.data_offsets;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                },
            );
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(WeightsFile {
            path,
            mmap: Arc::new(mmap),
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Tensor names in sorted order, `*.position_ids` buffers included.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "missing from the file"))
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.info(name)?.shape)
    }

    /// The tensor as f32, checked against `shape` and for NaN / infinity.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<F32Data> {
        let info = self.info(name)?;
        if info.shape != shape {
            return Err(Error::tensor(
                &self.path,
                name,
                format!(
                    "shape {:?} does not fit the model, expected {:?}",
                    info.shape, shape
                ),
            ));
        }
        let bytes = &self.mmap[info.start..info.end];
        let data = match info.dtype {
            DiskDtype::F32 => {
                if info.start % 4 == 0 {
                    F32Data::Mapped {
                        mmap: self.mmap.clone(),
                        start: info.start,
                        len: info.numel(),
                    }
                } else {
                    let v = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    F32Data::Owned(Arc::new(v))
                }
            }
            DiskDtype::F16 => F32Data::Owned(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            )),
            DiskDtype::BF16 => F32Data::Owned(Arc::new(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            )),
            DiskDtype::I64 => {
                return Err(Error::tensor(
                    &self.path,
                    name,
                    "is an integer buffer, expected floating-point weights",
                ))
            }
        };
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("holds a non-finite value ({}) at flat index {i}", data[i]),
            ));
        }
        Ok(data)
    }

    /// Number of floating-point parameters (position_ids buffers excluded).
    pub fn parameter_count(&self) -> usize {
        self.tensors
            .values()
            .filter(|t| t.dtype != DiskDtype::I64)
            .map(|t| t.numel())
            .sum()
    }
}

/// Buffers that are not parameters and are skipped on load.
pub fn is_skipped_buffer(name: &str) -> bool {
    name.ends_with(".position_ids")
}

/// Storage dtype of a written checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SaveDtype {
    F32,
    F16,
    Bf16,
}

/// One tensor ready for `safetensors::serialize_to_file`.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: SaveDtype) -> OwnedTensor {
        let (dtype, bytes) = match dtype {
            SaveDtype::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            SaveDtype::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            SaveDtype::Bf16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        };
        OwnedTensor {
            dtype,
            shape,
            bytes,
        }
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors (with string metadata) as one safetensors file, atomically (temp + rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, OwnedTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| Error::file(path, format!("cannot write: {e}")))
}
