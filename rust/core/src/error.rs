//! One error type for the whole core; the Python layer maps each kind to an exception class.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// The file breaks a rule of the spec (section 7 of spec/FORMAT.md).
    #[error("{0}")]
    Format(String),
    /// A part's bytes do not match its recorded checksum.
    #[error("{0}")]
    Checksum(String),
    /// Well-formed but beyond this reader: newer version, unknown encoding, dtype or compression.
    #[error("{0}")]
    Unsupported(String),
    /// Input values that cannot be quantized (NaN/Inf, scale overflow) or bad arguments.
    #[error("{0}")]
    Quantization(String),
    /// Invalid arguments from the caller (shape mismatch, unknown name, ...).
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

macro_rules! format_err {
    ($($arg:tt)*) => { $crate::error::Error::Format(format!($($arg)*)) };
}
pub(crate) use format_err;
