//! `fastq-manifest.json`: the conversion's parameters and, for every finished shard, its size and
//! sha256. A shard is recorded only once it is complete, hashed and (optionally) synced, so a resumed
//! run keeps exactly the shards the manifest vouches for after checking their bytes again.
//!
//! Hashing runs on its own thread and follows each shard's written prefix (`Hasher::extend`), so a
//! shard's checksum is ready almost as soon as its last tensor is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The manifest's file name, in the output folder.
pub const MANIFEST_NAME: &str = "fastq-manifest.json";
const FORMAT: &str = "fastq-manifest/1";

/// A finished shard.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardRecord {
    /// File size in bytes.
    pub size: u64,
    /// Bytes of tensor data (the shard's share of the index's `total_size`).
    pub data_size: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
}

/// The manifest's contents.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub fastq_version: String,
    /// The caller's conversion parameters (source, quantization config, dtype, shard size...).
    pub params: serde_json::Value,
    /// `Layout::fingerprint`.
    pub layout: String,
    pub shards: BTreeMap<String, ShardRecord>,
}

impl Manifest {
    /// An empty manifest for a new run.
    pub fn new(params: serde_json::Value, layout: String) -> Self {
        Manifest {
            format: FORMAT.into(),
            fastq_version: env!("CARGO_PKG_VERSION").into(),
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
            reason: format!("not a fastq manifest: {e}"),
        })?;
        let differs = |what: &str| {
            Error::InvalidArgument(format!(
                "{}: the interrupted conversion had other {what}; cannot resume it (run without resume to start over)",
                path.display()
            ))
        };
        if m.format != FORMAT {
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

/// sha256 of a whole file, in lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Whether `path` is the shard `record` describes (size, then checksum).
pub fn verify(path: &Path, record: &ShardRecord) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == record.size => Ok(sha256_file(path)? == record.sha256),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

enum Msg {
    /// Bytes `..upto` of shard `shard` are final.
    Extend { shard: usize, upto: u64 },
    /// Shard `shard` is complete; record it.
    Finish {
        shard: usize,
        name: String,
        file: File,
        size: u64,
        data_size: u64,
    },
}

struct Running {
    path: PathBuf,
    reader: File,
    hash: Sha256,
    done: u64,
}

impl Running {
    fn advance(&mut self, upto: u64, buf: &mut [u8]) -> Result<()> {
        while self.done < upto {
            let n = (upto - self.done).min(buf.len() as u64) as usize;
            self.reader
                .read_exact_at(&mut buf[..n], self.done)
                .map_err(|e| Error::io(&self.path, e))?;
            self.hash.update(&buf[..n]);
            self.done += n as u64;
        }
        Ok(())
    }
}

/// The hashing and recording thread.
pub struct Hasher {
    tx: Option<Sender<Msg>>,
    handle: Option<JoinHandle<Result<Manifest>>>,
}

impl Hasher {
    /// Starts the thread; it owns `manifest` and saves it to `dir` after each finished shard.
    /// `paths[i]` is the file of shard `i`.
    pub fn start(
        dir: PathBuf,
        paths: Vec<PathBuf>,
        manifest: Manifest,
        fsync: bool,
    ) -> Result<Self> {
        let (tx, rx) = channel::<Msg>();
        let handle = std::thread::Builder::new()
            .name("fastq-hash".into())
            .spawn(move || -> Result<Manifest> {
                let mut manifest = manifest;
                let mut running: BTreeMap<usize, Running> = BTreeMap::new();
                let mut buf = vec![0u8; 4 << 20];
                let open = |shard: usize, running: &mut BTreeMap<usize, Running>| -> Result<()> {
                    if let std::collections::btree_map::Entry::Vacant(v) = running.entry(shard) {
                        let path = paths[shard].clone();
                        let reader = File::open(&path).map_err(|e| Error::io(&path, e))?;
                        v.insert(Running {
                            path,
                            reader,
                            hash: Sha256::new(),
                            done: 0,
                        });
                    }
                    Ok(())
                };
                for msg in rx {
                    match msg {
                        Msg::Extend { shard, upto } => {
                            open(shard, &mut running)?;
                            let r = running.get_mut(&shard).expect("opened");
                            r.advance(upto, &mut buf)?;
                        }
                        Msg::Finish {
                            shard,
                            name,
                            file,
                            size,
                            data_size,
                        } => {
                            open(shard, &mut running)?;
                            let mut r = running.remove(&shard).expect("opened");
                            r.advance(size, &mut buf)?;
                            if fsync {
                                file.sync_all().map_err(|e| Error::io(&r.path, e))?;
                            }
                            let sha256 = format!("{:x}", r.hash.finalize());
                            manifest.shards.insert(
                                name,
                                ShardRecord {
                                    size,
                                    data_size,
                                    sha256,
                                },
                            );
                            manifest.save(&dir)?;
                        }
                    }
                }
                Ok(manifest)
            })
            .map_err(|e| Error::InvalidArgument(format!("cannot start the hashing thread: {e}")))?;
        Ok(Hasher {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Bytes `..upto` of shard `shard` are written and will not change.
    pub fn extend(&self, shard: usize, upto: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Extend { shard, upto });
        }
    }

    /// Shard `shard` is complete (`size` bytes): hash the rest, sync, record it.
    pub fn finish(&self, shard: usize, name: String, file: File, size: u64, data_size: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Finish {
                shard,
                name,
                file,
                size,
                data_size,
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
            .unwrap_or_else(|_| Err(Error::InvalidArgument("the hashing thread panicked".into())))
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
