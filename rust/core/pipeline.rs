//! Quantizing many tensors of a checkpoint on all cores with bounded memory.
//!
//! Jobs run in order in batches: small tensors of a batch in parallel with each other, large ones
//! split across blocks (see `pack::quantize_tensor`). Results go through a bounded channel, so at
//! most `channel_capacity` finished results wait for the consumer and one batch is being computed:
//! memory is bounded by what is in flight, not by the checkpoint. Inputs are read chunk by chunk with
//! `pread` (`TensorReader`), so no page of the mapping stays resident; the few tensors read through the
//! mapping (transposed ones) are released after use (`Checkpoint::release`). A checkpoint larger than
//! RAM streams through.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::job::{quantize_job, Job};
use crate::pack::{Packed, QuantSpec};
use crate::quant::Kernel;

/// Knobs of a pipeline run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Worker threads; None means `FASTQ_NUM_THREADS` or else every core.
    pub threads: Option<usize>,
    /// Input bytes a batch gathers before it runs (small tensors are quantized together).
    pub batch_bytes: usize,
    /// Finished results that may wait for the consumer.
    pub channel_capacity: usize,
    /// Drop input pages from this process after each tensor that was read through the mapping
    /// (transposed ones; the others are read with `pread` and never map a page).
    pub release_pages: bool,
    /// Which quantization kernels to use (`Auto`: the fastest the CPU supports).
    pub kernel: Kernel,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threads: None,
            batch_bytes: 64 << 20,
            channel_capacity: 4,
            release_pages: true,
            kernel: Kernel::Auto,
        }
    }
}

/// The thread count a run uses: the argument, else `FASTQ_NUM_THREADS`, else all cores.
pub fn thread_count(threads: Option<usize>) -> usize {
    threads
        .filter(|&t| t > 0)
        .or_else(|| {
            std::env::var("FASTQ_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&t: &usize| t > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Builds the rayon pool for a run.
pub fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(thread_count(threads))
        .thread_name(|i| format!("fastq-{i}"))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start worker threads: {e}")))
}

/// One finished job: its position in the job list, and its result.
pub type Item = (usize, Result<Packed>);

/// Starts quantizing `jobs` on a background thread and returns the receiving end of the results, in
/// job order. Dropping the receiver stops the run after the batch in progress.
pub fn spawn(
    ckpt: Arc<Checkpoint>,
    jobs: Vec<(String, QuantSpec)>,
    opts: Options,
) -> Result<Receiver<Item>> {
    let jobs = jobs.into_iter().map(|(n, s)| Job::new(n, s)).collect();
    spawn_jobs(ckpt, jobs, opts)
}

/// `spawn` for full `Job`s (with transposition).
pub fn spawn_jobs(ckpt: Arc<Checkpoint>, jobs: Vec<Job>, opts: Options) -> Result<Receiver<Item>> {
    for job in &jobs {
        job.validate()?;
    }
    let pool = pool(opts.threads)?;
    let (tx, rx) = sync_channel::<Item>(opts.channel_capacity.max(1));
    std::thread::Builder::new()
        .name("fastq-pipeline".into())
        .spawn(move || {
            let mut i = 0;
            while i < jobs.len() {
                let mut j = i;
                let mut bytes = 0usize;
                while j < jobs.len() && (j == i || bytes < opts.batch_bytes) {
                    bytes += ckpt
                        .info(&jobs[j].name)
                        .map_or(0, |t| jobs[j].input_bytes(t));
                    j += 1;
                }
                let batch = &jobs[i..j];
                let results: Vec<Result<Packed>> = pool.install(|| {
                    batch
                        .par_iter()
                        .map(|job| quantize_job(&ckpt, job, opts.kernel))
                        .collect()
                });
                for (job, r) in batch.iter().zip(results) {
                    // Only a transposed job reads through the mapping; the others use `pread`.
                    if opts.release_pages && job.transpose {
                        if let Ok(t) = ckpt.info(&job.name) {
                            ckpt.release(t);
                        }
                    }
                    let failed = r.is_err();
                    if tx.send((i, r)).is_err() || failed {
                        return;
                    }
                    i += 1;
                }
            }
        })
        .map_err(|e| Error::Internal(format!("cannot start the pipeline thread: {e}")))?;
    Ok(rx)
}

/// Runs `jobs` to completion on the calling thread's behalf and collects every result in order.
pub fn run_all(
    ckpt: Arc<Checkpoint>,
    jobs: Vec<(String, QuantSpec)>,
    opts: Options,
) -> Result<Vec<Packed>> {
    let n = jobs.len();
    let rx = spawn(ckpt, jobs, opts)?;
    let mut out = Vec::with_capacity(n);
    for (_, r) in rx {
        out.push(r?);
    }
    Ok(out)
}
