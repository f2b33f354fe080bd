//! `convert`: a whole checkpoint quantized into sharded safetensors (the core's `writer`), with the GIL
//! released for the run. Progress goes to a Python callback a few times a second; the GIL is taken
//! only for that call, which also runs Python's signal handlers, so Ctrl-C cancels the run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fastq::dtype::Dtype;
use fastq::pipeline;
use fastq::writer::{self, Content, Layout, Output, Part, QuantJob};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::errors::IntoPy;
use crate::packed::spec_from_py;

fn dtype(s: &str) -> PyResult<Dtype> {
    Dtype::parse(s).ok_or_else(|| PyValueError::new_err(format!("unknown safetensors dtype '{s}'")))
}

/// Jobs: (source, kind "4bit" | "int8", quant_type, blocksize, double_quant, transpose, cast dtype or
/// None, storage dtype), dtypes as safetensors names ("BF16").
type PyJob = (
    String,
    String,
    String,
    usize,
    bool,
    bool,
    Option<String>,
    String,
);

fn parse_jobs(jobs: Vec<PyJob>) -> PyResult<Vec<QuantJob>> {
    jobs.into_iter()
        .map(|(source, kind, qt, bs, dq, transpose, cast, storage)| {
            Ok(QuantJob {
                source,
                spec: spec_from_py(&kind, &qt, bs, dq)?,
                transpose,
                cast: cast.as_deref().map(dtype).transpose()?,
                storage: dtype(&storage)?,
            })
        })
        .collect()
}

/// Outputs, in state-dict order: ("copy", name, source, transpose, cast or None),
/// ("inline", name, dtype, shape, bytes-like), ("part", name, job index, part name).
fn parse_outputs(outputs: &Bound<'_, PyList>) -> PyResult<Vec<Output>> {
    let mut out = Vec::with_capacity(outputs.len());
    for item in outputs.iter() {
        let t = item.downcast::<PyTuple>()?;
        let kind: String = t.get_item(0)?.extract()?;
        let name: String = t.get_item(1)?.extract()?;
        let content = match kind.as_str() {
            "copy" => Content::Copy {
                source: t.get_item(2)?.extract()?,
                transpose: t.get_item(3)?.extract()?,
                cast: t
                    .get_item(4)?
                    .extract::<Option<String>>()?
                    .as_deref()
                    .map(dtype)
                    .transpose()?,
            },
            "inline" => {
                let buf: PyBuffer<u8> = t.get_item(4)?.extract()?;
                Content::Inline {
                    dtype: dtype(&t.get_item(2)?.extract::<String>()?)?,
                    shape: t.get_item(3)?.extract()?,
                    bytes: buf.to_vec(t.py())?,
                }
            }
            "part" => Content::Quantized {
                job: t.get_item(2)?.extract()?,
                part: Part::parse(&t.get_item(3)?.extract::<String>()?).py_err()?,
            },
            other => {
                return Err(PyValueError::new_err(format!(
                    "output '{name}': unknown kind '{other}' (copy, inline or part)"
                )))
            }
        };
        out.push(Output { name, content });
    }
    Ok(out)
}

fn layout(
    py: Python<'_>,
    src: &PathBuf,
    jobs: Vec<PyJob>,
    outputs: &Bound<'_, PyList>,
    max_shard_size: u64,
) -> PyResult<(Arc<fastq::Checkpoint>, Layout)> {
    let jobs = parse_jobs(jobs)?;
    let outputs = parse_outputs(outputs)?;
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
    jobs: Vec<PyJob>,
    outputs: &Bound<'py, PyList>,
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
    jobs: Vec<PyJob>,
    outputs: &Bound<'py, PyList>,
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
        None => {
            return Err(raised.unwrap_or_else(|| {
                pyo3::exceptions::PyRuntimeError::new_err("the conversion was cancelled")
            }))
        }
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
        dtype(dtype_name)?,
        &shape,
        nested_offset,
    ))
}
