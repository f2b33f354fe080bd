//! Opening a checkpoint: one `.safetensors` file, a folder with `model.safetensors.index.json`, or a
//! folder of shards. Every shard is memory-mapped and its header validated before any tensor is read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapOptions;

use crate::dtype::FloatSlice;
use crate::error::{Error, Result};
use crate::guard::GuardedMap;
use crate::header::{parse_header, parse_index};

pub use crate::header::TensorInfo;

/// The index file transformers writes beside sharded checkpoints.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// One mapped shard.
pub struct Shard {
    /// The shard's `.safetensors` file.
    pub path: PathBuf,
    /// Private copy-on-write mapping: readable by every thread, writable by Python without ever
    /// touching the file; guarded against the file being cut short underneath it (`guard`).
    pub map: Arc<GuardedMap>,
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
        let weight_map = parse_index(index, &text)?;
        let mut shard_names: Vec<&String> = weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut shards = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let p = root.join(name);
            if !p.is_file() {
                let tensor = weight_map
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
        Self::from_shards(root.to_path_buf(), shards, Some((index, &weight_map)))
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
        let map = self.shards[t.shard].map.mmap();
        let page = 4096;
        let start = t.start.div_ceil(page) * page;
        let end = (t.end / page * page).min(map.len());
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
            ckpt: self,
            info: t,
        })
    }

    /// Reads bytes `offset..offset + buf.len()` of tensor `t` with `pread` (no page of the mapping is
    /// touched). A file that has become too short is `ShardTruncated` naming the tensor.
    pub fn read_at(&self, t: &TensorInfo, offset: usize, buf: &mut [u8]) -> Result<()> {
        let shard = &self.shards[t.shard];
        let at = offset
            .checked_add(buf.len())
            .filter(|&end| end <= t.nbytes())
            .map(|_| t.start + offset)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "read of {} bytes at {offset} is outside tensor '{}' ({} bytes)",
                    buf.len(),
                    t.name,
                    t.nbytes()
                ))
            })?;
        shard
            .file
            .read_exact_at(buf, at as u64)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => self.truncated(t),
                _ => Error::io(&shard.path, e),
            })
    }

    /// Maps the pages of `t` into this process ahead of use (`MADV_POPULATE_READ`, Linux 5.14+): the
    /// kernel reads them in one pass instead of one page fault per 4 KiB on first touch. Kernels
    /// without it are ignored (the pages then fault in as they are used); a shard cut short since it
    /// was opened is `ShardTruncated` (the kernel refuses to populate pages past the file's end).
    pub fn populate(&self, t: &TensorInfo) -> Result<()> {
        #[cfg(target_os = "linux")]
        {
            let map = self.shards[t.shard].map.mmap();
            let page = 4096;
            let start = t.start / page * page;
            let end = t.end.min(map.len());
            if end > start {
                let _ = map.advise_range(memmap2::Advice::PopulateRead, start, end - start);
            }
        }
        self.check(t)
    }

    /// Runs `f` over bytes `a..b` of tensor `t` read in place through the mapping: made resident in one
    /// pass first (`MADV_POPULATE_READ`), dropped from this process after (`MADV_DONTNEED`: resident
    /// memory stays at one range per thread), then checked (`check`: zeros the guard put in for a file
    /// cut short are an error, not bytes). Faster than `read_at` for bytes that are only looked at once
    /// (no copy); `a..b` must lie inside the tensor.
    pub fn with_mapped<R>(
        &self,
        t: &TensorInfo,
        a: usize,
        b: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        if a > b || b > t.nbytes() {
            return Err(Error::Internal(format!(
                "bytes {a}..{b} are outside tensor '{}' ({} bytes)",
                t.name,
                t.nbytes()
            )));
        }
        let map = self.shards[t.shard].map.mmap();
        let (start, end) = (t.start + a, t.start + b);
        let page = 4096;
        #[cfg(target_os = "linux")]
        if end > start {
            let from = start / page * page;
            let _ = map.advise_range(memmap2::Advice::PopulateRead, from, end - from);
        }
        let out = f(&map[start..end]);
        let (lo, hi) = (start.div_ceil(page) * page, end / page * page);
        if hi > lo {
            // SAFETY: as in `release`: DONTNEED on a private file mapping drops this process's copies of
            // whole pages inside the range; later reads fault them back from the file. The only
            // reference into the range, `f`'s, has ended.
            unsafe {
                let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo);
            }
        }
        self.check(t)?;
        Ok(out)
    }

    /// Checks that the bytes of `t` are still the file's: the shard is at least as long as when it was
    /// opened up to the tensor's end, and the SIGBUS guard never replaced any of them by zeros (see
    /// `guard`). One `fstat`. The check points of every path that reads the mapping call it.
    pub fn check(&self, t: &TensorInfo) -> Result<()> {
        let shard = &self.shards[t.shard];
        let zeroed = shard.map.faulted().is_some_and(|off| off < t.end as u64);
        let len = shard
            .file
            .metadata()
            .map_err(|e| Error::io(&shard.path, e))?
            .len();
        if zeroed || len < t.end as u64 {
            return Err(self.truncated(t));
        }
        Ok(())
    }

    /// `check` for many tensors, with one `fstat` per shard.
    pub fn check_all<'a>(&self, ts: impl IntoIterator<Item = &'a TensorInfo>) -> Result<()> {
        let mut lens: HashMap<usize, u64> = HashMap::new();
        for t in ts {
            let shard = &self.shards[t.shard];
            let len = match lens.get(&t.shard) {
                Some(&l) => l,
                None => {
                    let l = shard
                        .file
                        .metadata()
                        .map_err(|e| Error::io(&shard.path, e))?
                        .len();
                    *lens.entry(t.shard).or_insert(l)
                }
            };
            let zeroed = shard.map.faulted().is_some_and(|off| off < t.end as u64);
            if zeroed || len < t.end as u64 {
                return Err(self.truncated(t));
            }
        }
        Ok(())
    }

    /// The error for tensor `t` of a shard that no longer holds its bytes.
    fn truncated(&self, t: &TensorInfo) -> Error {
        let shard = &self.shards[t.shard];
        let mut file_len = shard.file.metadata().map_or(0, |m| m.len());
        if let Some(off) = shard.map.faulted() {
            // The file was at most this long when the guard caught the fault.
            file_len = file_len.min(off);
        }
        Error::ShardTruncated {
            path: shard.path.clone(),
            tensor: t.name.clone(),
            end: t.end as u64,
            file_len,
        }
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.nbytes()).sum()
    }
}

