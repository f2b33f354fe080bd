//! The shard files of a run: opened with their header (or room for it), tensors written at their
//! offsets, completed chunks handed to the hasher, and closed (deferred header and tail written) when
//! their last tensor is in.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::error::{Error, Result};

use super::digest::{ChunkTracker, CHUNK};
use super::layout::Layout;
use super::layout::{header_json, ShardPlan};
use super::manifest::Hasher;

/// The output shards of a run: where each tensor goes, and the state of each file.
pub(super) struct Shards<'a> {
    layout: &'a Layout,
    paths: &'a [PathBuf],
    /// For each tensor: its shard and position in the shard's file order.
    place: Vec<(usize, usize)>,
    states: Vec<ShardState>,
    /// Shards completed (written, closed and handed to the hasher) by this run.
    pub(super) closed: usize,
}

/// Where a shard stands.
enum ShardState {
    Pending,
    Open(OpenShard),
    Closed,
}

/// A shard being written.
pub(super) struct OpenShard {
    file: File,
    path: PathBuf,
    /// Tensors left to write.
    left: usize,
    /// Which 16 MiB chunks are complete (to hash them as soon as they are).
    chunks: ChunkTracker,
    /// The file's size (for a shard with inexact tensors, a bound until it closes).
    size: u64,
    /// Where inexact tensors start (data offset), if the shard has any.
    tail_start: Option<u64>,
    /// The JSON of inexact tensors (double-quantized `quant_state`), kept until the shard ends.
    tail: Vec<Option<Vec<u8>>>,
}

impl<'a> Shards<'a> {
    /// Every shard of `layout` pending, to be written at `paths`.
    pub(super) fn new(layout: &'a Layout, paths: &'a [PathBuf]) -> Self {
        let mut place = vec![(0, 0); layout.tensors.len()];
        for (s, shard) in layout.shards.iter().enumerate() {
            for (pos, &t) in shard.order.iter().enumerate() {
                place[t] = (s, pos);
            }
        }
        Shards {
            layout,
            paths,
            place,
            states: (0..layout.shards.len())
                .map(|_| ShardState::Pending)
                .collect(),
            closed: 0,
        }
    }

    /// The shard tensor `t` goes to.
    pub(super) fn shard_of(&self, t: usize) -> usize {
        self.place[t].0
    }

    /// Creates shard `s`'s file (once) and writes its header when it is known in advance.
    pub(super) fn open(&mut self, s: usize, hasher: &Hasher) -> Result<()> {
        if !matches!(self.states[s], ShardState::Pending) {
            return Ok(());
        }
        let plan: &ShardPlan = &self.layout.shards[s];
        let path = self.paths[s].clone();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let n = plan.order.len();
        let ds = plan.data_start();
        let size = ds + plan.offsets.last().map_or(0, |o| o.1);
        let mut chunks = ChunkTracker::new(size);
        chunks.expect(0, ds);
        let tail_start = plan
            .order
            .iter()
            .position(|&t| !self.layout.tensors[t].exact)
            .map(|p| plan.offsets[p].0);
        for (&t, &(a, b)) in plan.order.iter().zip(&plan.offsets) {
            if self.layout.tensors[t].exact {
                chunks.expect(ds + a, ds + b);
            }
        }
        if let Some(a) = tail_start {
            chunks.expect(ds + a, size); // written when the shard closes
        }
        let mut shard = OpenShard {
            file,
            path,
            left: n,
            chunks,
            size,
            tail_start,
            tail: vec![None; n],
        };
        if plan.exact {
            let header = self.header(plan, &[]);
            shard
                .file
                .write_all_at(&header, 0)
                .map_err(|e| Error::io(&shard.path, e))?;
            send_chunks(hasher, s, &shard, shard.chunks.clone().written(0, ds));
            shard.chunks.written(0, ds);
        }
        self.states[s] = ShardState::Open(shard);
        if n == 0 {
            self.close(s, hasher)?;
        }
        Ok(())
    }

