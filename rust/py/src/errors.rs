//! Maps every core error to the exception hierarchy defined in `fastq/errors.py` (Python classes, so
//! that each can also be a FileNotFoundError, KeyError, TypeError or ValueError). The exception carries
//! `path` and `tensor` attributes where the error names them.

use fastq::Error;
use pyo3::prelude::*;

fn class_of(e: &Error) -> &'static str {
    match e {
        Error::NotFound { .. } | Error::MissingShard { .. } => "MissingFileError",
        Error::Io { .. } => "FastqIOError",
        Error::InvalidHeader { .. }
        | Error::SizeMismatch { .. }
        | Error::Overlap { .. }
        | Error::IndexMismatch { .. }
        | Error::DuplicateTensor { .. } => "HeaderError",
        Error::ShardTruncated { .. } => "TruncatedShardError",
        Error::UnknownTensor { .. } => "UnknownTensorError",
        Error::UnsupportedDtype { .. } => "UnsupportedDtypeError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::BadShape { .. } => "ShapeError",
        Error::InvalidArgument(_) => "InvalidArgumentError",
    }
}

fn path_and_tensor(e: &Error) -> (Option<String>, Option<String>) {
    let p = |p: &std::path::Path| Some(p.display().to_string());
    let t = |t: &str| {
        if t.is_empty() {
            None
        } else {
            Some(t.to_string())
        }
    };
    match e {
        Error::NotFound { path } | Error::Io { path, .. } | Error::InvalidHeader { path, .. } => {
            (p(path), None)
        }
        Error::ShardTruncated { path, tensor, .. }
        | Error::SizeMismatch { path, tensor, .. }
        | Error::UnknownTensor { path, tensor }
        | Error::UnsupportedDtype { path, tensor, .. }
        | Error::NonFinite { path, tensor, .. }
        | Error::BadShape { path, tensor, .. } => (p(path).filter(|s| !s.is_empty()), t(tensor)),
        Error::Overlap { path, first, .. } => (p(path), t(first)),
        Error::MissingShard { index, tensor, .. } | Error::IndexMismatch { index, tensor, .. } => {
            (p(index), t(tensor))
        }
        Error::DuplicateTensor { tensor, second, .. } => (p(second), t(tensor)),
        Error::InvalidArgument(_) => (None, None),
    }
}

/// Converts a core error into the matching Python exception.
pub fn to_py(e: Error) -> PyErr {
    Python::with_gil(|py| {
        let build = || -> PyResult<PyErr> {
            let module = py.import("fastq.errors")?;
            let cls = module.getattr(class_of(&e))?;
            let (path, tensor) = path_and_tensor(&e);
            let exc = cls.call1((e.to_string(),))?;
            exc.setattr("path", path)?;
            exc.setattr("tensor", tensor)?;
            Ok(PyErr::from_value(exc))
        };
        build().unwrap_or_else(|err| err)
    })
}

/// `Result` to `PyResult`.
pub trait IntoPy<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for fastq::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
