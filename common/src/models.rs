//! The registry of pinned models (`common/models.json`, shared with `scripts/fetch_models.py`) and the model cache.

use std::path::{Path, PathBuf};

const MANIFEST: &str = include_str!("../models.json");

/// One pinned model: its short name, file name in the cache, size and sha256.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ModelSpec {
    pub name: String,
    pub title: String,
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(serde::Deserialize)]
struct Manifest {
    models: Vec<ModelSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelLookupError {
    #[error("unknown model {name:?}: use one of {known} or a path to a .gguf file")]
    Unknown { name: String, known: String },
    #[error(
        "model {name} is not in the cache ({path}): run `just models` (or scripts/fetch_models.py {name})"
    )]
    NotFetched { name: String, path: PathBuf },
    #[error(
        "{path}: size {found} bytes, expected {expected}: the file is truncated or not the pinned {name}"
    )]
    WrongSize {
        name: String,
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path}: sha256 {found}, expected {expected}: not the pinned weights of {name}")]
    WrongHash {
        name: String,
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("the weights received for {name}: {problem}")]
    BadWeights { name: String, problem: String },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// All pinned models.
pub fn registry() -> Vec<ModelSpec> {
    serde_json::from_str::<Manifest>(MANIFEST)
        .expect("common/models.json is valid")
        .models
}

/// The model cache: `$TANDEM_MODELS`, else `~/.cache/tandem/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tandem").join("models")
}

pub fn spec(name: &str) -> Option<ModelSpec> {
    registry().into_iter().find(|m| m.name == name)
}

/// The registry model `name`, or an error listing the known ones.
pub fn lookup(name: &str) -> Result<ModelSpec, ModelLookupError> {
    spec(name).ok_or_else(|| ModelLookupError::Unknown {
        name: name.to_string(),
        known: registry()
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Resolves a model name (`smollm2`, `qwen-0.5b`, `qwen-1.5b`) or a path to a `.gguf` file.
///
/// A registered model must be in the cache with the pinned size; its hash is checked by [`verify_sha256`]
/// (the fetch script stamps verified files, so this is cheap on every start).
pub fn resolve(name_or_path: &str) -> Result<PathBuf, ModelLookupError> {
    let as_path = Path::new(name_or_path);
    if name_or_path.ends_with(".gguf") || as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    let m = lookup(name_or_path)?;
    let path = cache_dir().join(&m.file);
    let meta = std::fs::metadata(&path).map_err(|_| ModelLookupError::NotFetched {
        name: m.name.clone(),
        path: path.clone(),
    })?;
    if meta.len() != m.size {
        return Err(ModelLookupError::WrongSize {
            name: m.name,
            path,
            found: meta.len(),
            expected: m.size,
        });
    }
    verify_sha256(&m, &path)?;
    Ok(path)
}

/// Checks weights received over a network (a browser's or a host's download) against the pinned size and sha256
/// of the registry model `name`.
pub fn check_weights(name: &str, bytes: &[u8]) -> Result<ModelSpec, ModelLookupError> {
    let m = lookup(name)?;
    let bad = |problem| ModelLookupError::BadWeights {
        name: name.to_string(),
        problem,
    };
    if bytes.len() as u64 != m.size {
        return Err(bad(format!(
            "{} bytes, expected {}: truncated or not the pinned file",
            bytes.len(),
            m.size
        )));
    }
    use sha2::Digest;
    let found = format!("{:x}", sha2::Sha256::digest(bytes));
    if found != m.sha256 {
        return Err(bad(format!(
            "sha256 {found}, expected {}: not the pinned weights",
            m.sha256
        )));
    }
    Ok(m)
}

/// Checks a cached model's sha256, trusting the fetch script's stamp (`FILE.verified`: hash, size, mtime) when it
/// matches the file as it is now, and hashing the whole file otherwise.
pub fn verify_sha256(m: &ModelSpec, path: &Path) -> Result<(), ModelLookupError> {
    use std::io::Read;
    let io = |source| ModelLookupError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let stamp_path = path.with_file_name(format!("{}.verified", m.file));
    #[cfg(unix)]
    let mtime_ns = {
        use std::os::unix::fs::MetadataExt;
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
    };
    #[cfg(not(unix))]
    let mtime_ns = 0i128;
    if let Ok(stamp) = std::fs::read_to_string(&stamp_path)
        && stamp.trim() == format!("{} {} {}", m.sha256, meta.len(), mtime_ns)
    {
        return Ok(());
    }
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let found = format!("{:x}", h.finalize());
    if found != m.sha256 {
        return Err(ModelLookupError::WrongHash {
            name: m.name.clone(),
            path: path.to_path_buf(),
            found,
            expected: m.sha256.clone(),
        });
    }
    Ok(())
}
