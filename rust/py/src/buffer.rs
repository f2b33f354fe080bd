//! A Rust-owned byte buffer exposed through the buffer protocol, so that `torch.frombuffer` wraps it
//! without a copy. The buffer keeps its owner (a Vec or a shard mapping) alive for as long as any
//! Python view of it exists.

use std::ffi::c_int;
use std::sync::Arc;

use fastq::guard::GuardedMap;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// What keeps the bytes alive.
enum Owner {
    Bytes(#[allow(dead_code)] Vec<u8>),
    Floats(#[allow(dead_code)] Vec<f32>),
    Ints(#[allow(dead_code)] Vec<i8>),
    Map(#[allow(dead_code)] Arc<GuardedMap>),
}

/// A contiguous run of bytes owned by Rust (`memoryview(buf)` or `torch.frombuffer(buf, dtype=...)`).
#[pyclass(module = "fastq._fastq", frozen)]
pub struct Buffer {
    _owner: Owner,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer refers to memory owned by `_owner` (heap Vec or a private mapping), which moves
// with the Buffer and is never reallocated; nothing in Rust mutates it after construction.
unsafe impl Send for Buffer {}
// SAFETY: as above; concurrent access from Python goes through the buffer protocol like any bytearray.
unsafe impl Sync for Buffer {}

impl Buffer {
    pub fn from_bytes(mut v: Vec<u8>) -> Self {
        let (ptr, len) = (v.as_mut_ptr(), v.len());
        Buffer {
            _owner: Owner::Bytes(v),
            ptr,
            len,
        }
    }
    pub fn from_f32(mut v: Vec<f32>) -> Self {
        let (ptr, len) = (v.as_mut_ptr() as *mut u8, v.len() * 4);
        Buffer {
            _owner: Owner::Floats(v),
            ptr,
            len,
        }
    }
    pub fn from_i8(mut v: Vec<i8>) -> Self {
        let (ptr, len) = (v.as_mut_ptr() as *mut u8, v.len());
        Buffer {
            _owner: Owner::Ints(v),
            ptr,
            len,
        }
    }
    /// A window `start..end` of a shard mapping.
    pub fn from_map(map: Arc<GuardedMap>, start: usize, end: usize) -> fastq::Result<Self> {
        if start > end || end > map.len() {
            return Err(fastq::Error::Internal(format!(
                "bytes {start}..{end} are outside a {}-byte mapping",
                map.len()
            )));
        }
        // SAFETY: start..end lies inside the mapping (checked above); the Arc keeps it alive.
        let ptr = unsafe { (map.as_ptr() as *mut u8).add(start) };
        Ok(Buffer {
            _owner: Owner::Map(map),
            ptr,
            len: end - start,
        })
    }
}

#[pymethods]
impl Buffer {
    fn __len__(&self) -> usize {
        self.len
    }

    /// Address of the first byte (for tests that check nothing was copied).
    #[getter]
    fn address(&self) -> usize {
        self.ptr as usize
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        let this = slf.get();
        // A zero-length buffer still needs a valid pointer.
        let mut empty = 0u8;
        let ptr = if this.len == 0 {
            &mut empty as *mut u8
        } else {
            this.ptr
        };
        // SAFETY: `view` is a valid Py_buffer supplied by the interpreter; FillInfo stores a new
        // reference to `slf` in view.obj, so the owner outlives every view.
        let rc = ffi::PyBuffer_FillInfo(
            view,
            slf.as_ptr(),
            ptr as *mut _,
            this.len as ffi::Py_ssize_t,
            0,
            flags,
        );
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
