//! qtensors-core: the qtensors file format (spec/FORMAT.md), its codecs and its I/O.
//!
//! * [`format`]: dtypes, encodings, header parsing and validation of untrusted files;
//! * [`codecs`]: group quantization and dequantization with SIMD kernels and runtime dispatch;
//! * [`tensor`]: whole tensors to parts and back;
//! * [`io`]: the atomic writer and the memory-mapped reader.

pub mod codecs;
pub mod error;
pub mod format;
pub mod io;
pub mod matmul;
pub mod tensor;

pub use error::{Error, Result};
