//! Core errors become the Python exceptions defined in `qtensors/errors.py`.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use qtensors_core::Error;

pyo3::import_exception!(qtensors.errors, FormatError);
pyo3::import_exception!(qtensors.errors, ChecksumError);
pyo3::import_exception!(qtensors.errors, UnsupportedError);
pyo3::import_exception!(qtensors.errors, QuantizationError);

pub fn to_py(e: Error) -> PyErr {
    match e {
        Error::Format(m) => FormatError::new_err(m),
        Error::Checksum(m) => ChecksumError::new_err(m),
        Error::Unsupported(m) => UnsupportedError::new_err(m),
        Error::Quantization(m) => QuantizationError::new_err(m),
        Error::Invalid(m) => PyValueError::new_err(m),
        Error::Io { context, source } => {
            // OSError(errno, text) picks the subclass (FileNotFoundError, PermissionError, ...).
            let text = format!("{context}: {source}");
            match source.raw_os_error() {
                Some(code) => PyOSError::new_err((code, text)),
                None => PyOSError::new_err(text),
            }
        }
    }
}

pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
