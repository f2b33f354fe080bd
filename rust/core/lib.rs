//! fastq core: memory-mapped safetensors checkpoints quantized to bitsandbytes' 4-bit (NF4/FP4, double
//! quantization) and 8-bit (LLM.int8) formats on all cores. No Python here: the `fastq._fastq` binding
//! (rust/py) wraps it.

#![deny(missing_docs)]

pub mod cast;
pub mod checkpoint;
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod guard;
pub mod header;
pub mod job;
pub mod pack;
pub mod pipeline;
pub mod quant;
pub mod staging;
pub mod upload;
pub mod writer;

pub use checkpoint::{Checkpoint, TensorInfo};
pub use dtype::{Dtype, FloatSlice};
pub use error::{Error, Result};
pub use job::Job;
pub use pack::{Packed, Packed4, PackedInt8, QuantSpec};
pub use quant::{Kernel, QuantType};
