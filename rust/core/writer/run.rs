//! The conversion run: quantization results stream from the pipeline into their shards, unquantized
//! tensors are copied beside them, and each shard is hashed and recorded as soon as it is complete.
//!
//! Memory holds what is in flight (the pipeline's bounded channel and batch, one result being
//! written, one copy buffer), never a shard. Every tensor's offset is known in advance, so results are
//! written where they belong as they arrive (positioned writes), in any order across shards: a
//! module's statistics may land in the shard after its weight's, as in transformers' split.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};
use crate::pack::{quantize_source, Packed};
use crate::pipeline::{self, transpose_bytes, Job};
use crate::quant::dynamic_map;

use super::cast::{cast_into, Cast};
use super::digest::{ChunkTracker, CHUNK};
use super::layout::{header_json, Content, Layout, Part, ShardPlan};
use super::manifest::{verify, Hasher, Manifest, MANIFEST_NAME};
use super::pyjson::quant_state_json;

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
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub shards_done: usize,
    pub shards_total: usize,
    /// Shards kept from a previous run (counted in `shards_done`, not in the bytes).
    pub shards_resumed: usize,
}

/// One written (or kept) shard.
#[derive(Clone, Debug)]
pub struct ShardSummary {
    pub name: String,
    /// Tensor names in state-dict order.
    pub tensors: Vec<String>,
    pub file_size: u64,
    pub data_size: u64,
    /// The manifest's checksum (`digest`).
    pub digest: String,
    /// Kept from a previous run.
    pub resumed: bool,
}

