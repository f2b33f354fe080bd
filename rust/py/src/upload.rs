//! `Upload`: the whole upload stage (reads into the pinned ring, copies to the device, slots recycled
//! on the device's events) on a Rust thread of its own, started here and never taking the GIL; Python
//! waits for a prefix of the requests with `wait(n)` (GIL released) and reads the timeline at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fastq::cuda::CudaDma;
use fastq::upload::{self, Dma, HostDma, Progress, Request};
use fastq::Error;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::errors::{to_py, IntoPy};
use crate::staging::pieces_of;

/// A request as Python gives it: `(device address, bytes, [(tensor, offset, len, dst_offset)])`.
type PyRequest = (u64, usize, Vec<(String, usize, usize, usize)>);

/// One upload in flight (or ended).
#[pyclass(module = "fastq._fastq")]
pub struct Upload {
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The ring's slots, kept until the thread that writes them has ended.
    slots: Option<Vec<PyBuffer<u8>>>,
    total: usize,
}

#[pymethods]
impl Upload {
    /// `Upload(checkpoint, requests, slots, stream=None, threads=None)`: starts filling every request
    /// `(dst, len, pieces)` - `dst` a device address (a host address with `stream=None`), `pieces`
    /// `(tensor, offset, len, dst_offset)` - through `slots` (writable contiguous buffers, page-locked
    /// for a device), copying on the CUDA stream `stream` (a `cudaStream_t`) of the context current on
    /// this thread. The caller keeps every `dst` allocated and the slots untouched until the upload
    /// has ended (`wait`, `cancel`).
    #[new]
    #[pyo3(signature = (checkpoint, requests, slots, stream=None, threads=None))]
    fn new(
        checkpoint: &Checkpoint,
        requests: Vec<PyRequest>,
        slots: Vec<PyBuffer<u8>>,
        stream: Option<u64>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        if slots.is_empty() || slots.iter().any(|b| b.readonly() || !b.is_c_contiguous()) {
            return Err(to_py(Error::InvalidArgument(
                "the ring's slots must be writable, contiguous buffers (one at least)".into(),
            )));
        }
        let requests: Vec<Request> = requests
            .into_iter()
            .map(|(dst, len, pieces)| Request {
                dst,
                len,
                pieces: pieces_of(pieces),
            })
            .collect();
        let ckpt = checkpoint.inner.clone();
        upload::check(&ckpt, &requests).py_err()?;
        let dma: Box<dyn Dma + Send> = match stream {
            Some(s) => Box::new(CudaDma::current(s, slots.len()).py_err()?),
            // SAFETY: without a stream the destinations are host buffers the caller keeps (the
            // contract of `Upload`'s docstring), which `HostDma` writes.
            None => Box::new(unsafe { HostDma::new() }),
        };
        let pool = Arc::new(fastq::pipeline::pool(threads).py_err()?);
        let ptrs = slots
            .iter()
            .map(|b| (b.buf_ptr() as usize, b.len_bytes()))
            .collect();
        let (progress, stop) = (
            Arc::new(Progress::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let total = requests.len();
        // SAFETY: the slots are kept by this object until the thread has ended (`Drop` joins it),
        // and the caller keeps the destinations (docstring).
        let thread = unsafe {
            upload::spawn(
                ckpt,
                requests,
                ptrs,
                dma,
                pool,
                progress.clone(),
                stop.clone(),
            )
        }
        .py_err()?;
        Ok(Upload {
            progress,
            stop,
            thread: Mutex::new(Some(thread)),
            slots: Some(slots),
            total,
        })
    }

    /// `wait(n=None) -> int`: blocks (GIL released) until the first `n` requests (default: all) are on
    /// the device; returns how many are. Raises the upload's error when it failed before that.
    #[pyo3(signature = (n=None))]
    fn wait(&self, py: Python<'_>, n: Option<usize>) -> PyResult<usize> {
        let n = n.unwrap_or(self.total).min(self.total);
        let progress = self.progress.clone();
        let done = py.allow_threads(move || progress.wait_for(n));
        if done >= n {
            return Ok(done);
        }
        let mut s = self
            .progress
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Err(to_py(s.error.take().unwrap_or(Error::Cancelled)))
    }

    /// `cancel()`: stops after the slot in flight and waits (GIL released) until the thread has ended.
    fn cancel(&self, py: Python<'_>) {
        self.stop.store(true, Ordering::Relaxed);
        self.join(py);
    }

    /// Requests known to be on the device.
    fn done(&self) -> usize {
        self.progress
            .state
            .lock()
            .map(|s| s.done)
            .unwrap_or_default()
    }

    /// Whether the upload has ended.
    fn finished(&self) -> bool {
        self.progress
            .state
            .lock()
            .map(|s| s.finished)
            .unwrap_or(true)
    }

    /// `timeline() -> (reads, copies)`: each `(start, end, bytes)` in `time.time()` seconds; a copy's
    /// end is when the upload saw it finished (an upper bound).
    #[allow(clippy::type_complexity)]
    fn timeline(&self) -> (Vec<(f64, f64, usize)>, Vec<(f64, f64, usize)>) {
        let s = self
            .progress
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (s.reads.clone(), s.copies.clone())
    }
}

impl Upload {
    fn join(&self, py: Python<'_>) {
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            py.allow_threads(move || {
                let _ = h.join();
            });
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.thread.get_mut().ok().and_then(|t| t.take()) {
            let _ = h.join(); // the thread never takes the GIL: joining while holding it is safe
        }
        drop(self.slots.take());
    }
}
