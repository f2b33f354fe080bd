//! `fastq._fastq`: the thin pyo3 binding of the fastq core. One file per surface: buffers handed to
//! Python (buffer.rs), the `Job` every entry point takes (job.rs), results as `Packed4bit` /
//! `PackedInt8` objects (packed.rs), single-tensor ops (ops.rs), checkpoints and the streaming
//! pipeline (checkpoint.rs), positioned reads into pinned buffers (staging.rs), the upload to a GPU run whole in Rust (upload.rs), conversion into
//! sharded safetensors with its `Output` tensors (convert.rs), errors resolved at import (errors.rs).
//!
//! Every entry point extracts its arguments, runs the core with the GIL released, then builds Python
//! objects.

#![deny(missing_docs)]

use pyo3::prelude::*;

// mimalloc keeps freed pages for reuse: without it every large output buffer was a fresh mmap, and
// the page faults and munmap TLB shootdowns across all worker threads dominated a cold run (13 s
// instead of 1.6 s for a 7B checkpoint on a 16-core VM; benches/gpu/profile_load.py).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `release_memory()`: hands the memory mimalloc keeps for reuse (the freed buffers of finished jobs)
/// back to the operating system, on this thread's heap and the abandoned ones of finished threads.
#[pyfunction]
fn release_memory(py: Python<'_>) {
    // SAFETY: mi_collect only walks mimalloc's own heaps; it takes no pointers from us.
    py.allow_threads(|| unsafe { libmimalloc_sys::mi_collect(true) });
}

mod buffer;
mod checkpoint;
mod convert;
mod errors;
mod job;
mod ops;
mod packed;
mod staging;
mod upload;

/// The extension module; importing it resolves fastq's exception classes (`errors::init`).
#[pymodule]
fn _fastq(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::init(m.py())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<buffer::Buffer>()?;
    m.add_class::<checkpoint::Checkpoint>()?;
    m.add_class::<checkpoint::QuantizeIter>()?;
    m.add_class::<job::Job>()?;
    m.add_class::<packed::Packed4bit>()?;
    m.add_class::<packed::PackedInt8>()?;
    m.add_class::<convert::Output>()?;
    m.add_class::<staging::Reader>()?;
    m.add_class::<staging::ReadTicket>()?;
    m.add_class::<upload::Upload>()?;
    m.add_function(wrap_pyfunction!(ops::quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(ops::quantize_int8, m)?)?;
    m.add_function(wrap_pyfunction!(ops::quantize_nested_blockwise, m)?)?;
    m.add_function(wrap_pyfunction!(ops::quantize_nested, m)?)?;
    m.add_function(wrap_pyfunction!(ops::kernel_name, m)?)?;
    m.add_function(wrap_pyfunction!(ops::thread_count, m)?)?;
    m.add_function(wrap_pyfunction!(ops::dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(ops::code_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(convert::convert, m)?)?;
    m.add_function(wrap_pyfunction!(convert::plan_layout, m)?)?;
    m.add_function(wrap_pyfunction!(convert::py_float_repr, m)?)?;
    m.add_function(wrap_pyfunction!(convert::quant_state_json, m)?)?;
    m.add_function(wrap_pyfunction!(convert::part_names, m)?)?;
    m.add_function(wrap_pyfunction!(errors::error_samples, m)?)?;
    m.add_function(wrap_pyfunction!(release_memory, m)?)?;
    Ok(())
}
