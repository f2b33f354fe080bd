//! One error type for the whole core. Every variant names the file and, where there is one, the tensor,
//! so that the Python side can raise an exception a user can act on.

use std::path::PathBuf;

/// Result alias used across the core.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while reading, validating, quantizing or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that should exist does not.
    #[error("{path}: no such file")]
    NotFound { path: PathBuf },
    /// An operating-system error while opening, mapping, reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The safetensors header is not what the format says it must be.
    #[error("{path}: invalid safetensors header: {reason}")]
    InvalidHeader { path: PathBuf, reason: String },
    /// The file ends before the data a tensor's header entry points to.
    #[error("{path}: tensor '{tensor}' needs bytes up to {end} but the file holds only {file_len} (truncated shard?)")]
    ShardTruncated {
        path: PathBuf,
        tensor: String,
        end: u64,
        file_len: u64,
    },
    /// A tensor's byte range is inconsistent with its shape and dtype.
    #[error("{path}: tensor '{tensor}' has {actual} bytes but shape {shape:?} x {dtype} needs {expected}")]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        dtype: String,
        expected: u64,
        actual: u64,
    },
    /// Two tensors claim the same bytes.
    #[error("{path}: tensors '{first}' and '{second}' overlap in the data section")]
    Overlap {
        path: PathBuf,
        first: String,
        second: String,
    },
    /// `model.safetensors.index.json` names a shard that is not on disk.
    #[error("{index}: shard '{shard}' (holding tensor '{tensor}') is missing")]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// `model.safetensors.index.json` routes a tensor to a shard that does not contain it.
    #[error("{index}: tensor '{tensor}' is mapped to '{shard}', which does not contain it")]
    IndexMismatch {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// The same tensor name appears in two shards.
    #[error("tensor '{tensor}' appears in both {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// A tensor name the caller asked for is not in the checkpoint.
    #[error("{path}: no tensor named '{tensor}'")]
    UnknownTensor { path: PathBuf, tensor: String },
    /// A tensor's dtype cannot be quantized (only F32, F16 and BF16 can).
    #[error("{path}: tensor '{tensor}' has dtype {dtype}, which cannot be quantized (F32, F16 or BF16 only)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// The weight holds NaN or infinity, which no quantized format can represent.
    #[error("{path}: tensor '{tensor}' holds a non-finite value (NaN or inf) at element {index}")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
    },
    /// A shape the operation cannot handle (an int8 weight that is not 2-D, an empty tensor, ...).
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadShape {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// An argument outside what bitsandbytes accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Wraps an `io::Error` with the path it happened on; "not found" gets its own variant.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }

    /// Shifts the element index of a `NonFinite` error raised on a chunk that starts at element `by`.
    pub fn offset_index(self, by: usize) -> Self {
        match self {
            Error::NonFinite {
                path,
                tensor,
                index,
            } => Error::NonFinite {
                path,
                tensor,
                index: index + by,
            },
            e => e,
        }
    }

    /// Fills in the file and tensor of an error raised by a kernel that knew neither.
    pub fn at(self, path: &std::path::Path, tensor: &str) -> Self {
        match self {
            Error::NonFinite { index, .. } => Error::NonFinite {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                index,
            },
            Error::BadShape { reason, .. } => Error::BadShape {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                reason,
            },
            Error::UnsupportedDtype { dtype, .. } => Error::UnsupportedDtype {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                dtype,
            },
            other => other,
        }
    }
}
