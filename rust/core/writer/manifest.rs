//! `fastq-manifest.json`: the conversion's parameters and, for every finished shard, its size, its
//! checksum (`digest`: SHA-256 of its chunks' SHA-256s) and the digest of the source bytes it was made
//! from (`sources`). A shard is recorded only once it is complete, hashed and (optionally) synced, so a
//! resumed run keeps exactly the shards the manifest vouches for after checking their bytes again, and
//! only while their sources still hold the bytes they were made from.
//!
//! Hashing runs on its own thread: the writer hands it each 16 MiB chunk as soon as the chunk's bytes
//! are all written (`Hasher::chunk`), so a shard's checksum is ready almost as soon as its last tensor
//! is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

use super::digest::{chunk_digest, combine, file_checksum, CHUNK};

/// The manifest's file name, in the output folder.
pub const MANIFEST_NAME: &str = "fastq-manifest.json";
const FORMAT: &str = "fastq-manifest/1";
/// How `ShardRecord::digest` is computed (see `digest`).
pub const DIGEST: &str = "sha256 of the sha256 of each 16 MiB chunk";

/// A finished shard.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardRecord {
    /// File size in bytes.
    pub size: u64,
    /// Bytes of tensor data (the shard's share of the index's `total_size`).
    pub data_size: u64,
    /// Lowercase hex SHA-256 of the SHA-256 digests of the file's 16 MiB chunks (`digest` module).
    pub digest: String,
    /// The digest of the source tensors the shard was made from (`sources` module); empty in a
    /// manifest written before fastq recorded it, which makes a resumed run write the shard again.
    #[serde(default)]
    pub source: String,
}

/// The manifest's contents.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The manifest format's version, "fastq-manifest/1".
    pub format: String,
    /// The version of fastq that wrote it.
    pub fastq_version: String,
    /// `DIGEST`.
    pub digest: String,
    /// The caller's conversion parameters (source, quantization config, dtype, shard size...).
    pub params: serde_json::Value,
    /// `Layout::fingerprint`.
    pub layout: String,
    /// The finished shards, by file name.
    pub shards: BTreeMap<String, ShardRecord>,
}

impl Manifest {
    /// An empty manifest for a new run.
    pub fn new(params: serde_json::Value, layout: String) -> Self {
        Manifest {
            format: FORMAT.into(),
            fastq_version: env!("CARGO_PKG_VERSION").into(),
            digest: DIGEST.into(),
            params,
            layout,
            shards: BTreeMap::new(),
        }
    }

