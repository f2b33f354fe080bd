//! The conversion run: quantization results stream from the pipeline into their shards, unquantized
//! tensors are copied beside them, and each shard is hashed and recorded as soon as it is complete.
//!
//! Memory holds what is in flight (the pipeline's bounded channel and batch, one result being
//! written, one copy buffer), never a shard. Every tensor's offset is known in advance, so results are
//! written where they belong as they arrive (positioned writes), in any order across shards: a
//! module's statistics may land in the shard after its weight's, as in transformers' split.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::pipeline;

use super::files::Shards;
use super::layout::{Content, Layout};
use super::manifest::{verify, Hasher, Manifest, MANIFEST_NAME};
use super::parts::{write_part, write_plain};
use super::sources::source_digests;

/// Knobs of a conversion.
#[derive(Clone, Debug)]
pub struct Options {
    /// The quantization pipeline's (threads, batch size, channel capacity).
    pub pipeline: pipeline::Options,
    /// Keep the shards a previous run into the same folder finished (after checking them).
    pub resume: bool,
    /// `fsync` each shard before recording it (survives a power cut, not only a killed process).
    pub fsync: bool,
    /// The caller's parameters as JSON text, recorded in the manifest; a resumed run must pass equal
    /// ones.
    pub params_json: String,
    /// Least time between two calls of the progress callback.
    pub progress_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pipeline: pipeline::Options::default(),
            resume: false,
            fsync: true,
            params_json: "null".into(),
            progress_interval: Duration::from_millis(200),
        }
    }
}

/// Where a run stands (source bytes consumed, not output bytes written).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Source bytes consumed so far.
    pub bytes_done: u64,
    /// Source bytes of the shards this run writes (kept shards excluded).
    pub bytes_total: u64,
    /// Shards complete, kept ones included.
    pub shards_done: usize,
    /// Shards in the output.
    pub shards_total: usize,
    /// Shards kept from a previous run (counted in `shards_done`, not in the bytes).
    pub shards_resumed: usize,
}

/// One written (or kept) shard.
#[derive(Clone, Debug)]
pub struct ShardSummary {
    /// The file name.
    pub name: String,
    /// Tensor names in state-dict order.
    pub tensors: Vec<String>,
    /// File size in bytes.
    pub file_size: u64,
    /// Bytes of tensor data (the shard's share of the index's `total_size`).
    pub data_size: u64,
    /// The manifest's checksum (`digest`).
    pub digest: String,
    /// Kept from a previous run.
    pub resumed: bool,
}

/// The finished output.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Every shard, in order.
    pub shards: Vec<ShardSummary>,
    /// Sum of every tensor's bytes (the index's `metadata.total_size`).
    pub total_size: u64,
}

/// Writes `layout` into `dir` (which must exist). `progress` is called at most every
/// `opts.progress_interval` and once at the end; returning false cancels the run, which then returns
/// `Ok(None)` after recording the shards already complete.
pub fn convert(
    ckpt: Arc<Checkpoint>,
    layout: &Layout,
    dir: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<Option<Summary>> {
    let fingerprint = layout.fingerprint(&ckpt);
    let paths: Vec<PathBuf> = layout.shards.iter().map(|s| dir.join(&s.name)).collect();
    let params: serde_json::Value = serde_json::from_str(&opts.params_json)
        .map_err(|e| Error::InvalidArgument(format!("conversion parameters are not JSON: {e}")))?;
    let pool = pipeline::pool(opts.pipeline.threads)?;
    // What each shard is made from, for the manifest and to check a previous run's shards against.
    let sources = pool.install(|| source_digests(&ckpt, layout))?;
    // Shards a previous run finished from the same source bytes, and that still hash to what it recorded.
    let mut manifest = Manifest::new(params.clone(), fingerprint.clone());
    let mut kept: HashSet<usize> = HashSet::new();
    if opts.resume {
        if let Some(old) = Manifest::load_for_resume(dir, &params, &fingerprint)? {
            let checks: Vec<(usize, bool)> = pool.install(|| {
                layout
                    .shards
                    .par_iter()
                    .enumerate()
                    .filter_map(|(i, s)| old.shards.get(&s.name).map(|r| (i, r)))
                    .filter(|&(i, r)| r.source == sources[i])
                    .map(|(i, r)| verify(&paths[i], r).map(|ok| (i, ok)))
                    .collect::<Result<Vec<_>>>()
            })?;
            for (i, ok) in checks {
                if ok {
                    let name = &layout.shards[i].name;
                    manifest
                        .shards
                        .insert(name.clone(), old.shards[name].clone());
                    kept.insert(i);
                }
            }
        }
    }
    manifest.save(dir)?;
    let mut run = Run::new(ckpt, layout, &paths, &kept, opts, progress)?;
    drop(pool);
    let hasher = Hasher::start(
        dir.to_path_buf(),
        paths.clone(),
        sources,
        manifest,
        opts.fsync,
    )?;
    let finished = run.execute(&hasher);
    let manifest = hasher.join();
    let finished = finished?;
    let manifest = manifest?;
    if !finished {
        return Ok(None);
    }
    let mut shards = Vec::with_capacity(layout.shards.len());
    for (i, s) in layout.shards.iter().enumerate() {
        let r = manifest.shards.get(&s.name).ok_or_else(|| {
            Error::Internal(format!(
                "{}: shard '{}' was not recorded",
                dir.join(MANIFEST_NAME).display(),
                s.name
            ))
        })?;
        shards.push(ShardSummary {
            name: s.name.clone(),
            tensors: s
                .members
                .iter()
                .map(|&t| layout.tensors[t].name.clone())
                .collect(),
            file_size: r.size,
            data_size: r.data_size,
            digest: r.digest.clone(),
            resumed: kept.contains(&i),
        });
    }
    let total_size = shards.iter().map(|s| s.data_size).sum();
    Ok(Some(Summary { shards, total_size }))
}

/// One conversion in progress: the output shards, what is left to write, and the progress reports.
struct Run<'a> {
    ckpt: Arc<Checkpoint>,
    layout: &'a Layout,
    opts: &'a Options,
    progress: &'a mut dyn FnMut(&Progress) -> bool,
    out: Shards<'a>,
    /// For each shard: whether this run writes it (not kept from a previous run).
    todo: Vec<bool>,
    state: Progress,
    last_report: Instant,
    copy_buf: Vec<u8>,
}

