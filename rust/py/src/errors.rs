//! Maps every core error to the exception hierarchy defined in `fastq/errors.py` (Python classes, so
//! that each can also be a FileNotFoundError, KeyError, TypeError or ValueError). The classes are
//! looked up once, when the extension is imported: a missing class fails the import, not a user's run.
//! The exception carries `path` and `tensor` attributes where the error names them.

use fastq::Error;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyList, PyType};

/// The Python class (in `fastq.errors`) of each core error variant.
const CLASSES: &[(&str, &str)] = &[
    ("NotFound", "MissingFileError"),
    ("MissingShard", "MissingFileError"),
    ("Io", "FastqIOError"),
    ("InvalidHeader", "HeaderError"),
    ("SizeMismatch", "HeaderError"),
    ("Overlap", "HeaderError"),
    ("IndexMismatch", "HeaderError"),
    ("DuplicateTensor", "HeaderError"),
    ("ShardTruncated", "TruncatedShardError"),
    ("UnknownTensor", "UnknownTensorError"),
    ("UnsupportedDtype", "UnsupportedDtypeError"),
    ("UnknownDtype", "UnsupportedDtypeError"),
    ("NonFinite", "NonFiniteError"),
    ("BadShape", "ShapeError"),
    ("BadRange", "ShapeError"),
    ("InvalidArgument", "InvalidArgumentError"),
    ("Cancelled", "CancelledError"),
    ("Device", "DeviceError"),
    ("Internal", "InternalError"),
];

/// The resolved classes, in `CLASSES` order.
static RESOLVED: GILOnceCell<Vec<Py<PyType>>> = GILOnceCell::new();

/// Imports `fastq.errors` and resolves every class (called from the module's init).
pub fn init(py: Python<'_>) -> PyResult<()> {
    let module = py.import("fastq.errors")?;
    let classes = CLASSES
        .iter()
        .map(|(_, class)| Ok(module.getattr(*class)?.downcast_into::<PyType>()?.unbind()))
        .collect::<PyResult<Vec<_>>>()?;
    let _ = RESOLVED.set(py, classes);
    Ok(())
}

fn class_of<'py>(py: Python<'py>, e: &Error) -> &'py Bound<'py, PyType> {
    let i = CLASSES
        .iter()
        .position(|(v, _)| *v == e.variant())
        .expect("every core error variant has a class (tests/test_errors.py)");
    RESOLVED.get(py).expect("resolved at import")[i].bind(py)
}

fn path_and_tensor(e: &Error) -> (Option<String>, Option<String>) {
    let p = |p: &std::path::Path| Some(p.display().to_string()).filter(|s| !s.is_empty());
    let t = |t: &str| Some(t.to_string()).filter(|s| !s.is_empty());
    match e {
        Error::NotFound { path } | Error::Io { path, .. } => (p(path), None),
        Error::InvalidHeader { path, tensor, .. }
        | Error::ShardTruncated { path, tensor, .. }
        | Error::SizeMismatch { path, tensor, .. }
        | Error::UnknownTensor { path, tensor }
        | Error::UnsupportedDtype { path, tensor, .. }
        | Error::NonFinite { path, tensor, .. }
        | Error::BadShape { path, tensor, .. }
        | Error::BadRange { path, tensor, .. } => (p(path), t(tensor)),
        Error::Overlap { path, first, .. } => (p(path), t(first)),
        Error::MissingShard { index, tensor, .. } | Error::IndexMismatch { index, tensor, .. } => {
            (p(index), t(tensor))
        }
        Error::DuplicateTensor { tensor, second, .. } => (p(second), t(tensor)),
        Error::UnknownDtype { .. }
        | Error::InvalidArgument(_)
        | Error::Cancelled
        | Error::Device(_)
        | Error::Internal(_) => (None, None),
    }
}

/// Converts a core error into the matching Python exception.
pub fn to_py(e: Error) -> PyErr {
    Python::with_gil(|py| {
        let build = || -> PyResult<PyErr> {
            let (path, tensor) = path_and_tensor(&e);
            let exc = class_of(py, &e).call1((e.to_string(),))?;
            exc.setattr("path", path)?;
            exc.setattr("tensor", tensor)?;
            Ok(PyErr::from_value(exc))
        };
        build().unwrap_or_else(|err| err)
    })
}

/// `error_samples() -> [(variant, exception)]`: one exception of every core error variant, as the
/// binding raises it (tests/test_errors.py checks each class, path and tensor).
#[pyfunction]
pub fn error_samples(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let items = Error::samples()
        .into_iter()
        .map(|e| (e.variant(), to_py(e).into_value(py)));
    PyList::new(py, items)
}

/// `Result` to `PyResult`.
pub trait IntoPy<T> {
    /// Maps the core error to its Python exception.
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for fastq::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
