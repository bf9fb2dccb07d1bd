//! GGUF reader: header, metadata and tensor index, every read bounds-checked.
//!
//! A truncated or corrupt file yields a [`GgufError`] naming what is wrong and where; nothing here indexes
//! out of bounds or allocates more than the file could describe. Tensor data is not copied: [`Gguf::tensor_bytes`]
//! hands out slices of the shared buffer, so weights stay quantized exactly as stored.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: magic bytes are {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error(
        "GGUF file is truncated: {what} at byte {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("GGUF metadata key {key:?} has unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("GGUF string at byte {offset} is not valid UTF-8")]
    BadUtf8 { offset: u64 },
    #[error("GGUF tensor {name:?}: {problem}")]
    BadTensor { name: String, problem: String },
    #[error("GGUF metadata key {0:?} is missing")]
    MissingKey(String),
    #[error("GGUF metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("GGUF tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("reading GGUF file: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One metadata value. Arrays keep their element values (tokenizer vocabularies are arrays of strings).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// Any integer value that fits a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// Where one tensor lies in the file. `dims` are in GGML order: `dims[0]` is the contiguous (row) length.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file over a shared, immutable buffer.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let available = (self.buf.len() - self.pos) as u64;
        if n > available {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { offset })
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => Value::Bool(self.array::<1>(&what)?[0] != 0),
            8 => Value::String(self.string(&what)?),
            9 => {
                let elem_ty = self.u32(&what)?;
                let len = self.u64(&what)?;
                // Every element takes at least one byte: a length beyond the bytes left is corrupt, and checking
                // it first keeps a hostile length from reserving memory the file cannot back.
                let left = (self.buf.len() - self.pos) as u64;
                if len > left {
                    return Err(GgufError::Truncated {
                        what: format!("array of {len} elements for metadata key {key:?}"),
                        offset: self.pos as u64,
                        needed: len,
                        available: left,
                    });
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem_ty, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => {
                return Err(GgufError::BadValueType {
                    key: key.to_string(),
                    ty,
                });
            }
        })
    }
}

impl Gguf {
    /// Reads a GGUF file. Natively the file is memory-mapped, so resident memory grows only with the pages used.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the mapping is read-only; the model cache is not modified while a model is loaded (files are
        // replaced by rename, which leaves an open mapping intact).
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Self::parse(Arc::new(map))
    }

    /// Parses a GGUF image held in memory (a download in the browser, a test fixture).
    pub fn parse(data: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<Self> {
        let buf: &[u8] = (*data).as_ref();
        let mut r = Reader { buf, pos: 0 };
        let magic: [u8; 4] = r.array(&|| "magic".into())?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64(&|| "tensor count".into())?;
        let kv_count = r.u64(&|| "metadata count".into())?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&|| format!("key of metadata entry {i}"))?;
            let ty = r.u32(&|| format!("type of metadata key {key:?}"))?;
            let value = r.value(ty, &key)?;
            metadata.insert(key, value);
        }

        let mut infos = Vec::new();
        for i in 0..tensor_count {
            let name = r.string(&|| format!("name of tensor {i}"))?;
            let what = || format!("header of tensor {name:?}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::BadTensor {
                    name,
                    problem: format!("{n_dims} dimensions (1 to 4 allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let raw_ty = r.u32(&what)?;
            let offset = r.u64(&what)?;
            let ty = GgmlType::from_u32(raw_ty).ok_or_else(|| GgufError::BadTensor {
                name: name.clone(),
                problem: format!("unknown type id {raw_ty}"),
            })?;
            infos.push((name, dims, ty, offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::BadTensor {
                        name: "general.alignment".into(),
                        problem: format!("alignment {v:?} is not a power of two"),
                    });
                }
            },
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;

        let mut tensors = BTreeMap::new();
        for (name, dims, ty, rel) in infos {
            let bad = |problem: String| GgufError::BadTensor {
                name: name.clone(),
                problem,
            };
            let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let elements = elements.ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of {:?}'s block of {}",
                    dims[0],
                    ty,
                    ty.block_len()
                )));
            }
            let size = (elements / ty.block_len() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow in bytes")))?;
            let offset = data_start
                .checked_add(rel)
                .ok_or_else(|| bad(format!("offset {rel} overflows")))?;
            if rel % alignment != 0 {
                return Err(bad(format!("offset {rel} is not aligned to {alignment}")));
            }
            if offset.checked_add(size).is_none_or(|end| end > file_len) {
                return Err(GgufError::Truncated {
                    what: format!("data of tensor {name:?} ({size} bytes)"),
                    offset,
                    needed: size,
                    available: file_len.saturating_sub(offset),
                });
            }
            if tensors.contains_key(&name) {
                return Err(bad("appears twice".into()));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    ty,
                    offset,
                    size,
                },
            );
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            data,
        })
    }

    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "integer",
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            found: v.type_name(),
            expected: "number",
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "string",
            }),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            v => Err(GgufError::WrongType {
                key: key.into(),
                found: v.type_name(),
                expected: "array",
            }),
        }
    }

    /// An array of strings (tokenizer vocabulary, merges).
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(GgufError::WrongType {
                    key: key.into(),
                    found: v.type_name(),
                    expected: "array of strings",
                }),
            })
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The raw (still quantized) bytes of a tensor; bounds were checked when the file was parsed.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &(*self.data).as_ref()[info.offset as usize..(info.offset + info.size) as usize]
    }

    /// The whole backing buffer, shared: weights borrow from it without copying.
    pub fn buffer(&self) -> Arc<dyn AsRef<[u8]> + Send + Sync> {
        self.data.clone()
    }
}