impl<'a> Run<'a> {
    fn new(
        ckpt: Arc<Checkpoint>,
        layout: &'a Layout,
        paths: &'a [PathBuf],
        kept: &HashSet<usize>,
        opts: &'a Options,
        progress: &'a mut dyn FnMut(&Progress) -> bool,
    ) -> Result<Self> {
        let out = Shards::new(layout, paths);
        let todo: Vec<bool> = (0..layout.shards.len())
            .map(|i| !kept.contains(&i))
            .collect();
        let bytes_total = layout
            .tensors
            .iter()
            .enumerate()
            .filter(|&(i, _)| todo[out.shard_of(i)])
            .map(|(_, t)| t.input_bytes)
            .sum();
        let state = Progress {
            bytes_done: 0,
            bytes_total,
            shards_done: kept.len(),
            shards_total: layout.shards.len(),
            shards_resumed: kept.len(),
        };
        Ok(Run {
            ckpt,
            layout,
            opts,
            progress,
            out,
            todo,
            state,
            last_report: Instant::now(),
            copy_buf: Vec::new(),
        })
    }

    /// Calls the progress callback if it is time (or `force`); false means cancel.
    fn report(&mut self, force: bool) -> bool {
        self.state.shards_done = self.state.shards_resumed + self.out.closed;
        if force || self.last_report.elapsed() >= self.opts.progress_interval {
            self.last_report = Instant::now();
            return (self.progress)(&self.state);
        }
        true
    }

    /// Runs to the end; Ok(false) when cancelled.
    fn execute(&mut self, hasher: &Hasher) -> Result<bool> {
        let layout = self.layout;
        // Each job is run once, with the first shard still to write that holds one of its parts.
        let mut job_home = vec![None; layout.jobs.len()];
        for (s, shard) in layout.shards.iter().enumerate() {
            if !self.todo[s] {
                continue;
            }
            for &t in &shard.members {
                if let Content::Quantized { job, .. } = layout.tensors[t].content {
                    job_home[job].get_or_insert(s);
                }
            }
        }
        let mut order: Vec<usize> = (0..layout.jobs.len())
            .filter(|&j| job_home[j].is_some())
            .collect();
        order.sort_by_key(|&j| job_home[j]);
        // The tensors of each job, to write them when its result comes.
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); layout.jobs.len()];
        for (t, tensor) in layout.tensors.iter().enumerate() {
            if let Content::Quantized { job, .. } = tensor.content {
                parts[job].push(t);
            }
        }
        // Every job streams from the pipeline, in this order (a cast is done there, chunk by chunk).
        let streamed: Vec<Job> = order.iter().map(|&j| layout.jobs[j].clone()).collect();
        let rx = if streamed.is_empty() {
            None
        } else {
            Some(pipeline::spawn_jobs(
                self.ckpt.clone(),
                streamed,
                self.opts.pipeline.clone(),
            )?)
        };
        let mut next_job = 0usize;
        for s in 0..layout.shards.len() {
            if !self.todo[s] {
                continue;
            }
            self.out.open(s, hasher)?;
            // Unquantized tensors first: the pipeline works on this shard's jobs meanwhile.
            for &t in &layout.shards[s].members {
                if !matches!(layout.tensors[t].content, Content::Quantized { .. }) {
                    self.state.bytes_done += write_plain(
                        &mut self.out,
                        layout,
                        &self.ckpt,
                        t,
                        &mut self.copy_buf,
                        hasher,
                    )?;
                    if !self.report(false) {
                        return Ok(false);
                    }
                }
            }
            while next_job < order.len() && job_home[order[next_job]] == Some(s) {
                let j = order[next_job];
                let rx = rx.as_ref().expect("a job to run means a pipeline");
                let packed = loop {
                    match rx.recv_timeout(self.opts.progress_interval) {
                        Ok((_, r)) => break r?,
                        Err(RecvTimeoutError::Timeout) => {
                            if !self.report(true) {
                                return Ok(false);
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(Error::Internal(
                                "the quantization pipeline stopped before its last job".into(),
                            ))
                        }
                    }
                };
                for &t in &parts[j] {
                    let shard = self.out.shard_of(t);
                    if self.todo[shard] {
                        self.out.open(shard, hasher)?;
                        self.state.bytes_done +=
                            write_part(&mut self.out, layout, t, &packed, hasher)?;
                    }
                }
                next_job += 1;
                if hasher.is_dead() || !self.report(false) {
                    return Ok(false);
                }
            }
        }
        Ok(self.report(true))
    }
}
