//! Calibration and evaluation text that exists on every machine this project runs on, written by no one here:
//! Python's standard library (code), Rust's own library sources when the toolchain has `rust-src` (code), and
//! prose — the Python documentation's sources when Debian's `python3.11-doc` is installed, and Debian's licence
//! texts (always there). Split by file, by a hash of its name, into calibration (80%) and held-out (20%) sets; the
//! manifest records every file, its sha256 and its set, and has a hash of its own that the alignment records.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Python,
    Rust,
    Prose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Calibration,
    HeldOut,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorpusFile {
    pub kind: Kind,
    /// Path relative to its source's root.
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub split: Split,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Where each kind came from on this machine.
    pub roots: Vec<(Kind, PathBuf)>,
    pub files: Vec<CorpusFile>,
}

/// Files smaller than this carry too little text to fill a chunk.
const MIN_BYTES: u64 = 2_000;

impl Manifest {
    /// Finds the sources on this machine.
    pub fn discover() -> anyhow::Result<Manifest> {
        let mut roots = Vec::new();
        if let Some(stdlib) = command_line(
            "python3",
            &[
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
            ],
        ) {
            roots.push((Kind::Python, PathBuf::from(stdlib)));
        }
        // The toolchain in use, else nightly (CI installs `rust-src` there for the threaded browser build).
        let sysroots = [
            command_line("rustc", &["--print", "sysroot"]),
            command_line("rustup", &["run", "nightly", "rustc", "--print", "sysroot"]),
        ];
        if let Some(lib) = sysroots
            .into_iter()
            .flatten()
            .map(|s| Path::new(&s).join("lib/rustlib/src/rust/library"))
            .find(|l| l.is_dir())
        {
            roots.push((Kind::Rust, lib));
        }
        for prose in [
            "/usr/share/doc/python3.11/html/_sources",
            "/usr/share/common-licenses",
        ] {
            if Path::new(prose).is_dir() {
                roots.push((Kind::Prose, PathBuf::from(prose)));
            }
        }
        let mut files = Vec::new();
        for (kind, root) in &roots {
            let ext: &[&str] = match kind {
                Kind::Python => &["py"],
                Kind::Rust => &["rs"],
                Kind::Prose => &["txt", ""],
            };
            // The standard library's top level and Rust's core/alloc/std: enough text, no tests or vendored code.
            let depth = if *kind == Kind::Python { 1 } else { 8 };
            let mut found = Vec::new();
            walk(root, depth, &mut |p| {
                let e = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                let keep = ext.contains(&e)
                    && (*kind != Kind::Rust
                        || ["core/src/", "alloc/src/", "std/src/"]
                            .iter()
                            .any(|d| rel(root, p).starts_with(d)));
                if keep {
                    found.push(p.to_path_buf());
                }
            });
            found.sort();
            for path in found {
                let bytes = std::fs::read(&path)?;
                if (bytes.len() as u64) < MIN_BYTES || std::str::from_utf8(&bytes).is_err() {
                    continue;
                }
                let name = rel(root, &path);
                let sha256 = hex(&Sha256::digest(&bytes));
                let split = if Sha256::digest(format!("{kind:?}/{name}"))[0] < 205 {
                    Split::Calibration
                } else {
                    Split::HeldOut
                };
                files.push(CorpusFile {
                    kind: *kind,
                    name,
                    path,
                    sha256,
                    bytes: bytes.len() as u64,
                    split,
                });
            }
        }
        anyhow::ensure!(
            files.iter().any(|f| f.split == Split::Calibration)
                && files.iter().any(|f| f.split == Split::HeldOut),
            "no calibration text found (looked for Python's standard library, Rust's library sources, Debian's \
             licences and the Python docs)"
        );
        Ok(Manifest { roots, files })
    }

    /// sha256 over every file's kind, name, hash and set.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.files {
            h.update(format!(
                "{:?}\t{}\t{}\t{:?}\n",
                f.kind, f.name, f.sha256, f.split
            ));
        }
        hex(&h.finalize())
    }

    /// Up to `n` files of `split`, taken in turn from each kind (so code and prose both count), in a fixed order.
    pub fn pick(&self, split: Split, n: usize) -> Vec<&CorpusFile> {
        let by_kind: Vec<Vec<&CorpusFile>> = [Kind::Python, Kind::Rust, Kind::Prose]
            .iter()
            .map(|k| {
                let mut v: Vec<&CorpusFile> = self
                    .files
                    .iter()
                    .filter(|f| f.kind == *k && f.split == split)
                    .collect();
                // Spread over the alphabet rather than the first few files.
                v.sort_by_key(|f| Sha256::digest(&f.name)[..8].to_vec());
                v
            })
            .collect();
        let mut out = Vec::new();
        for i in 0.. {
            let before = out.len();
            for files in &by_kind {
                if let Some(f) = files.get(i)
                    && out.len() < n
                {
                    out.push(*f);
                }
            }
            if out.len() == n || out.len() == before {
                break;
            }
        }
        out
    }
}

fn walk(dir: &Path, depth: usize, found: &mut dyn FnMut(&Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() && depth > 1 => walk(&p, depth - 1, found),
            Ok(t) if t.is_file() => found(&p),
            _ => {}
        }
    }
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
