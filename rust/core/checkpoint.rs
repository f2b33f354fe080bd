//! Opening a checkpoint: one `.safetensors` file, a folder with `model.safetensors.index.json`, or a
//! folder of shards. Every shard is memory-mapped and its header validated before any tensor is read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::dtype::{Dtype, FloatSlice};
use crate::error::{Error, Result};

/// The index file transformers writes beside sharded checkpoints.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// Largest header we accept (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name, the key of its safetensors header entry.
    pub name: String,
    /// The header entry's `dtype`.
    pub dtype: Dtype,
    /// The header entry's `shape`.
    pub shape: Vec<usize>,
    /// Index into `Checkpoint::shards`.
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub start: usize,
    /// End of that range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// One mapped shard.
pub struct Shard {
    /// The shard's `.safetensors` file.
    pub path: PathBuf,
    /// Private copy-on-write mapping: readable by every thread, writable by Python without ever
    /// touching the file.
    pub map: Arc<MmapMut>,
    /// The header's `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
    /// Start of the data section.
    pub data_start: usize,
    /// The open file, for positioned reads (`TensorReader`).
    pub file: File,
}

/// An opened, validated checkpoint.
pub struct Checkpoint {
    /// The path `open` was given: the file, or the folder of shards.
    pub root: PathBuf,
    /// The mapped shards, sorted by file name (`TensorInfo::shard` indexes them).
    pub shards: Vec<Shard>,
    /// Tensors in shard order, then file order within a shard.
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

#[derive(serde::Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a file or a folder (see module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            let shard = map_shard(path)?;
            return Self::from_shards(path.to_path_buf(), vec![shard], None);
        }
        let index = path.join(INDEX_NAME);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::NotFound {
                path: path.join("*.safetensors"),
            });
        }
        let shards = files
            .iter()
            .map(|f| map_shard(f))
            .collect::<Result<Vec<_>>>()?;
        Self::from_shards(path.to_path_buf(), shards, None)
    }

    fn open_index(root: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let raw: RawIndex = serde_json::from_slice(&text).map_err(|e| Error::InvalidHeader {
            path: index.to_path_buf(),
            reason: format!("bad index JSON: {e}"),
        })?;
        let mut shard_names: Vec<&String> = raw.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut shards = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let p = root.join(name);
            if !p.is_file() {
                let tensor = raw
                    .weight_map
                    .iter()
                    .find(|(_, s)| s == name)
                    .map(|(t, _)| t.clone())
                    .unwrap_or_default();
                return Err(Error::MissingShard {
                    index: index.to_path_buf(),
                    shard: (*name).clone(),
                    tensor,
                });
            }
            shards.push(map_shard(&p)?);
        }
        Self::from_shards(root.to_path_buf(), shards, Some((index, &raw.weight_map)))
    }

    fn from_shards(
        root: PathBuf,
        shards: Vec<(Shard, Vec<TensorInfo>)>,
        index: Option<(&Path, &BTreeMap<String, String>)>,
    ) -> Result<Self> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        let mut out_shards = Vec::with_capacity(shards.len());
        for (i, (shard, infos)) in shards.into_iter().enumerate() {
            for mut t in infos {
                t.shard = i;
                if let Some(&prev) = by_name.get(&t.name) {
                    let prev: &TensorInfo = &tensors[prev];
                    return Err(Error::DuplicateTensor {
                        tensor: t.name,
                        first: out_shards
                            .get(prev.shard)
                            .map_or(shard.path.clone(), |s: &Shard| s.path.clone()),
                        second: shard.path.clone(),
                    });
                }
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(t);
            }
            out_shards.push(shard);
        }
        if let Some((index, map)) = index {
            for (tensor, shard_name) in map {
                let found = by_name
                    .get(tensor)
                    .map(|&i| &out_shards[tensors[i].shard].path);
                let ok = found.is_some_and(|p| {
                    p.file_name()
                        .is_some_and(|f| f.to_string_lossy() == *shard_name)
                });
                if !ok {
                    return Err(Error::IndexMismatch {
                        index: index.to_path_buf(),
                        shard: shard_name.clone(),
                        tensor: tensor.clone(),
                    });
                }
            }
        }
        Ok(Checkpoint {
            root,
            shards: out_shards,
            tensors,
            by_name,
        })
    }

    /// All tensors, shard by shard in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::UnknownTensor {
                path: self.root.clone(),
                tensor: name.to_string(),
            })
    }

    /// The path of the shard holding `t`.
    pub fn path_of(&self, t: &TensorInfo) -> &Path {
        &self.shards[t.shard].path
    }

    /// The raw bytes of a tensor, straight from the mapping.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.shards[t.shard].map[t.start..t.end]
    }

    /// The tensor as floats for the quantizers; other dtypes are an `UnsupportedDtype` error.
    pub fn floats(&self, t: &TensorInfo) -> Result<FloatSlice<'_>> {
        FloatSlice::new(t.dtype, self.bytes(t)).ok_or_else(|| Error::UnsupportedDtype {
            path: self.path_of(t).to_path_buf(),
            tensor: t.name.clone(),
            dtype: t.dtype.to_string(),
        })
    }

    /// Tells the kernel the pages of `t` are no longer needed by this process, so that resident memory
    /// stays bounded by what is in flight (the page cache keeps them for other readers). Pages Python
    /// wrote to in this range are discarded too; the pipeline calls it only for tensors it consumed.
    pub fn release(&self, t: &TensorInfo) {
        let map = &self.shards[t.shard].map;
        let page = 4096;
        let start = t.start.div_ceil(page) * page;
        let end = t.end / page * page;
        if end > start {
            // SAFETY: DONTNEED on a private file mapping drops our copies of the pages; later reads
            // fault them back from the file. No Rust reference into the range outlives the caller's
            // use of the tensor (the pipeline calls this after the tensor's result is built).
            unsafe {
                let _ = map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                );
            }
        }
    }

    /// A reader of `t` that fetches chunks with positioned reads instead of touching the mapping.
    pub fn reader<'a>(&'a self, t: &'a TensorInfo) -> Result<TensorReader<'a>> {
        if !t.dtype.is_float_input() {
            return Err(Error::UnsupportedDtype {
                path: self.path_of(t).to_path_buf(),
                tensor: t.name.clone(),
                dtype: t.dtype.to_string(),
            });
        }
        Ok(TensorReader {
            shard: &self.shards[t.shard],
            info: t,
        })
    }

    /// Maps the pages of `t` into this process ahead of use (`MADV_POPULATE_READ`, Linux 5.14+): the
    /// kernel reads them in one pass instead of one page fault per 4 KiB on first touch. Errors (older
    /// kernels) are ignored: the pages then fault in as they are used.
    pub fn populate(&self, t: &TensorInfo) {
        #[cfg(target_os = "linux")]
        {
            let map = &self.shards[t.shard].map;
            let page = 4096;
            let start = t.start / page * page;
            let end = t.end.min(map.len());
            if end > start {
                let _ = map.advise_range(memmap2::Advice::PopulateRead, start, end - start);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = t;
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.nbytes()).sum()
    }
}