    /// Reads the manifest of `dir` for a resumed run: None when there is none (the previous run
    /// stopped before its first shard); an error when it records another conversion.
    pub fn load_for_resume(
        dir: &Path,
        params: &serde_json::Value,
        layout: &str,
    ) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_NAME);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| Error::InvalidHeader {
            path: path.clone(),
            tensor: String::new(),
            reason: format!("not a fastq manifest: {e}"),
        })?;
        let differs = |what: &str| {
            Error::InvalidArgument(format!(
                "{}: the interrupted conversion had other {what}; cannot resume it (run without resume to start over)",
                path.display()
            ))
        };
        if m.format != FORMAT || m.digest != DIGEST {
            return Err(differs("manifest format"));
        }
        if &m.params != params {
            return Err(differs("parameters"));
        }
        if m.layout != layout {
            return Err(differs("output layout (source or plan changed)"));
        }
        Ok(Some(m))
    }

    /// Writes the manifest atomically (temporary file, then rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_NAME);
        let tmp = dir.join(format!("{MANIFEST_NAME}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("manifest serializes");
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

/// Whether `path` is the shard `record` describes (size, then checksum).
pub fn verify(path: &Path, record: &ShardRecord) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == record.size => Ok(file_checksum(path)? == record.digest),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

enum Msg {
    /// Bytes `start..end` of shard `shard` (its chunk `index`) are final: hash them.
    Chunk {
        shard: usize,
        index: usize,
        start: u64,
        end: u64,
    },
    /// Shard `shard` is complete (all its `chunks` were sent); record it.
    Finish {
        shard: usize,
        name: String,
        file: File,
        size: u64,
        data_size: u64,
        chunks: usize,
    },
}

/// The hashing and recording thread.
pub struct Hasher {
    tx: Option<Sender<Msg>>,
    handle: Option<JoinHandle<Result<Manifest>>>,
}

impl Hasher {
    /// Starts the thread; it owns `manifest` and saves it to `dir` after each finished shard.
    /// `paths[i]` is the file of shard `i`, `sources[i]` the digest of its sources.
    pub fn start(
        dir: PathBuf,
        paths: Vec<PathBuf>,
        sources: Vec<String>,
        manifest: Manifest,
        fsync: bool,
    ) -> Result<Self> {
        let (tx, rx) = channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("fastq-hash".into())
            .spawn(move || -> Result<Manifest> {
                let mut manifest = manifest;
                let mut readers: BTreeMap<usize, File> = BTreeMap::new();
                let mut digests: BTreeMap<usize, Vec<Option<[u8; 32]>>> = BTreeMap::new();
                let mut buf = Vec::with_capacity(CHUNK as usize);
                for msg in rx {
                    match msg {
                        Msg::Chunk {
                            shard,
                            index,
                            start,
                            end,
                        } => {
                            let path = &paths[shard];
                            if let std::collections::btree_map::Entry::Vacant(v) =
                                readers.entry(shard)
                            {
                                v.insert(File::open(path).map_err(|e| Error::io(path, e))?);
                            }
                            let d = chunk_digest(&readers[&shard], path, start, end, &mut buf)?;
                            let v = digests.entry(shard).or_default();
                            if v.len() <= index {
                                v.resize(index + 1, None);
                            }
                            v[index] = Some(d);
                        }
                        Msg::Finish {
                            shard,
                            name,
                            file,
                            size,
                            data_size,
                            chunks,
                        } => {
                            readers.remove(&shard);
                            let v = digests.remove(&shard).unwrap_or_default();
                            let all: Option<Vec<[u8; 32]>> =
                                (0..chunks).map(|k| v.get(k).copied().flatten()).collect();
                            let path = &paths[shard];
                            let all = all.ok_or_else(|| {
                                Error::Internal(format!(
                                    "{}: a chunk was not hashed before the shard closed",
                                    path.display()
                                ))
                            })?;
                            if fsync {
                                file.sync_all().map_err(|e| Error::io(path, e))?;
                            }
                            let record = ShardRecord {
                                size,
                                data_size,
                                digest: combine(&all),
                                source: sources.get(shard).cloned().unwrap_or_default(),
                            };
                            manifest.shards.insert(name, record);
                            manifest.save(&dir)?;
                        }
                    }
                }
                Ok(manifest)
            })
            .map_err(|e| Error::Internal(format!("cannot start the hashing thread: {e}")))?;
        Ok(Hasher {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Chunk `index` (bytes `start..end`) of shard `shard` is written and will not change.
    pub fn chunk(&self, shard: usize, index: usize, start: u64, end: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Chunk {
                shard,
                index,
                start,
                end,
            });
        }
    }

    /// Shard `shard` is complete (`size` bytes, all `chunks` sent): sync it and record it.
    pub fn finish(
        &self,
        shard: usize,
        name: String,
        file: File,
        size: u64,
        data_size: u64,
        chunks: usize,
    ) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Finish {
                shard,
                name,
                file,
                size,
                data_size,
                chunks,
            });
        }
    }

    /// True when the thread stopped early (an error, returned by `join`).
    pub fn is_dead(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for every queued shard to be recorded; returns the final manifest.
    pub fn join(mut self) -> Result<Manifest> {
        drop(self.tx.take());
        let handle = self.handle.take().expect("joined once");
        handle
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the hashing thread panicked".into())))
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
