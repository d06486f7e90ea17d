//! Reading and writing files: the memory-mapped reader, the atomic writer, checksums.

pub mod checksum;
pub mod reader;
pub mod writer;

pub use reader::QFile;
pub use writer::{FileWriter, PlannedTensor};
