//! The file format: dtypes, encodings, the header and the limits a reader enforces.

pub mod compression;
pub mod dtype;
pub mod encoding;
pub mod header;
mod json;
pub mod limits;

pub use dtype::DType;
pub use encoding::{Encoding, GroupLayout, GroupParams, PartSpec};
pub use header::{Header, PartInfo, TensorInfo};
