//! `convert`: a whole checkpoint quantized into sharded safetensors (the core's `writer`), with the GIL
//! released for the run. Progress goes to a Python callback a few times a second; the GIL is taken
//! only for that call, which also runs Python's signal handlers, so Ctrl-C cancels the run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fastq::pipeline;
use fastq::writer::{self, Content, Layout, Part};
use fastq::Error;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{to_py, IntoPy};
use crate::job::{parse_cast, parse_dtype, Job};

/// One output tensor of a conversion, in state-dict order: `Output.copy(...)`, `Output.inline(...)`
/// or `Output.part(...)`.
#[pyclass(module = "fastq._fastq", frozen)]
pub struct Output(writer::Output);

#[pymethods]
impl Output {
    /// `Output.copy(name, source, transpose=False, cast=None)`: checkpoint tensor `source`, transposed
    /// (2-D) and cast to a float dtype ("BF16") if asked.
    #[staticmethod]
    #[pyo3(signature = (name, source, transpose=false, cast=None))]
    fn copy(name: String, source: String, transpose: bool, cast: Option<&str>) -> PyResult<Self> {
        let cast = parse_cast(cast, &source)?;
        Ok(Output(writer::Output {
            name,
            content: Content::Copy {
                source,
                transpose,
                cast,
            },
        }))
    }

    /// `Output.inline(name, dtype, shape, data)`: the bytes of `data` (a buffer the checkpoint does not
    /// hold, such as a buffer the model makes at init), copied now.
    #[staticmethod]
    fn inline(
        py: Python<'_>,
        name: String,
        dtype: &str,
        shape: Vec<usize>,
        data: PyBuffer<u8>,
    ) -> PyResult<Self> {
        Ok(Output(writer::Output {
            name,
            content: Content::Inline {
                dtype: parse_dtype(dtype)?,
                shape,
                bytes: data.to_vec(py)?,
            },
        }))
    }

    /// `Output.part(name, job, part)`: part `part` ("weight", "absmax", "quant_map", "nested_absmax",
    /// "nested_quant_map", "quant_state", "SCB", "weight_format") of the result of job number `job`.
    #[staticmethod]
    fn part(name: String, job: usize, part: &str) -> PyResult<Self> {
        Ok(Output(writer::Output {
            name,
            content: Content::Quantized {
                job,
                part: Part::parse(part).py_err()?,
            },
        }))
    }

    /// The output tensor's name.
    #[getter]
    fn name(&self) -> &str {
        &self.0.name
    }
}

/// The names `Output.part` takes, in the writer's order (tests check them against
/// `fastq.bnb_format`).
#[pyfunction]
pub fn part_names() -> Vec<&'static str> {
    Part::ALL.iter().map(|p| p.as_str()).collect()
}

fn layout(
    py: Python<'_>,
    src: &PathBuf,
    jobs: Vec<Job>,
    outputs: Vec<PyRef<'_, Output>>,
    max_shard_size: u64,
) -> PyResult<(Arc<fastq::Checkpoint>, Layout)> {
    let jobs = jobs.into_iter().map(|j| j.0).collect();
    let outputs = outputs.iter().map(|o| o.0.clone()).collect();
    py.allow_threads(|| {
        let ckpt = fastq::Checkpoint::open(src)?;
        let layout = Layout::new(&ckpt, jobs, outputs, max_shard_size)?;
        Ok((Arc::new(ckpt), layout))
    })
    .py_err()
}

/// plan_layout(src, jobs, outputs, max_shard_size) -> [(shard name, [(tensor, dtype, shape, size,
/// exact)] in file order)]: where `convert` would put every tensor, without writing anything.
#[pyfunction]
pub fn plan_layout<'py>(
    py: Python<'py>,
    src: PathBuf,
    jobs: Vec<Job>,
    outputs: Vec<PyRef<'py, Output>>,
    max_shard_size: u64,
) -> PyResult<Bound<'py, PyList>> {
    let (_, layout) = layout(py, &src, jobs, outputs, max_shard_size)?;
    let shards = layout.shards.iter().map(|s| {
        let tensors: Vec<_> = s
            .order
            .iter()
            .map(|&i| {
                let t = &layout.tensors[i];
                (
                    t.name.clone(),
                    t.dtype.as_str(),
                    t.shape.clone(),
                    t.size,
                    t.exact,
                )
            })
            .collect();
        (s.name.clone(), tensors)
    });
    PyList::new(py, shards)
}

