//! The upload stage of the GPU path, whole in Rust: tensor bytes read (`pread`, on the worker pool)
//! into a ring of pinned host slots, copied from each slot to device memory the caller allocated
//! (`Dma`, the CUDA driver in `cuda.rs`), each slot refilled once the copy out of it has finished.
//! One coordinator thread runs the loop; no Python runs anywhere in it, so it streams at full speed
//! while the caller's Python thread builds the model (BENCHMARKS.md, run 15: the same loop in Python
//! waited for the GIL the skeleton's build holds, and slowed that build).
//!
//! ```text
//!   workers: pread -> slot k   |  coordinator: wait read k, copy slot k -> device, record event k,
//!                              |               wait the event of the slot the next read reuses
//! ```
//!
//! A request is one device buffer (`dst`, `len` bytes) assembled from pieces of checkpoint tensors
//! (`staging::Piece`, `dst_offset` counted inside the buffer). Requests are laid out one after the
//! other in the slots, each starting at a multiple of `ALIGN`; a request larger than what a slot has
//! left spans several. Requests complete in order; `Progress::done` counts those whose copies are
//! known to have finished on the device.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::staging::{self, Piece};

/// Where each request starts in a slot: cudaMalloc's alignment, so a slot's bytes line up with a
/// device block carved the same way (python/fastq/transfer.py `ALIGN`).
pub const ALIGN: usize = 256;

/// One device buffer to fill.
#[derive(Clone, Debug)]
pub struct Request {
    /// The buffer's device address (host address for `HostDma`).
    pub dst: u64,
    /// Its length in bytes.
    pub len: usize,
    /// Where its bytes come from (`dst_offset` inside the buffer).
    pub pieces: Vec<Piece>,
}

/// Copies out of the ring's slots into device memory, asynchronously, in the order issued.
pub trait Dma {
    /// Queues a copy of `len` bytes at host address `src` (inside a slot) to device address `dst`.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes, and left unwritten, until the copy has finished
    /// (a `wait` past a later `record`, or `finish`).
    unsafe fn copy(&mut self, dst: u64, src: *const u8, len: usize) -> Result<()>;
    /// Marks the point after the copies queued so far out of `slot`.
    fn record(&mut self, slot: usize) -> Result<()>;
    /// Blocks until everything queued before `slot`'s last mark has finished.
    fn wait(&mut self, slot: usize) -> Result<()>;
    /// Blocks until every queued copy has finished.
    fn finish(&mut self) -> Result<()>;
}

/// A `Dma` whose "device" is host memory: a plain synchronous copy (tests, and a CPU target).
pub struct HostDma(());

impl HostDma {
    /// # Safety
    /// Every `dst` later handed to `copy` must be a host address valid for writes of `len` bytes,
    /// not read or written by anything else until the upload ends.
    pub unsafe fn new() -> Self {
        HostDma(())
    }
}

impl Dma for HostDma {
    unsafe fn copy(&mut self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        // SAFETY: `HostDma::new`'s contract makes `dst` valid for `len` bytes, this method's makes `src`
        // valid for them.
        unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, len) };
        Ok(())
    }
    fn record(&mut self, _slot: usize) -> Result<()> {
        Ok(())
    }
    fn wait(&mut self, _slot: usize) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What an upload has done so far, shared between the coordinator and whoever waits for it.
#[derive(Default)]
pub struct State {
    /// Requests (a prefix of the list) whose bytes are on the device.
    pub done: usize,
    /// The coordinator has ended (all done, stopped, or failed).
    pub finished: bool,
    /// Why it failed, until someone takes it.
    pub error: Option<Error>,
    /// Each read of a slot: (start, end, bytes), seconds since the Unix epoch.
    pub reads: Vec<(f64, f64, usize)>,
    /// Each slot's copies: (queued, seen finished, bytes).
    pub copies: Vec<(f64, f64, usize)>,
}

/// `State` behind a lock, with a condition variable signalled at every change.
#[derive(Default)]
pub struct Progress {
    /// The state.
    pub state: Mutex<State>,
    /// Signalled when `state` changes.
    pub changed: Condvar,
}

impl Progress {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        self.changed.notify_all();
    }

    /// Blocks until `n` requests are done or the upload has ended; returns the state's `done` then.
    pub fn wait_for(&self, n: usize) -> usize {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.done < n && !s.finished {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.done
    }
}