/// The finished output.
#[derive(Clone, Debug)]
pub struct Summary {
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
    let pool = pipeline::pool(opts.pipeline.threads)?;
    let params: serde_json::Value = serde_json::from_str(&opts.params_json)
        .map_err(|e| Error::InvalidArgument(format!("conversion parameters are not JSON: {e}")))?;
    // Shards a previous run finished and that still hash to what it recorded.
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
    let hasher = Hasher::start(dir.to_path_buf(), paths.clone(), manifest, opts.fsync)?;
    let finished = run.execute(&hasher, &pool);
    let manifest = hasher.join();
    let finished = finished?;
    let manifest = manifest?;
    if !finished {
        return Ok(None);
    }
    let mut shards = Vec::with_capacity(layout.shards.len());
    for (i, s) in layout.shards.iter().enumerate() {
        let r = manifest.shards.get(&s.name).ok_or_else(|| {
            Error::InvalidArgument(format!(
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

/// Where a shard stands.
enum ShardState {
    Pending,
    Open(OpenShard),
    Closed,
}

/// A shard being written.
struct OpenShard {
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

struct Run<'a> {
    ckpt: Arc<Checkpoint>,
    layout: &'a Layout,
    opts: &'a Options,
    progress: &'a mut dyn FnMut(&Progress) -> bool,
    /// For each tensor: its shard and position in the shard's file order.
    place: Vec<(usize, usize)>,
    shards: Vec<ShardState>,
    paths: &'a [PathBuf],
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
        let mut place = vec![(0, 0); layout.tensors.len()];
        for (s, shard) in layout.shards.iter().enumerate() {
            for (pos, &t) in shard.order.iter().enumerate() {
                place[t] = (s, pos);
            }
        }
        let todo: Vec<bool> = (0..layout.shards.len())
            .map(|i| !kept.contains(&i))
            .collect();
        let bytes_total = layout
            .tensors
            .iter()
            .zip(&place)
            .filter(|(_, &(s, _))| todo[s])
            .map(|(t, _)| t.input_bytes)
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
            place,
            shards: (0..layout.shards.len())
                .map(|_| ShardState::Pending)
                .collect(),
            paths,
            todo,
            state,
            last_report: Instant::now(),
            copy_buf: Vec::new(),
        })
    }

    /// Calls the progress callback if it is time (or `force`); false means cancel.
    fn report(&mut self, force: bool) -> bool {
        if force || self.last_report.elapsed() >= self.opts.progress_interval {
            self.last_report = Instant::now();
            return (self.progress)(&self.state);
        }
        true
    }

    /// Runs to the end; Ok(false) when cancelled.
    fn execute(&mut self, hasher: &Hasher, pool: &rayon::ThreadPool) -> Result<bool> {
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
        // Jobs without a cast stream from the pipeline; cast ones are quantized here, in order.
        let streamed: Vec<Job> = order
            .iter()
            .filter(|&&j| layout.jobs[j].cast.is_none())
            .map(|&j| {
                let q = &layout.jobs[j];
                Job {
                    name: q.source.clone(),
                    spec: q.spec,
                    transpose: q.transpose,
                }
            })
            .collect();
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
            self.open(s, hasher)?;
            // Unquantized tensors first: the pipeline works on this shard's jobs meanwhile.
            for &t in &layout.shards[s].members {
                if !matches!(layout.tensors[t].content, Content::Quantized { .. }) {
                    self.write_plain(t, hasher)?;
                    if !self.report(false) {
                        return Ok(false);
                    }
                }
            }
            while next_job < order.len() && job_home[order[next_job]] == Some(s) {
                let j = order[next_job];
                let packed = if layout.jobs[j].cast.is_some() {
                    self.quantize_here(j, pool)?
                } else {
                    let rx = rx.as_ref().expect("streamed jobs exist");
                    loop {
                        match rx.recv_timeout(self.opts.progress_interval) {
                            Ok((_, r)) => break r?,
                            Err(RecvTimeoutError::Timeout) => {
                                if !self.report(true) {
                                    return Ok(false);
                                }
                            }
                            Err(RecvTimeoutError::Disconnected) => {
                                return Err(Error::InvalidArgument(
                                    "the quantization pipeline stopped before its last job".into(),
                                ))
                            }
                        }
                    }
                };
                for &t in &parts[j] {
                    let (shard, _) = self.place[t];
                    if self.todo[shard] {
                        self.open(shard, hasher)?;
                        self.write_part(t, &packed, hasher)?;
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

    fn open(&mut self, s: usize, hasher: &Hasher) -> Result<()> {
        if !matches!(self.shards[s], ShardState::Pending) {
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
        self.shards[s] = ShardState::Open(shard);
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
    fn put(&mut self, t: usize, bytes: &[u8], hasher: &Hasher) -> Result<()> {
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
        self.mark(s, pos, hasher)
    }

    fn open_shard(&mut self, s: usize) -> &mut OpenShard {
        match &mut self.shards[s] {
            ShardState::Open(shard) => shard,
            _ => unreachable!("shard {s} is written while open only"),
        }
    }

    fn mark(&mut self, s: usize, pos: usize, hasher: &Hasher) -> Result<()> {
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
        let ShardState::Open(shard) = std::mem::replace(&mut self.shards[s], ShardState::Closed)
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
        self.state.shards_done += 1;
        Ok(())
    }

    fn write_plain(&mut self, t: usize, hasher: &Hasher) -> Result<()> {
        let layout = self.layout;
        match &layout.tensors[t].content {
            Content::Inline { bytes, .. } => self.put(t, bytes, hasher),
            Content::Copy {
                source,
                transpose,
                cast,
            } => {
                let ckpt = self.ckpt.clone();
                let info = ckpt.info(source)?;
                let (transpose, cast) = (*transpose, *cast);
                let input = info.nbytes() as u64;
                if !transpose && cast.is_none() {
                    self.copy_range(t, &ckpt, info, hasher)?;
                } else {
                    let mut bytes = if transpose {
                        let b = transpose_bytes(
                            ckpt.bytes(info),
                            info.shape[0],
                            info.shape[1],
                            info.dtype.size(),
                        );
                        ckpt.release(info);
                        b
                    } else {
                        self.read(&ckpt, info, 0, info.nbytes())?
                    };
                    if let Some(to) = cast.filter(|&to| to != info.dtype) {
                        let x = FloatSlice::new(info.dtype, &bytes)
                            .expect("float, checked by the layout");
                        let mut out = Vec::new();
                        cast_into(x, to, &mut out);
                        bytes = out;
                    }
                    self.put(t, &bytes, hasher)?;
                }
                self.state.bytes_done += input;
                Ok(())
            }
            Content::Quantized { .. } => unreachable!("quantized tensors come from their job"),
        }
    }

    fn read(
        &self,
        ckpt: &Checkpoint,
        info: &crate::TensorInfo,
        a: usize,
        b: usize,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; b - a];
        let shard = &ckpt.shards[info.shard];
        shard
            .file
            .read_exact_at(&mut buf, (info.start + a) as u64)
            .map_err(|e| Error::io(&shard.path, e))?;
        Ok(buf)
    }

    /// Copies a tensor's bytes unchanged, a few MB at a time.
    fn copy_range(
        &mut self,
        t: usize,
        ckpt: &Checkpoint,
        info: &crate::TensorInfo,
        hasher: &Hasher,
    ) -> Result<()> {
        const STEP: usize = 8 << 20;
        let layout = self.layout;
        let (s, pos) = self.place[t];
        let plan = &layout.shards[s];
        let at = plan.data_start() + plan.offsets[pos].0;
        let src = &ckpt.shards[info.shard];
        let mut buf = std::mem::take(&mut self.copy_buf);
        buf.resize(STEP.min(info.nbytes()), 0);
        let mut done = 0usize;
        let result = (|| {
            let shard = self.open_shard(s);
            while done < info.nbytes() {
                let n = STEP.min(info.nbytes() - done);
                src.file
                    .read_exact_at(&mut buf[..n], (info.start + done) as u64)
                    .map_err(|e| Error::io(&src.path, e))?;
                shard
                    .file
                    .write_all_at(&buf[..n], at + done as u64)
                    .map_err(|e| Error::io(&shard.path, e))?;
                done += n;
            }
            Ok(())
        })();
        self.copy_buf = buf;
        result?;
        self.mark(s, pos, hasher)
    }

    /// Quantizes a job that needs a cast, on this thread's behalf (the pipeline has no cast).
    fn quantize_here(&self, j: usize, pool: &rayon::ThreadPool) -> Result<Packed> {
        let job = &self.layout.jobs[j];
        let to = job.cast.expect("cast job");
        let ckpt = &self.ckpt;
        let info = ckpt.info(&job.source)?;
        let path = ckpt.path_of(info);
        let at = |e: Error| e.at(path, &job.source);
        let kernel = self.opts.pipeline.kernel;
        pool.install(|| {
            if job.transpose {
                let (rows, cols) = (info.shape[0], info.shape[1]);
                let bytes = transpose_bytes(ckpt.bytes(info), rows, cols, info.dtype.size());
                ckpt.release(info);
                let x = FloatSlice::new(info.dtype, &bytes).expect("float source");
                quantize_source(&Cast { inner: x, to }, &[cols, rows], to, job.spec, kernel)
            } else {
                let reader = ckpt.reader(info)?;
                quantize_source(
                    &Cast { inner: reader, to },
                    &info.shape,
                    to,
                    job.spec,
                    kernel,
                )
            }
        })
        .map_err(at)
    }

    fn write_part(&mut self, t: usize, packed: &Packed, hasher: &Hasher) -> Result<()> {
        let tensor = &self.layout.tensors[t];
        let Content::Quantized { part, .. } = tensor.content else {
            unreachable!("a part")
        };
        let json: Vec<u8>;
        let (code, dmap) = (packed_code(packed), dynamic_map());
        let bytes: &[u8] = match (packed, part) {
            (Packed::FourBit(p), Part::Weight) => &p.codes,
            (Packed::FourBit(p), Part::Absmax) => match &p.nested {
                Some(n) => &n.codes,
                None => f32_bytes(&p.absmax),
            },
            (Packed::FourBit(_), Part::QuantMap) => f32_bytes(&code),
            (Packed::FourBit(p), Part::NestedAbsmax) => {
                f32_bytes(&p.nested.as_ref().expect("double quant").absmax)
            }
            (Packed::FourBit(_), Part::NestedQuantMap) => f32_bytes(&dmap),
            (Packed::FourBit(p), Part::QuantState) => {
                let offset = p.nested.as_ref().map(|n| n.offset);
                json = quant_state_json(p.quant_type, p.blocksize, p.dtype, &p.shape, offset)
                    .into_bytes();
                &json
            }
            (Packed::Int8(p), Part::Weight) => i8_bytes(&p.cb),
            (Packed::Int8(p), Part::Scb) => f32_bytes(&p.scb),
            (Packed::Int8(_), Part::WeightFormat) => &[0u8],
            _ => unreachable!("parts checked by the layout"),
        };
        if part == Part::Weight {
            self.state.bytes_done += tensor.input_bytes;
        }
        self.put(t, bytes, hasher)
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

/// The 16 code values of a 4-bit result (the saved `quant_map`).
fn packed_code(p: &Packed) -> [f32; 16] {
    match p {
        Packed::FourBit(p) => p.quant_type.code(),
        Packed::Int8(_) => [0.0; 16],
    }
}

// safetensors is little-endian; so is every target fastq builds for (x86-64, aarch64).
#[cfg(not(target_endian = "little"))]
compile_error!("fastq's writer assumes a little-endian target");

/// The bytes of f32s as safetensors stores them.
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte is initialized; u8 needs no alignment; the length
    // covers exactly the slice; on a little-endian target the memory order is the file's.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The bytes of i8s (the int8 weight): the same bits as u8.
fn i8_bytes(v: &[i8]) -> &[u8] {
    // SAFETY: i8 and u8 have the same size and alignment and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) }
}
