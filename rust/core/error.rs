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
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// An operating-system error while opening, mapping, reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The safetensors header is not what the format says it must be.
    #[error("{path}: invalid safetensors header: {reason}")]
    InvalidHeader {
        /// The shard (or the index, or the manifest).
        path: PathBuf,
        /// The tensor whose entry is wrong; empty when the fault is not one entry's (a bad length,
        /// JSON that does not parse). `reason` names it too.
        tensor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file ends before the data a tensor's header entry points to.
    #[error("{path}: tensor '{tensor}' needs bytes up to {end} but the file holds only {file_len} (truncated shard?)")]
    ShardTruncated {
        /// The shard.
        path: PathBuf,
        /// The first tensor whose bytes are missing.
        tensor: String,
        /// Where its bytes end in the file.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A tensor's byte range is inconsistent with its shape and dtype.
    #[error("{path}: tensor '{tensor}' has {actual} bytes but shape {shape:?} x {dtype} needs {expected}")]
    SizeMismatch {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape, as the header gives it.
        shape: Vec<usize>,
        /// Its dtype, as the header gives it.
        dtype: String,
        /// The bytes shape x dtype needs.
        expected: u64,
        /// The bytes its data offsets span.
        actual: u64,
    },
    /// Two tensors claim the same bytes.
    #[error("{path}: tensors '{first}' and '{second}' overlap in the data section")]
    Overlap {
        /// The shard.
        path: PathBuf,
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// `model.safetensors.index.json` names a shard that is not on disk.
    #[error("{index}: shard '{shard}' (holding tensor '{tensor}') is missing")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name.
        shard: String,
        /// A tensor the index routes to it.
        tensor: String,
    },
    /// `model.safetensors.index.json` routes a tensor to a shard that does not contain it.
    #[error("{index}: tensor '{tensor}' is mapped to '{shard}', which does not contain it")]
    IndexMismatch {
        /// The index file.
        index: PathBuf,
        /// The shard's file name.
        shard: String,
        /// The tensor.
        tensor: String,
    },
    /// The same tensor name appears in two shards.
    #[error("tensor '{tensor}' appears in both {first} and {second}")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// The first shard holding it.
        first: PathBuf,
        /// The second shard holding it.
        second: PathBuf,
    },
    /// A tensor name the caller asked for is not in the checkpoint.
    #[error("{path}: no tensor named '{tensor}'")]
    UnknownTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// A tensor's dtype cannot be quantized (only F32, F16 and BF16 can).
    #[error("{path}: tensor '{tensor}' has dtype {dtype}, which cannot be quantized (F32, F16 or BF16 only)")]
    UnsupportedDtype {
        /// The shard (empty for a tensor handed over by the caller).
        path: PathBuf,
        /// The tensor (empty when unnamed).
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
    /// A dtype name the caller gave that is not one of safetensors' (`BF16`, `F32`, `U8`, ...).
    #[error("unknown safetensors dtype '{dtype}' (BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64, F8_E4M3, F8_E5M2)")]
    UnknownDtype {
        /// The name given.
        dtype: String,
    },
    /// The weight holds NaN or infinity, which no quantized format can represent.
    #[error("{path}: tensor '{tensor}' holds a non-finite value (NaN or inf) at element {index}")]
    NonFinite {
        /// The shard (empty for a tensor handed over by the caller).
        path: PathBuf,
        /// The tensor (empty when unnamed).
        tensor: String,
        /// The first non-finite element (row-major).
        index: usize,
    },
    /// A shape the operation cannot handle (an int8 weight that is not 2-D, an empty tensor, ...).
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadShape {
        /// The shard (empty for a tensor handed over by the caller).
        path: PathBuf,
        /// The tensor (empty when unnamed).
        tensor: String,
        /// What is wrong with the shape.
        reason: String,
    },
    /// An element range of a tensor (`Job::range`) that cannot be quantized on its own.
    #[error("{path}: tensor '{tensor}': element range {start}..{end}: {reason}")]
    BadRange {
        /// The shard (empty before the job met its checkpoint).
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The range's first element.
        start: usize,
        /// The range's end, as asked.
        end: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An argument outside what bitsandbytes accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The caller stopped a run (its progress callback asked to) before it finished.
    #[error("the run was cancelled")]
    Cancelled,
    /// The GPU's driver refused a call (no driver, no context, a failed copy).
    #[error("device: {0}")]
    Device(String),
    /// Something the core needs failed that no input explains (a thread could not start, a worker
    /// panicked): a bug or an exhausted resource, never the checkpoint's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The variant's name (`"ShardTruncated"`), for the binding's table of exception classes.
    pub fn variant(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "NotFound",
            Error::Io { .. } => "Io",
            Error::InvalidHeader { .. } => "InvalidHeader",
            Error::ShardTruncated { .. } => "ShardTruncated",
            Error::SizeMismatch { .. } => "SizeMismatch",
            Error::Overlap { .. } => "Overlap",
            Error::MissingShard { .. } => "MissingShard",
            Error::IndexMismatch { .. } => "IndexMismatch",
            Error::DuplicateTensor { .. } => "DuplicateTensor",
            Error::UnknownTensor { .. } => "UnknownTensor",
            Error::UnsupportedDtype { .. } => "UnsupportedDtype",
            Error::UnknownDtype { .. } => "UnknownDtype",
            Error::NonFinite { .. } => "NonFinite",
            Error::BadShape { .. } => "BadShape",
            Error::BadRange { .. } => "BadRange",
            Error::InvalidArgument(_) => "InvalidArgument",
            Error::Cancelled => "Cancelled",
            Error::Device(_) => "Device",
            Error::Internal(_) => "Internal",
        }
    }

    /// One error of every variant, with a file and a tensor where the variant has them (for tests
    /// that check each variant's mapping; `variant` is exhaustive, so a new variant must be added to
    /// it, and the core test `samples_cover_every_variant` checks this list against it).
    pub fn samples() -> Vec<Error> {
        let path = || PathBuf::from("/ckpt/model-00001-of-00002.safetensors");
        let tensor = || "model.layers.0.mlp.up_proj.weight".to_string();
        vec![
            Error::NotFound { path: path() },
            Error::Io {
                path: path(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            },
            Error::InvalidHeader {
                path: path(),
                tensor: tensor(),
                reason: "entry for tensor 'model.layers.0.mlp.up_proj.weight' is malformed".into(),
            },
            Error::ShardTruncated {
                path: path(),
                tensor: tensor(),
                end: 100,
                file_len: 50,
            },
            Error::SizeMismatch {
                path: path(),
                tensor: tensor(),
                shape: vec![2, 3],
                dtype: "BF16".into(),
                expected: 12,
                actual: 10,
            },
            Error::Overlap {
                path: path(),
                first: tensor(),
                second: "b".into(),
            },
            Error::MissingShard {
                index: path(),
                shard: "model-00002-of-00002.safetensors".into(),
                tensor: tensor(),
            },
            Error::IndexMismatch {
                index: path(),
                shard: "model-00002-of-00002.safetensors".into(),
                tensor: tensor(),
            },
            Error::DuplicateTensor {
                tensor: tensor(),
                first: path(),
                second: PathBuf::from("/ckpt/model-00002-of-00002.safetensors"),
            },
            Error::UnknownTensor {
                path: path(),
                tensor: tensor(),
            },
            Error::UnsupportedDtype {
                path: path(),
                tensor: tensor(),
                dtype: "I64".into(),
            },
            Error::UnknownDtype { dtype: "F7".into() },
            Error::NonFinite {
                path: path(),
                tensor: tensor(),
                index: 3,
            },
            Error::BadShape {
                path: path(),
                tensor: tensor(),
                reason: "not 2-D".into(),
            },
            Error::BadRange {
                path: path(),
                tensor: tensor(),
                start: 32,
                end: 128,
                reason: "start is not on a 64-element block boundary".into(),
            },
            Error::InvalidArgument("blocksize 7".into()),
            Error::Cancelled,
            Error::Device("cuMemcpyHtoDAsync: CUDA_ERROR_ILLEGAL_ADDRESS".into()),
            Error::Internal("a worker panicked".into()),
        ]
    }

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
            Error::BadRange {
                start, end, reason, ..
            } => Error::BadRange {
                path: path.to_path_buf(),
                tensor: tensor.to_string(),
                start,
                end,
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

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn samples_cover_every_variant() {
        let names: Vec<&str> = Error::samples().iter().map(Error::variant).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            names.len(),
            "one sample per variant: {names:?}"
        );
        // `variant` is an exhaustive match: count its arms to catch a variant without a sample.
        let arms = include_str!("error.rs")
            .lines()
            .filter(|l| l.trim_start().starts_with("Error::") && l.contains("=> \""))
            .count();
        assert_eq!(arms, names.len(), "every variant has a sample");
    }
}