/// Seconds since the Unix epoch (Python's `time.time()` clock), for timelines.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Checks every request's pieces against the checkpoint and its buffer.
pub fn check(ckpt: &Checkpoint, requests: &[Request]) -> Result<()> {
    requests
        .iter()
        .try_for_each(|r| staging::check(ckpt, &r.pieces, r.len))
}

/// Bytes `a..b` of a request, placed at `at` in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    req: usize,
    a: usize,
    b: usize,
    at: usize,
}

/// Splits the requests into slot-sized batches (each request starting at a multiple of `ALIGN`).
fn batches(requests: &[Request], slot_len: usize) -> Vec<Vec<Span>> {
    let (mut out, mut batch, mut used) = (Vec::new(), Vec::new(), 0usize);
    for (req, r) in requests.iter().enumerate() {
        let mut a = 0;
        while a < r.len {
            used = used.div_ceil(ALIGN) * ALIGN;
            if used >= slot_len {
                out.push(std::mem::take(&mut batch));
                used = 0;
            }
            let n = (r.len - a).min(slot_len - used);
            batch.push(Span {
                req,
                a,
                b: a + n,
                at: used,
            });
            used += n;
            a += n;
        }
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// The reads that bring `span`'s bytes into its place in a slot.
fn reads<'r>(r: &'r Request, s: &Span) -> impl Iterator<Item = Piece> + 'r {
    let (a, b, at) = (s.a, s.b, s.at);
    r.pieces.iter().filter_map(move |p| {
        let (lo, hi) = (a.max(p.dst_offset), b.min(p.dst_offset + p.len));
        (lo < hi).then(|| Piece {
            tensor: p.tensor.clone(),
            offset: p.offset + lo - p.dst_offset,
            len: hi - lo,
            dst_offset: at + lo - a,
        })
    })
}

/// A read in flight: its outcome once a worker has finished it.
type Pending = Arc<(Mutex<Option<Result<(f64, f64)>>>, Condvar)>;

fn wait_read(p: &Pending) -> Result<(f64, f64)> {
    let (lock, cv) = &**p;
    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
    while g.is_none() {
        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    g.take().unwrap_or(Ok((0.0, 0.0)))
}

/// One upload: what to fill, from which checkpoint, through which slots (host address and length of
/// each, page-locked for a real device), read on which worker pool.
pub struct Upload<'a> {
    /// The checkpoint the pieces name.
    pub ckpt: &'a Checkpoint,
    /// The buffers to fill, in the order they complete.
    pub requests: &'a [Request],
    /// The ring.
    pub slots: &'a [(usize, usize)],
    /// The reader threads.
    pub pool: &'a rayon::ThreadPool,
}

