//! The shard checksum of the manifest: SHA-256 over the SHA-256 digests of the file's 16 MiB chunks,
//! in order (`sha256(sha256(chunk 0) || sha256(chunk 1) || ...)`, the last chunk shorter).
//!
//! Why not the plain SHA-256 of the file: a plain hash must read the file front to back, and the front
//! of a safetensors shard (its f32 statistics, sorted first) is complete only when the last weight is
//! quantized, so the whole shard would be hashed after the fact (~0.4 s per GB on one core). Chunk
//! digests are taken as soon as a chunk's bytes are all written, during quantization, in any order,
//! and a check (`--resume`, `fastq inspect --verify`) hashes the chunks on all cores. In Python:
//! `sha256(b"".join(sha256(f.read(1 << 24)).digest() for each chunk)).hexdigest()`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bytes per hashed chunk.
pub const CHUNK: u64 = 16 << 20;

/// The digest of `file[start..end]`.
pub fn chunk_digest(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<[u8; 32]> {
    buf.resize((end - start) as usize, 0);
    file.read_exact_at(buf, start)
        .map_err(|e| Error::io(path, e))?;
    Ok(Sha256::digest(&buf[..]).into())
}

/// Combines chunk digests (in file order) into the shard checksum, lowercase hex.
pub fn combine(digests: &[[u8; 32]]) -> String {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    format!("{:x}", h.finalize())
}

/// The checksum of a whole file, its chunks hashed in parallel on the current rayon pool.
pub fn file_checksum(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let digests = (0..size.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(Vec::new, |buf, k| {
            chunk_digest(&file, path, k * CHUNK, ((k + 1) * CHUNK).min(size), buf)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(combine(&digests))
}

/// Which chunks of a file being written are complete: each chunk counts the regions overlapping it
/// that are still to be written.
#[derive(Clone, Debug)]
pub struct ChunkTracker {
    pending: Vec<u32>,
}

impl ChunkTracker {
    /// A tracker for a file of at most `len` bytes.
    pub fn new(len: u64) -> Self {
        ChunkTracker {
            pending: vec![0; len.div_ceil(CHUNK) as usize],
        }
    }

    fn chunks(start: u64, end: u64) -> std::ops::Range<usize> {
        if end <= start {
            return 0..0;
        }
        (start / CHUNK) as usize..end.div_ceil(CHUNK) as usize
    }

    /// Bytes `start..end` will be written later.
    pub fn expect(&mut self, start: u64, end: u64) {
        for k in Self::chunks(start, end) {
            self.pending[k] += 1;
        }
    }

    /// Bytes `start..end` are written; returns the chunks that became complete.
    pub fn written(&mut self, start: u64, end: u64) -> Vec<usize> {
        let mut done = Vec::new();
        for k in Self::chunks(start, end) {
            self.pending[k] -= 1;
            if self.pending[k] == 0 {
                done.push(k);
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_reports_each_chunk_once_when_its_regions_are_written() {
        let mut t = ChunkTracker::new(3 * CHUNK + 5);
        t.expect(0, 10);
        t.expect(10, 2 * CHUNK + 1);
        t.expect(2 * CHUNK + 1, 3 * CHUNK + 5);
        assert_eq!(t.written(10, 2 * CHUNK + 1), vec![1]);
        assert_eq!(t.written(0, 10), vec![0]);
        assert_eq!(t.written(2 * CHUNK + 1, 3 * CHUNK + 5), vec![2, 3]);
    }

    #[test]
    fn checksum_is_sha256_of_chunk_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK as usize + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let d0: [u8; 32] = Sha256::digest(&data[..CHUNK as usize]).into();
        let d1: [u8; 32] = Sha256::digest(&data[CHUNK as usize..]).into();
        assert_eq!(file_checksum(&p).unwrap(), combine(&[d0, d1]));
    }
}