/// convert(src, out_dir, jobs, outputs, max_shard_size, params_json, resume=False, fsync=True,
/// threads=None, progress=None, interval=0.2) -> dict
///
/// Writes the shards and `fastq-manifest.json` into `out_dir`. `progress(bytes_done, bytes_total,
/// shards_done, shards_total, shards_resumed)` is called at most every `interval` seconds and once at
/// the end; an exception it raises (KeyboardInterrupt from Ctrl-C included) stops the run and is
/// raised here, after the complete shards are recorded. Returns {"shards": [{"name", "tensors",
/// "file_size", "data_size", "digest", "resumed"}], "total_size"}.
#[pyfunction]
#[pyo3(signature = (src, out_dir, jobs, outputs, max_shard_size, params_json, resume=false, fsync=true, threads=None, progress=None, interval=0.2))]
#[allow(clippy::too_many_arguments)]
pub fn convert<'py>(
    py: Python<'py>,
    src: PathBuf,
    out_dir: PathBuf,
    jobs: Vec<Job>,
    outputs: Vec<PyRef<'py, Output>>,
    max_shard_size: u64,
    params_json: &str,
    resume: bool,
    fsync: bool,
    threads: Option<usize>,
    progress: Option<PyObject>,
    interval: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let (ckpt, layout) = layout(py, &src, jobs, outputs, max_shard_size)?;
    let opts = writer::Options {
        pipeline: pipeline::Options {
            threads,
            ..pipeline::Options::default()
        },
        resume,
        fsync,
        params_json: params_json.to_string(),
        progress_interval: Duration::from_secs_f64(interval.max(0.01)),
    };
    let mut raised: Option<PyErr> = None;
    let result = py.allow_threads(|| {
        let mut callback = |p: &writer::Progress| -> bool {
            Python::with_gil(|py| {
                let call = || -> PyResult<()> {
                    if let Some(cb) = &progress {
                        cb.call1(
                            py,
                            (
                                p.bytes_done,
                                p.bytes_total,
                                p.shards_done,
                                p.shards_total,
                                p.shards_resumed,
                            ),
                        )?;
                    }
                    py.check_signals()
                };
                match call() {
                    Ok(()) => true,
                    Err(e) => {
                        raised = Some(e);
                        false
                    }
                }
            })
        };
        writer::convert(ckpt, &layout, &out_dir, &opts, &mut callback)
    });
    let summary = match result.py_err()? {
        Some(s) => s,
        None => return Err(raised.unwrap_or_else(|| to_py(Error::Cancelled))),
    };
    let d = PyDict::new(py);
    let shards = PyList::empty(py);
    for s in summary.shards {
        let sd = PyDict::new(py);
        sd.set_item("name", s.name)?;
        sd.set_item("tensors", s.tensors)?;
        sd.set_item("file_size", s.file_size)?;
        sd.set_item("data_size", s.data_size)?;
        sd.set_item("digest", s.digest)?;
        sd.set_item("resumed", s.resumed)?;
        shards.append(sd)?;
    }
    d.set_item("shards", shards)?;
    d.set_item("total_size", summary.total_size)?;
    Ok(d)
}

/// Python's `repr` of a float, as the writer prints `nested_offset` (for tests).
#[pyfunction]
pub fn py_float_repr(x: f64) -> String {
    writer::py_float_repr(x)
}

/// The `quant_state.bitsandbytes__*` JSON the writer saves (for tests).
#[pyfunction]
#[pyo3(signature = (quant_type, blocksize, dtype_name, shape, nested_offset=None))]
pub fn quant_state_json(
    quant_type: &str,
    blocksize: usize,
    dtype_name: &str,
    shape: Vec<usize>,
    nested_offset: Option<f32>,
) -> PyResult<String> {
    let qt = fastq::QuantType::parse(quant_type).py_err()?;
    Ok(writer::quant_state_json(
        qt,
        blocksize,
        parse_dtype(dtype_name)?,
        &shape,
        nested_offset,
    ))
}