/// Maps one shard and validates its header.
fn map_shard(path: &Path) -> Result<(Shard, Vec<TensorInfo>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let invalid = |reason: String| Error::InvalidHeader {
        path: path.to_path_buf(),
        reason,
    };
    if file_len < 8 {
        return Err(invalid(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    // SAFETY: a private (copy-on-write) mapping: writes through it never reach the file. Another
    // process truncating the file while it is mapped would fault on access; that is the same contract
    // as safetensors' own mmap, and the header checks below catch files that are short to begin with.
    let map = unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER {
        return Err(invalid(format!(
            "header length {header_len} exceeds the {MAX_HEADER}-byte limit"
        )));
    }
    if 8 + header_len > file_len {
        return Err(invalid(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file"
        )));
    }
    let data_start = 8 + header_len as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&map[8..data_start])
            .map_err(|e| invalid(format!("header is not a JSON object: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut infos = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            if let serde_json::Value::Object(m) = value {
                for (k, v) in m {
                    metadata.insert(
                        k,
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    );
                }
            }
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| invalid(format!("entry for tensor '{name}' is malformed: {e}")))?;
        let dtype = Dtype::parse(&raw.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype: raw.dtype.clone(),
        })?;
        let (begin, end) = raw.data_offsets;
        if end < begin {
            return Err(invalid(format!(
                "tensor '{name}' has data_offsets [{begin}, {end}] that run backwards"
            )));
        }
        let numel = raw
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let expected = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
        if expected != Some(end - begin) {
            return Err(Error::SizeMismatch {
                path: path.to_path_buf(),
                tensor: name,
                shape: raw.shape,
                dtype: dtype.to_string(),
                expected: expected.unwrap_or(u64::MAX),
                actual: end - begin,
            });
        }
        let abs_end = data_start as u64 + end;
        if abs_end > file_len {
            return Err(Error::ShardTruncated {
                path: path.to_path_buf(),
                tensor: name,
                end: abs_end,
                file_len,
            });
        }
        infos.push(TensorInfo {
            name,
            dtype,
            shape: raw.shape,
            shard: 0,
            start: data_start + begin as usize,
            end: data_start + end as usize,
        });
    }
    infos.sort_by_key(|t| (t.start, t.end));
    for w in infos.windows(2) {
        if w[1].start < w[0].end {
            return Err(Error::Overlap {
                path: path.to_path_buf(),
                first: w[0].name.clone(),
                second: w[1].name.clone(),
            });
        }
    }
    let shard = Shard {
        file,
        path: path.to_path_buf(),
        map: Arc::new(map),
        metadata,
        data_start,
    };
    Ok((shard, infos))
}

/// Reads a float tensor chunk by chunk with `pread` into a per-thread buffer (see `ChunkSource`).
pub struct TensorReader<'a> {
    shard: &'a Shard,
    info: &'a TensorInfo,
}

thread_local! {
    static CHUNK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl crate::pack::ChunkSource for TensorReader<'_> {
    fn len(&self) -> usize {
        self.info.numel()
    }

    fn with_chunk<R>(
        &self,
        start: usize,
        end: usize,
        f: impl FnOnce(FloatSlice) -> Result<R>,
    ) -> Result<R> {
        use std::os::unix::fs::FileExt;
        let size = self.info.dtype.size();
        let (a, b) = (start * size, end * size);
        CHUNK_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(b - a, 0);
            self.shard
                .file
                .read_exact_at(&mut buf[..], (self.info.start + a) as u64)
                .map_err(|e| Error::io(&self.shard.path, e))?;
            let x = FloatSlice::new(self.info.dtype, &buf[..])
                .expect("float dtype checked in reader()");
            f(x)
        })
    }
}