/// Maps one shard and validates its header (`header::parse_header`).
fn map_shard(path: &Path) -> Result<(Shard, Vec<TensorInfo>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(Error::InvalidHeader {
            path: path.to_path_buf(),
            tensor: String::new(),
            reason: format!("file is {file_len} bytes, shorter than the 8-byte header length"),
        });
    }
    // SAFETY: a private (copy-on-write) mapping: writes through it never reach the file. Another
    // process cutting the file short while it is mapped would raise SIGBUS on access to the lost
    // pages; `GuardedMap` catches that (zero pages, then `check` reports the tensor).
    let map = unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?;
    let map = GuardedMap::new(map);
    let header = parse_header(path, &map)?;
    if map.faulted().is_some() {
        // Cut short while the header was being read.
        let file_len = file.metadata().map_or(0, |m| m.len());
        return Err(Error::InvalidHeader {
            path: path.to_path_buf(),
            tensor: String::new(),
            reason: format!("the file shrank to {file_len} bytes while its header was read"),
        });
    }
    let shard = Shard {
        file,
        path: path.to_path_buf(),
        map: Arc::new(map),
        metadata: header.metadata,
        data_start: header.data_start,
    };
    Ok((shard, header.tensors))
}

/// Reads a float tensor chunk by chunk with `pread` into a per-thread buffer (see `ChunkSource`).
pub struct TensorReader<'a> {
    ckpt: &'a Checkpoint,
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
        let size = self.info.dtype.size();
        let (a, b) = (start * size, end * size);
        CHUNK_BUF.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.resize(b - a, 0);
            self.ckpt.read_at(self.info, a, &mut buf[..])?;
            let x = FloatSlice::new(self.info.dtype, &buf[..])
                .expect("float dtype checked in reader()");
            f(x)
        })
    }
}