impl Upload<'_> {
    /// Fills every request, copying with `dma`; records what it did in `progress` and ends it
    /// (`finished`, and `error` on failure: `Error::Cancelled` once `stop` was set, checked before each
    /// slot). Whichever way it ends, no read is left writing into a slot and no copy left running.
    ///
    /// # Safety
    /// Each slot must be valid for writes of its length and untouched by anything else until this
    /// returns; the requests' `dst` must be what `dma` can copy to, for `len` bytes each.
    pub unsafe fn run(&self, dma: &mut dyn Dma, progress: &Progress, stop: &AtomicBool) {
        let r = self.stream(dma, progress, stop).and(dma.finish());
        progress.update(|s| {
            if r.is_ok() {
                s.done = self.requests.len();
                let t = now();
                for c in s.copies.iter_mut().filter(|c| c.1 == 0.0) {
                    c.1 = t;
                }
            }
            s.finished = true;
            s.error = r.err();
        });
    }

    fn stream(&self, dma: &mut dyn Dma, progress: &Progress, stop: &AtomicBool) -> Result<()> {
        let (ckpt, requests, slots, pool) = (self.ckpt, self.requests, self.slots, self.pool);
        check(ckpt, requests)?;
        let slot_len = slots.iter().map(|s| s.1).min().unwrap_or(0);
        if slot_len < ALIGN {
            return Err(Error::InvalidArgument(format!(
                "the ring's slots must hold at least {ALIGN} bytes"
            )));
        }
        let batches = batches(requests, slot_len);
        // The batch holding each request's last bytes (requests of no bytes: the batch before them).
        let mut last = vec![None::<usize>; requests.len()];
        for (j, b) in batches.iter().enumerate() {
            for s in b {
                last[s.req] = Some(j);
            }
        }
        let mut prev = None;
        for l in last.iter_mut() {
            *l = l.or(prev);
            prev = *l;
        }
        let complete = |through: Option<usize>| -> usize {
            last.iter()
                .take_while(|l| match (l, through) {
                    (None, _) => true,
                    (Some(l), Some(t)) => *l <= t,
                    (Some(_), None) => false,
                })
                .count()
        };
        progress.update(|s| s.done = complete(None));
        let nslots = slots.len();
        let ahead = nslots.saturating_sub(1).max(1);
        let mut slot_batch: Vec<Option<usize>> = vec![None; nslots];
        let mut pending: VecDeque<Pending> = VecDeque::new();
        pool.in_place_scope(|scope| {
            let submit = |k: usize, pending: &mut VecDeque<Pending>| {
                let (ptr, _) = slots[k % nslots];
                let pieces: Vec<Piece> = batches[k]
                    .iter()
                    .flat_map(|s| reads(&requests[s.req], s))
                    .collect();
                let p: Pending = Arc::new((Mutex::new(None), Condvar::new()));
                let out = p.clone();
                scope.spawn(move |_| {
                    let started = now();
                    // SAFETY: `Upload::run`'s contract: the slot is valid for `slot_len` bytes and only this read
                    // writes it now (the copy out of it finished: its event was waited for before).
                    let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, slot_len) };
                    let r = staging::read_into(ckpt, &pieces, dst).map(|()| (started, now()));
                    let (lock, cv) = &*out;
                    *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    cv.notify_all();
                });
                pending.push_back(p);
            };
            let mut outcome = Ok(());
            for k in 0..ahead.min(batches.len()) {
                submit(k, &mut pending);
            }
            for (j, batch) in batches.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    outcome = Err(Error::Cancelled);
                    break;
                }
                let Some(p) = pending.pop_front() else { break };
                let (t0, t1) = match wait_read(&p) {
                    Ok(t) => t,
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                };
                let slot = j % nslots;
                let (ptr, _) = slots[slot];
                let bytes: usize = batch.iter().map(|s| s.b - s.a).sum();
                let queued = now();
                let copied = batch.iter().try_for_each(|s| {
                    let r = &requests[s.req];
                    // SAFETY: the span lies inside the slot (`batches`), which the read just filled and
                    // which no read refills before this slot's event has been waited for.
                    unsafe { dma.copy(r.dst + s.a as u64, (ptr + s.at) as *const u8, s.b - s.a) }
                });
                if let Err(e) = copied.and_then(|()| dma.record(slot)) {
                    outcome = Err(e);
                    break;
                }
                slot_batch[slot] = Some(j);
                progress.update(|s| {
                    s.reads.push((t0, t1, bytes));
                    s.copies.push((queued, 0.0, bytes));
                });
                let k = j + ahead;
                if k < batches.len() {
                    let reuse = k % nslots;
                    if let Some(b) = slot_batch[reuse] {
                        if let Err(e) = dma.wait(reuse) {
                            outcome = Err(e);
                            break;
                        }
                        let (t, n) = (now(), complete(Some(b)));
                        progress.update(|s| {
                            s.done = s.done.max(n);
                            for c in s.copies.iter_mut().take(b + 1).filter(|c| c.1 == 0.0) {
                                c.1 = t;
                            }
                        });
                    }
                    submit(k, &mut pending);
                }
            }
            // Reads still in flight (after an error or a stop) end before the scope does.
            for p in pending.drain(..) {
                let _ = wait_read(&p);
            }
            outcome
        })
    }
}

/// Starts `Upload::run` on a thread of its own; the returned handle ends when the upload has.
///
/// # Safety
/// As `Upload::run`, for as long as the thread runs.
pub unsafe fn spawn(
    ckpt: Arc<Checkpoint>,
    requests: Vec<Request>,
    slots: Vec<(usize, usize)>,
    mut dma: Box<dyn Dma + Send>,
    pool: Arc<rayon::ThreadPool>,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fastq-upload".into())
        .spawn(move || {
            let upload = Upload {
                ckpt: &ckpt,
                requests: &requests,
                slots: &slots,
                pool: &pool,
            };
            // SAFETY: forwarded from the caller's contract.
            unsafe { upload.run(&mut *dma, &progress, &stop) };
        })
        .map_err(|e| Error::Internal(format!("cannot start the upload thread: {e}")))
}

#[cfg(test)]
mod tests;