    /// The header of `plan` with the actual sizes of its inexact tensors (`tail`, in file order).
    fn header(&self, plan: &ShardPlan, tail: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut entries = Vec::with_capacity(plan.order.len());
        let mut at = 0u64;
        let sizes: Vec<u64> = plan
            .order
            .iter()
            .enumerate()
            .map(|(pos, &t)| match tail.get(pos) {
                Some(Some(b)) => b.len() as u64,
                _ => self.layout.tensors[t].size,
            })
            .collect();
        let shapes: Vec<Vec<usize>> = plan
            .order
            .iter()
            .zip(&sizes)
            .map(|(&t, &size)| {
                let tensor = &self.layout.tensors[t];
                if tensor.exact {
                    tensor.shape.clone()
                } else {
                    vec![size as usize]
                }
            })
            .collect();
        for ((&t, &size), shape) in plan.order.iter().zip(&sizes).zip(&shapes) {
            let tensor = &self.layout.tensors[t];
            entries.push((
                tensor.name.as_str(),
                tensor.dtype,
                shape.as_slice(),
                (at, at + size),
            ));
            at += size;
        }
        let mut out = Vec::with_capacity(8 + plan.header_len as usize);
        let json = header_json(&entries, plan.header_len as usize);
        debug_assert_eq!(json.len() as u64, plan.header_len);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// Writes `bytes` as tensor `t` and does the bookkeeping.
    pub(super) fn put(&mut self, t: usize, bytes: &[u8], hasher: &Hasher) -> Result<()> {
        let layout = self.layout;
        let (s, pos) = self.place[t];
        let plan = &layout.shards[s];
        let tensor = &layout.tensors[t];
        let shard = self.open_shard(s);
        if tensor.exact {
            debug_assert_eq!(bytes.len() as u64, tensor.size, "{}", tensor.name);
            let at = plan.data_start() + plan.offsets[pos].0;
            shard
                .file
                .write_all_at(bytes, at)
                .map_err(|e| Error::io(&shard.path, e))?;
        } else {
            shard.tail[pos] = Some(bytes.to_vec());
        }
        self.mark(t, hasher)
    }

    fn open_shard(&mut self, s: usize) -> &mut OpenShard {
        match &mut self.states[s] {
            ShardState::Open(shard) => shard,
            _ => unreachable!("shard {s} is written while open only"),
        }
    }

    /// Writes `bytes` at `at` bytes into tensor `t`'s place (an exact tensor written in pieces; call
    /// `mark` after the last).
    pub(super) fn put_at(&mut self, t: usize, at: u64, bytes: &[u8]) -> Result<()> {
        let (s, pos) = self.place[t];
        let plan = &self.layout.shards[s];
        let start = plan.data_start() + plan.offsets[pos].0;
        let shard = self.open_shard(s);
        shard
            .file
            .write_all_at(bytes, start + at)
            .map_err(|e| Error::io(&shard.path, e))
    }

    /// Records tensor `t` as complete: hashes the chunks it completed, closes its shard after the last.
    pub(super) fn mark(&mut self, t: usize, hasher: &Hasher) -> Result<()> {
        let (s, pos) = self.place[t];
        let layout = self.layout;
        let plan = &layout.shards[s];
        let exact = layout.tensors[plan.order[pos]].exact;
        let shard = self.open_shard(s);
        shard.left -= 1;
        if exact {
            let (a, b) = plan.offsets[pos];
            let done = shard
                .chunks
                .written(plan.data_start() + a, plan.data_start() + b);
            send_chunks(hasher, s, shard, done);
        }
        if shard.left == 0 {
            self.close(s, hasher)?;
        }
        Ok(())
    }

    /// The shard is complete: write the deferred header and tail, hand it to the hasher.
    fn close(&mut self, s: usize, hasher: &Hasher) -> Result<()> {
        let layout = self.layout;
        let plan = &layout.shards[s];
        let ShardState::Open(shard) = std::mem::replace(&mut self.states[s], ShardState::Closed)
        else {
            unreachable!("only an open shard closes")
        };
        let mut shard = shard;
        let ds = plan.data_start();
        let mut end = plan.offsets.last().map_or(0, |o| o.1);
        if !plan.exact {
            let header = self.header(plan, &shard.tail);
            shard
                .file
                .write_all_at(&header, 0)
                .map_err(|e| Error::io(&shard.path, e))?;
            let mut at = shard.tail_start.unwrap_or(end);
            for bytes in shard.tail.iter().flatten() {
                shard
                    .file
                    .write_all_at(bytes, ds + at)
                    .map_err(|e| Error::io(&shard.path, e))?;
                at += bytes.len() as u64;
            }
            end = at;
            let mut done = shard.chunks.written(0, ds);
            if let Some(a) = shard.tail_start {
                done.extend(shard.chunks.written(ds + a, shard.size));
            }
            shard.size = ds + end;
            send_chunks(hasher, s, &shard, done);
        }
        let size = ds + end;
        shard
            .file
            .set_len(size)
            .map_err(|e| Error::io(&shard.path, e))?;
        let chunks = size.div_ceil(CHUNK) as usize;
        hasher.finish(s, plan.name.clone(), shard.file, size, end, chunks);
        self.closed += 1;
        Ok(())
    }
}

/// Hands the complete chunks `done` of shard `s` to the hasher (those inside the file: a shard with
/// inexact tensors ends up shorter than its bound).
fn send_chunks(hasher: &Hasher, s: usize, shard: &OpenShard, done: Vec<usize>) {
    for k in done {
        let start = k as u64 * CHUNK;
        if start < shard.size || (k == 0 && shard.size == 0) {
            hasher.chunk(s, k, start, ((k as u64 + 1) * CHUNK).min(shard.size));
        }
    }
}
