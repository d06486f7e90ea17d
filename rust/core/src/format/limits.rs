//! Hard limits of spec section 7: a reader refuses anything beyond them before reading data.

pub const MAGIC: &[u8; 8] = b"QTENSORS";
pub const VERSION_MAJOR: u16 = 1;
/// 1.1: compressed parts (spec 2.1). Files without them are still written as 1.0.
pub const VERSION_MINOR: u16 = 1;
/// magic (8) + major (2) + minor (2) + reserved (4) + header_len (8)
pub const PREFIX_LEN: usize = 24;
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;
pub const MAX_TENSORS: usize = 1_000_000;
pub const MAX_NAME_LEN: usize = 1024;
pub const MAX_RANK: usize = 32;
pub const MIN_ALIGNMENT: u64 = 64;
pub const MAX_ALIGNMENT: u64 = 1 << 20;
pub const DEFAULT_ALIGNMENT: u64 = 64;
pub const DIRECT_IO_ALIGNMENT: u64 = 4096;
/// JSON values (numbers, strings, arrays, objects, each counted) in one `encoding` object.
pub const MAX_ENCODING_VALUES: usize = 1024;
/// Every dimension, and the byte size of a tensor with its zero dimensions counted as 1, must fit
/// in a signed 64-bit integer: numpy and torch refuse (or overflow computing strides) beyond it.
pub const MAX_SHAPE_BYTES: u64 = i64::MAX as u64;
