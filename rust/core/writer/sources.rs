//! What each output shard is made from: the digest of the source bytes behind it, recorded in the
//! manifest beside the shard's own checksum. A resumed run keeps a finished shard only when its sources
//! still hash to what they did: a source shard's size and mtime are no proof (`cp -p` and `rsync -a`
//! put an old mtime back on new bytes, and a tool that rewrites a tensor in place may restore it).
//!
//! A source tensor's digest is XXH3-128 over the XXH3-128 digests of its 16 MiB chunks (hashed in
//! parallel, in place through the mapping: `Checkpoint::with_mapped` populates each chunk, then drops
//! it from this process); a shard's is `"xxh3-128:"` and the
//! XXH3-128 of the sorted lines `"<tensor> <digest>\n"` of every checkpoint tensor one of its outputs is
//! copied or quantized from. Every source tensor is hashed once per run, before the run.
//!
//! Why XXH3 and not the SHA-256 of the shard checksums: this guards against stale shards, not against
//! an adversary, and it reads every source byte once more per run. SHA-256 ran at 1.4 GB/s on the
//! 2-core VM (1.5 s for a 1.1B-parameter bf16 checkpoint whose whole conversion takes about as long);
//! XXH3 over the mapping runs at 17-20 GB/s, against 6-8 GB/s through a `pread` copy (BENCHMARKS.md,
//! "Files that change underneath").

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::checkpoint::Checkpoint;
use crate::error::Result;

use super::digest::CHUNK;
use super::layout::{Content, Layout};

/// The source digest of every shard of `layout`, in shard order (lowercase hex), hashed on the current
/// rayon pool.
pub fn source_digests(ckpt: &Checkpoint, layout: &Layout) -> Result<Vec<String>> {
    let sources: Vec<BTreeSet<&str>> = layout
        .shards
        .iter()
        .map(|s| {
            s.members
                .iter()
                .filter_map(|&t| match &layout.tensors[t].content {
                    Content::Copy { source, .. } => Some(source.as_str()),
                    Content::Quantized { job, .. } => Some(layout.jobs[*job].name.as_str()),
                    Content::Inline { .. } => None, // its bytes are in the layout's fingerprint
                })
                .collect()
        })
        .collect();
    let all: BTreeSet<&str> = sources.iter().flatten().copied().collect();
    let tensors = all
        .iter()
        .map(|&name| ckpt.info(name))
        .collect::<Result<Vec<_>>>()?;
    // (tensor, chunk) pairs, so that one large tensor is hashed on every core.
    let work: Vec<(usize, usize)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            (0..(t.nbytes() as u64).div_ceil(CHUNK).max(1) as usize).map(move |k| (i, k))
        })
        .collect();
    let chunks = work
        .par_iter()
        .map(|&(i, k)| {
            let t = tensors[i];
            let start = k * CHUNK as usize;
            let end = (start + CHUNK as usize).min(t.nbytes());
            ckpt.with_mapped(t, start, end, |bytes| xxh3_128(bytes).to_le_bytes())
        })
        .collect::<Result<Vec<_>>>()?;
    let mut per_tensor: BTreeMap<&str, String> = BTreeMap::new();
    let mut at = 0;
    for (i, t) in tensors.iter().enumerate() {
        let n = work[at..].iter().take_while(|w| w.0 == i).count();
        per_tensor.insert(
            t.name.as_str(),
            format!("{:032x}", xxh3_128(chunks[at..at + n].as_flattened())),
        );
        at += n;
    }
    Ok(sources
        .iter()
        .map(|names| {
            let mut h = Xxh3::new();
            for name in names {
                h.update(format!("{name} {}\n", per_tensor[name]).as_bytes());
            }
            format!("xxh3-128:{:032x}", h.digest128())
        })
        .collect())
}
