//! `Reader`: positioned reads of tensor bytes into a Python buffer (pinned host memory on the GPU
//! path), submitted in the background so that Python issues device copies of the previous buffer
//! while the next one fills. `Reader.submit` returns a `ReadTicket`; `ReadTicket.wait()` blocks with
//! the GIL released until the bytes are there.

use std::sync::{Arc, Condvar, Mutex};

use fastq::staging::{self, Piece};
use fastq::Error;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::errors::{to_py, IntoPy};

/// A pool of reader threads over one checkpoint.
#[pyclass(module = "fastq._fastq", frozen)]
pub struct Reader {
    ckpt: Arc<fastq::Checkpoint>,
    pool: Arc<rayon::ThreadPool>,
}

/// The state of one submitted request: None while running, then its outcome.
type Outcome = Arc<(Mutex<Option<fastq::Result<()>>>, Condvar)>;

/// Seconds since the Unix epoch (Python's `time.time()` clock), for timelines.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A submitted read; holds the destination buffer until the read has finished.
#[pyclass(module = "fastq._fastq")]
pub struct ReadTicket {
    outcome: Outcome,
    /// Kept so that the destination outlives the writes into it; released after they finished.
    buffer: Option<PyBuffer<u8>>,
    /// When a worker started and finished the read (`time.time()` seconds; 0 until then).
    times: Arc<Mutex<(f64, f64)>>,
}

#[pymethods]
impl Reader {
    /// `Reader(checkpoint, threads=None)`: `threads` workers (default: FASTQ_NUM_THREADS or every core).
    #[new]
    #[pyo3(signature = (checkpoint, threads=None))]
    fn new(checkpoint: &Checkpoint, threads: Option<usize>) -> PyResult<Self> {
        Ok(Reader {
            ckpt: checkpoint.inner.clone(),
            pool: Arc::new(fastq::pipeline::pool(threads).py_err()?),
        })
    }

    /// `submit(pieces, dst) -> ReadTicket`: reads each piece `(tensor, offset, len, dst_offset)` into
    /// the writable, contiguous buffer `dst` in the background. `dst` must not be read or written
    /// until the ticket's `wait()` returned.
    fn submit(
        &self,
        pieces: Vec<(String, usize, usize, usize)>,
        dst: PyBuffer<u8>,
    ) -> PyResult<ReadTicket> {
        if dst.readonly() || !dst.is_c_contiguous() {
            return Err(to_py(Error::InvalidArgument(
                "the destination must be a writable, contiguous buffer".into(),
            )));
        }
        let pieces = pieces_of(pieces);
        let (ptr, len) = (dst.buf_ptr() as usize, dst.len_bytes());
        staging::check(&self.ckpt, &pieces, len).py_err()?;
        let outcome: Outcome = Arc::new((Mutex::new(None), Condvar::new()));
        let (ckpt, done) = (self.ckpt.clone(), outcome.clone());
        let pool = self.pool.clone();
        let times = Arc::new(Mutex::new((0.0, 0.0)));
        let stamps = times.clone();
        self.pool.spawn(move || {
            let started = now();
            // SAFETY: the ticket holds the exporter's buffer (`dst`) until this task has stored its
            // outcome (`wait` and `Drop` both wait for it), so the memory stays valid; the caller
            // promises not to touch it meanwhile, and the pieces' windows are disjoint (checked).
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            let r = pool.install(|| staging::read_into(&ckpt, &pieces, dst));
            if let Ok(mut t) = stamps.lock() {
                *t = (started, now());
            }
            let (lock, cv) = &*done;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            cv.notify_all();
        });
        Ok(ReadTicket {
            outcome,
            buffer: Some(dst),
            times,
        })
    }
}

/// Pieces as Python gives them, `(tensor, offset, len, dst_offset)` each.
pub(crate) fn pieces_of(pieces: Vec<(String, usize, usize, usize)>) -> Vec<Piece> {
    pieces
        .into_iter()
        .map(|(tensor, offset, len, dst_offset)| Piece {
            tensor,
            offset,
            len,
            dst_offset,
        })
        .collect()
}

/// Blocks until the read finished; returns its outcome (once: later calls see Ok).
fn block(outcome: &Outcome) -> fastq::Result<()> {
    let (lock, cv) = &**outcome;
    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
    while g.is_none() {
        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
    }
    g.replace(Ok(())).unwrap_or(Ok(()))
}

#[pymethods]
impl ReadTicket {
    /// Waits (GIL released) until every piece is in the buffer; raises the read's error if it failed.
    fn wait(&mut self, py: Python<'_>) -> PyResult<()> {
        let outcome = self.outcome.clone();
        let r = py.allow_threads(move || block(&outcome));
        self.buffer = None;
        r.map_err(to_py)
    }

    /// `(started, finished)` of the read in `time.time()` seconds (zeros until it finished).
    fn times(&self) -> (f64, f64) {
        self.times.lock().map(|t| *t).unwrap_or((0.0, 0.0))
    }

    /// Whether the read has finished.
    fn done(&self) -> bool {
        self.outcome.0.lock().map(|g| g.is_some()).unwrap_or(true)
    }
}

impl Drop for ReadTicket {
    fn drop(&mut self) {
        if self.buffer.is_some() {
            let _ = block(&self.outcome); // never release the destination while a worker writes into it
        }
    }
}
