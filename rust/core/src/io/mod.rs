//! Reading and writing files: the memory-mapped reader, the streaming reader, the atomic writer,
//! checksums.

pub mod checksum;
pub mod reader;
#[cfg(unix)]
pub mod stream;
pub mod writer;

pub use reader::QFile;
#[cfg(unix)]
pub use stream::{ReadMode, StreamFile};
pub use writer::{FileWriter, PlannedTensor};
