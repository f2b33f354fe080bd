//! Sharded safetensors output, streamed and resumable: a quantized checkpoint written the way
//! transformers' `save_pretrained` writes a bitsandbytes model, without holding it in memory.
//!
//! - `layout`: every output tensor's dtype, shape, size, shard and offset, decided before writing
//!   (transformers' split into shards, safetensors' order and header inside each);
//! - `run`: the conversion itself: results of the quantization pipeline are written where they belong
//!   as they arrive, unquantized tensors are copied (and cast) beside them, progress is reported and
//!   the run can be cancelled;
//! - `manifest`: `fastq-manifest.json`, the checksum of each finished shard and the run's parameters,
//!   so that a resumed run keeps the shards it can verify; `digest`: that checksum (SHA-256 over the
//!   SHA-256s of 16 MiB chunks, taken while the shard is written); `sources`: the digest of the source
//!   bytes each shard is made from, so that a resumed run notices a source changed in place;
//! - `pyjson`: the `quant_state` JSON, byte for byte as bitsandbytes' `json.dumps` writes it.
//!
//! The writer fills a folder the caller chose; making the result appear atomically (a temporary
//! sibling folder renamed into place) is the caller's part (`fastq.convert`).

pub mod digest;
mod files;
pub mod layout;
pub mod manifest;
mod parts;
pub mod pyjson;
pub mod run;
pub mod sources;
#[cfg(test)]
mod tests;

pub use layout::{Content, Layout, Output, Part};
pub use manifest::{Manifest, ShardRecord, MANIFEST_NAME};
pub use pyjson::{py_float_repr, quant_state_json};
pub use run::{convert, Options, Progress, ShardSummary, Summary};
