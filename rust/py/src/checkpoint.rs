//! `Checkpoint`: an opened safetensors checkpoint, its tensors as zero-copy buffers, and the streaming
//! quantization pipeline as a Python iterator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use fastq::pipeline::{self, Item, Options};
use fastq::Error;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::buffer::Buffer;
use crate::errors::{to_py, IntoPy};
use crate::job::Job;
use crate::packed;

/// An opened checkpoint (one file, an indexed folder, or a folder of shards).
#[pyclass(module = "fastq._fastq", frozen)]
pub struct Checkpoint {
    pub(crate) inner: Arc<fastq::Checkpoint>,
}

#[pymethods]
impl Checkpoint {
    #[new]
    fn new(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let inner = py
            .allow_threads(|| fastq::Checkpoint::open(&path))
            .py_err()?;
        Ok(Checkpoint {
            inner: Arc::new(inner),
        })
    }

    /// List of (name, dtype, shape, shard path, nbytes), shard by shard in file order.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self.inner.tensors().iter().map(|t| {
            (
                t.name.as_str(),
                t.dtype.as_str(),
                t.shape.clone(),
                self.inner.path_of(t).display().to_string(),
                t.nbytes(),
            )
        });
        PyList::new(py, items)
    }

    /// The shard files.
    fn shard_paths(&self) -> Vec<String> {
        self.inner
            .shards
            .iter()
            .map(|s| s.path.display().to_string())
            .collect()
    }

    /// `__metadata__` of shard `i`.
    fn metadata<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Some(s) = self.inner.shards.get(i) {
            for (k, v) in &s.metadata {
                d.set_item(k, v)?;
            }
        }
        Ok(d)
    }

    /// The bytes of tensor `name`, without a copy (a window of the shard's private mapping). A shard
    /// cut short since it was opened raises TruncatedShardError here.
    fn get(&self, name: &str) -> PyResult<Buffer> {
        let t = self.inner.info(name).py_err()?;
        self.inner.check(t).py_err()?;
        let map = self.inner.shards[t.shard].map.clone();
        Buffer::from_map(map, t.start, t.end).py_err()
    }

    /// Raises TruncatedShardError for the first of the named tensors (every tensor when `names` is
    /// None) whose bytes the file no longer holds: a shard cut short since it was opened.
    #[pyo3(signature = (names=None))]
    fn check(&self, py: Python<'_>, names: Option<Vec<String>>) -> PyResult<()> {
        let infos: Vec<&fastq::TensorInfo> = match &names {
            Some(names) => names
                .iter()
                .map(|n| self.inner.info(n))
                .collect::<fastq::Result<_>>()
                .py_err()?,
            None => self.inner.tensors().iter().collect(),
        };
        py.allow_threads(|| self.inner.check_all(infos)).py_err()
    }

    /// Maps the pages of the named tensors into the process in parallel (GIL released), so that the
    /// zero-copy tensors `get` returns are resident before they are used. A shard cut short since it
    /// was opened raises TruncatedShardError naming the first tensor it lost.
    #[pyo3(signature = (names, threads=None))]
    fn populate(&self, py: Python<'_>, names: Vec<String>, threads: Option<usize>) -> PyResult<()> {
        use rayon::prelude::*;
        let infos = names
            .iter()
            .map(|n| self.inner.info(n))
            .collect::<fastq::Result<Vec<_>>>()
            .py_err()?;
        let pool = pipeline::pool(threads).py_err()?;
        py.allow_threads(|| {
            pool.install(|| infos.par_iter().try_for_each(|t| self.inner.populate(t)))
        })
        .py_err()
    }

    /// Total bytes of tensor data.
    fn total_bytes(&self) -> usize {
        self.inner.total_bytes()
    }

    /// Quantizes many tensors in parallel; yields `(name, Packed4bit | PackedInt8)` in the order of
    /// `jobs` (a list of `Job`).
    #[pyo3(signature = (jobs, threads=None, batch_bytes=None, channel_capacity=None, release_pages=true))]
    fn quantize(
        &self,
        jobs: Vec<Job>,
        threads: Option<usize>,
        batch_bytes: Option<usize>,
        channel_capacity: Option<usize>,
        release_pages: bool,
    ) -> PyResult<QuantizeIter> {
        let parsed: Vec<fastq::Job> = jobs.into_iter().map(|j| j.0).collect();
        for job in &parsed {
            self.inner.info(&job.name).py_err()?;
        }
        let names: Vec<String> = parsed.iter().map(|j| j.name.clone()).collect();
        let mut opts = Options {
            threads,
            release_pages,
            ..Options::default()
        };
        if let Some(b) = batch_bytes {
            opts.batch_bytes = b;
        }
        if let Some(c) = channel_capacity {
            opts.channel_capacity = c;
        }
        let rx = pipeline::spawn_jobs(self.inner.clone(), parsed, opts).py_err()?;
        Ok(QuantizeIter {
            rx: Mutex::new(Some(rx)),
            done: AtomicBool::new(false),
            names,
        })
    }
}

/// Iterator over the results of `Checkpoint.quantize`.
#[pyclass(module = "fastq._fastq", frozen)]
pub struct QuantizeIter {
    rx: Mutex<Option<Receiver<Item>>>,
    done: AtomicBool,
    names: Vec<String>,
}

#[pymethods]
impl QuantizeIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(String, PyObject)>> {
        if self.done.load(Ordering::Acquire) {
            return Ok(None);
        }
        // Take the receiver out so that no lock is held while the GIL is released.
        let rx = self.rx.lock().ok().and_then(|mut g| g.take());
        let Some(rx) = rx else {
            return Err(to_py(Error::InvalidArgument(
                "this iterator is being advanced by another thread".into(),
            )));
        };
        let (rx, item) = py.allow_threads(move || {
            let item = rx.recv();
            (rx, item)
        });
        let finish = || self.done.store(true, Ordering::Release);
        match item {
            Ok((i, Ok(p))) => {
                if let Ok(mut g) = self.rx.lock() {
                    *g = Some(rx);
                }
                Ok(Some((self.names[i].clone(), packed::to_py(py, p)?)))
            }
            Ok((_, Err(e))) => {
                finish();
                Err(to_py(e))
            }
            Err(_) => {
                finish();
                Ok(None)
            }
        }
    }

    /// Stops the run (the worker finishes its current batch and exits).
    fn close(&self) {
        self.done.store(true, Ordering::Release);
        if let Ok(mut g) = self.rx.lock() {
            *g = None;
        }
    }
}
