//! `qtensors._core`: a thin PyO3 layer over qtensors-core. Every call that touches tensor data
//! releases the GIL.

mod buffers;
mod errors;

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::ops::Range;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use qtensors_core::codecs::{compress, simd};
use qtensors_core::format::{DType, Encoding, TensorInfo};
use qtensors_core::io::{FileWriter, PlannedTensor, QFile, ReadMode, StreamFile};
use qtensors_core::tensor;

use buffers::{fill_view, AlignedBytes, InputBytes, OwnedBuffer};
use errors::IntoPyResult;

fn parse_dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).ok_or_else(|| PyValueError::new_err(format!("unknown dtype '{name}'")))
}

fn parse_encoding(json: &str, rank: usize) -> PyResult<Encoding> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| PyValueError::new_err(format!("encoding is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| PyValueError::new_err("encoding must be a JSON object"))?;
    Encoding::from_json(obj, rank, false).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A validated, memory-mapped qtensors file. Exports the whole mapping as a buffer; parts are
/// slices of it at `data_start + offset`.
#[pyclass(frozen, module = "qtensors._core")]
struct Reader {
    file: QFile,
    base: usize,
}

#[pymethods]
impl Reader {
    #[new]
    #[pyo3(signature = (path, lenient = false))]
    fn new(py: Python<'_>, path: PathBuf, lenient: bool) -> PyResult<Self> {
        let mut file = py.detach(|| QFile::open(&path, lenient)).py()?;
        let base = file.as_mut_ptr() as usize;
        Ok(Reader { file, base })
    }

    /// The validated header as JSON (normalized, sorted keys).
    fn header_json(&self) -> String {
        self.file.header().to_json()
    }

    /// Tensor names in file order (listing a file needs no JSON round trip of the header).
    fn names(&self) -> Vec<&str> {
        self.file
            .header()
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect()
    }

    /// One tensor's header entry as JSON.
    fn tensor_json(&self, name: &str) -> PyResult<String> {
        Ok(self.file.tensor(name).py()?.to_json())
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.file.header().metadata.clone()
    }

    #[getter]
    fn alignment(&self) -> u64 {
        self.file.header().alignment
    }

    #[getter]
    fn data_start(&self) -> usize {
        self.file.data_start()
    }

    #[getter]
    fn version(&self) -> (u16, u16) {
        self.file.header().version
    }

    fn __len__(&self) -> usize {
        self.file.len()
    }

    /// Decode a tensor to its logical dtype: into `out` (a writable contiguous buffer of the exact
    /// size) or into a new buffer. `region`: one (start, stop) per dimension, to decode only that
    /// box (reading only the groups it touches).
    #[pyo3(signature = (name, out = None, region = None))]
    fn decode(
        &self,
        py: Python<'_>,
        name: &str,
        out: Option<&Bound<'_, PyAny>>,
        region: Option<Vec<(u64, u64)>>,
    ) -> PyResult<Option<OwnedBuffer>> {
        let t = self.file.tensor(name).py()?;
        let k = simd::best();
        let ranges: Vec<Range<u64>> = match region {
            Some(r) => r.iter().map(|&(a, b)| a..b).collect(),
            None => t.shape.iter().map(|&d| 0..d).collect(),
        };
        // Checked before the output is sized by it.
        tensor::check_decodable(t, &ranges).py()?;
        let n = ranges.iter().map(|r| r.end - r.start).product();
        decode_to(py, out, t, n, |dst| {
            self.file.decode_region(k, t, &ranges, dst)
        })
    }

    /// The decoded (decompressed) bytes of part `part` of tensor `name`, in a new buffer: what
    /// `get_quantized` returns for compressed parts, which cannot be views of the file.
    fn decode_part(&self, py: Python<'_>, name: &str, part: &str) -> PyResult<OwnedBuffer> {
        let t = self.file.tensor(name).py()?;
        let i = t.parts.iter().position(|p| p.name == part).ok_or_else(|| {
            PyValueError::new_err(format!("tensor '{name}' has no part '{part}'"))
        })?;
        let bytes = py.detach(|| self.file.decoded_part(t, i)).py()?;
        Ok(OwnedBuffer {
            data: AlignedBytes::from_vec(bytes),
        })
    }

    /// Check the checksums of one tensor, or of every tensor.
    #[pyo3(signature = (name = None))]
    fn verify(&self, py: Python<'_>, name: Option<&str>) -> PyResult<()> {
        match name {
            Some(n) => {
                let t = self.file.tensor(n).py()?;
                py.detach(|| self.file.verify_tensor(t)).py()
            }
            None => py.detach(|| self.file.verify()).py(),
        }
    }

    /// Raise FormatError when the file was truncated or rewritten since it was opened (one
    /// fstat; decode, verify and new buffer views check it themselves).
    fn check_unchanged(&self) -> PyResult<()> {
        self.file.check_unchanged().py()
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            // Views are zero-copy: refuse to hand out new ones over a truncated or rewritten
            // file (touching its lost pages would kill the process with SIGBUS).
            me.file.check_unchanged().py()?;
            (me.base as *mut u8, me.file.len())
        };
        // SAFETY: the mapping is private (copy-on-write) and lives as long as `slf`.
        unsafe { fill_view(view, flags, ptr, len, false, slf.into_any()) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// (part name, offset in a tensor's read buffer, length) of each part.
type PartPlaces = Vec<(String, u64, u64)>;

/// A validated qtensors file opened for streaming: copies tensors' byte ranges into caller
/// buffers (e.g. pinned host memory) with large reads, the GIL released. See
/// `qtensors_core::io::stream`.
#[pyclass(frozen, module = "qtensors._core")]
struct StreamReader {
    file: StreamFile,
}

#[pymethods]
impl StreamReader {
    #[new]
    #[pyo3(signature = (path, mode = "pread", threads = 4, chunk_size = 8 << 20))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        mode: &str,
        threads: usize,
        chunk_size: usize,
    ) -> PyResult<Self> {
        let mode = ReadMode::parse(mode).py()?;
        let file = py
            .detach(|| StreamFile::open(&path, mode, threads, chunk_size))
            .py()?;
        Ok(StreamReader { file })
    }

    fn header_json(&self) -> String {
        self.file.header().to_json()
    }

    #[getter]
    fn data_start(&self) -> u64 {
        self.file.data_start()
    }

    /// The read mode in use ('direct' and 'auto' become 'pread' where O_DIRECT is refused).
    #[getter]
    fn mode(&self) -> &'static str {
        self.file.mode().name()
    }

    #[getter]
    fn file_len(&self) -> u64 {
        self.file.file_len()
    }

    /// Absolute byte range (start, end) covering every part of tensor `index` (file order).
    fn tensor_range(&self, index: usize) -> PyResult<(u64, u64)> {
        self.file.tensor_range(index).py()
    }

    /// The buffer `read` fills for tensor `index`: (its size, [(part name, offset in it,
    /// length)]). Parts far apart in the file are read separately, not the span between them.
    fn tensor_layout(&self, index: usize) -> PyResult<(u64, PartPlaces)> {
        let l = self.file.tensor_layout(index).py()?;
        Ok((l.len, l.parts))
    }

    /// Read-ahead hint for the absolute byte range [start, start + length).
    fn will_need(&self, py: Python<'_>, start: u64, length: u64) {
        py.detach(|| self.file.will_need(start, length))
    }

    /// Read-ahead hint for the first `limit` bytes of tensor `index`'s parts.
    fn will_need_tensor(&self, py: Python<'_>, index: usize, limit: u64) -> PyResult<()> {
        py.detach(|| self.file.will_need_tensor(index, limit)).py()
    }

    /// Copy len(out) bytes of tensor `index`'s buffer (see `tensor_layout`), starting `offset`
    /// bytes into it, into `out` (a writable contiguous buffer); with `verify`, check the
    /// checksums of the parts that end in this piece.
    #[pyo3(signature = (index, offset, out, verify = false))]
    fn read(
        &self,
        py: Python<'_>,
        index: usize,
        offset: u64,
        out: &Bound<'_, PyAny>,
        verify: bool,
    ) -> PyResult<()> {
        let ob = InputBytes::new(out)?;
        // SAFETY: we hold the only Rust reference to the output buffer.
        let dst = unsafe { ob.as_mut_slice()? };
        py.detach(|| self.file.read(index, offset, dst, verify))
            .py()
    }

    /// Copy rows of tensor `index`'s buffer one after another into `out`: row `i` is the
    /// `row_len` bytes from `offset + i * stride`, for len(out) / row_len rows (a column block of
    /// a row-major part: a tensor-parallel shard), GIL released. No checksums (they cover whole
    /// parts).
    fn read_strided(
        &self,
        py: Python<'_>,
        index: usize,
        offset: u64,
        stride: u64,
        row_len: u64,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let ob = InputBytes::new(out)?;
        // SAFETY: we hold the only Rust reference to the output buffer.
        let dst = unsafe { ob.as_mut_slice()? };
        py.detach(|| self.file.read_strided(index, offset, stride, row_len, dst))
            .py()
    }
}

/// Writes a file: the layout is planned up front from names, dtypes, shapes and encodings; parts
/// are written in any order; `finish` publishes the file atomically. Dropped unfinished, nothing
/// is left behind.
#[pyclass(module = "qtensors._core")]
struct Writer {
    inner: Option<FileWriter>,
}

#[pymethods]
impl Writer {
    /// `tensors`: list of (name, dtype, shape, encoding JSON). `compression`: None or "zstd"
    /// (each part compressed in chunks of `chunk_size` where it pays; spec 2.1).
    #[new]
    #[pyo3(signature = (path, tensors, metadata = None, alignment = 64, compression = None, level = compress::DEFAULT_LEVEL, chunk_size = compress::DEFAULT_CHUNK))]
    fn new(
        path: PathBuf,
        tensors: Vec<(String, String, Vec<u64>, String)>,
        metadata: Option<BTreeMap<String, String>>,
        alignment: u64,
        compression: Option<&str>,
        level: i32,
        chunk_size: u64,
    ) -> PyResult<Self> {
        let options = match compression {
            None => None,
            Some("zstd") => Some(compress::Options { level, chunk_size }),
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "compression '{other}' is not one of: 'zstd'"
                )))
            }
        };
        let mut plans = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, enc) in tensors {
            plans.push(PlannedTensor {
                dtype: parse_dtype(&dtype)?,
                encoding: parse_encoding(&enc, shape.len())
                    .map_err(|e| PyValueError::new_err(format!("tensor '{name}': {e}")))?,
                name,
                shape,
            });
        }
        let meta = metadata.unwrap_or_default();
        let w = FileWriter::create_compressed(&path, plans, meta, alignment, options).py()?;
        Ok(Writer { inner: Some(w) })
    }

    fn header_json(&self) -> PyResult<String> {
        Ok(self.open()?.header().to_json())
    }

    /// Encode tensor `index` from its values (contiguous bytes of `dtype`) and write its parts.
    fn write_tensor(
        &mut self,
        py: Python<'_>,
        index: usize,
        data: &Bound<'_, PyAny>,
        dtype: &str,
    ) -> PyResult<()> {
        let src_dtype = parse_dtype(dtype)?;
        let input = InputBytes::new(data)?;
        let w = self.open_mut()?;
        let t = w
            .header()
            .tensors
            .get(index)
            .ok_or_else(|| PyValueError::new_err(format!("no tensor #{index}")))?
            .clone();
        if matches!(t.encoding, Encoding::Raw) {
            // Raw bytes go straight to the file, without an intermediate copy.
            if src_dtype != t.dtype {
                return Err(PyValueError::new_err(format!(
                    "tensor '{}' is planned as {} but {src_dtype} data was given",
                    t.name, t.dtype
                )));
            }
            return py.detach(|| w.write_part(index, 0, input.as_slice())).py();
        }
        let parts = py
            .detach(|| {
                tensor::encode_bytes(
                    simd::best(),
                    &t.encoding,
                    src_dtype,
                    &t.shape,
                    input.as_slice(),
                )
            })
            .map_err(|e| prefix_tensor(e, &t.name))?;
        py.detach(|| w.write_tensor(index, &parts)).py()
    }

    /// Write already-encoded parts (in encoding order) of tensor `index`.
    fn write_parts(
        &mut self,
        py: Python<'_>,
        index: usize,
        parts: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let inputs = parts
            .iter()
            .map(InputBytes::new)
            .collect::<PyResult<Vec<_>>>()?;
        let w = self.open_mut()?;
        py.detach(|| {
            for (i, p) in inputs.iter().enumerate() {
                w.write_part(index, i, p.as_slice())?;
            }
            Ok(())
        })
        .py()
    }

    /// Publish the file; returns its header JSON as written (compressed parts' stored sizes
    /// and offsets are known only once every part is in).
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("writer is already finished or aborted"))?;
        Ok(py.detach(|| w.finish()).py()?.to_json())
    }

    /// Drop the temporary file.
    fn abort(&mut self) {
        self.inner = None;
    }
}

impl Writer {
    fn open(&self) -> PyResult<&FileWriter> {
        self.inner
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("writer is already finished or aborted"))
    }
    fn open_mut(&mut self) -> PyResult<&mut FileWriter> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("writer is already finished or aborted"))
    }
}

fn prefix_tensor(e: qtensors_core::Error, name: &str) -> PyErr {
    use qtensors_core::Error as E;
    let e = match e {
        E::Quantization(m) => E::Quantization(format!("tensor '{name}': {m}")),
        E::Invalid(m) => E::Invalid(format!("tensor '{name}': {m}")),
        other => other,
    };
    errors::to_py(e)
}

/// Encode one tensor; returns its parts' bytes in encoding order.
#[pyfunction]
fn encode(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    dtype: &str,
    shape: Vec<u64>,
    encoding: &str,
) -> PyResult<Vec<OwnedBuffer>> {
    let dtype = parse_dtype(dtype)?;
    let enc = parse_encoding(encoding, shape.len())?;
    let input = InputBytes::new(data)?;
    let parts = py
        .detach(|| tensor::encode_bytes(simd::best(), &enc, dtype, &shape, input.as_slice()))
        .py()?;
    Ok(parts
        .into_iter()
        .map(|p| OwnedBuffer {
            data: AlignedBytes::from_vec(p),
        })
        .collect())
}

/// Decode a tensor of logical `dtype` and `shape` from its parts (in encoding order).
#[pyfunction]
#[pyo3(signature = (parts, dtype, shape, encoding, out = None))]
fn decode(
    py: Python<'_>,
    parts: Vec<Bound<'_, PyAny>>,
    dtype: &str,
    shape: Vec<u64>,
    encoding: &str,
    out: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<OwnedBuffer>> {
    let dtype = parse_dtype(dtype)?;
    let enc = parse_encoding(encoding, shape.len())?;
    let inputs = part_inputs(&parts, &enc, dtype, &shape)?;
    let info = TensorInfo {
        name: "<array>".into(),
        dtype,
        shape: shape.clone(),
        encoding: enc,
        parts: vec![],
    };
    let slices: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let k = simd::best();
    decode_to(py, out, &info, numel(&shape), |dst| {
        tensor::decode(k, &info, &slices, dst)
    })
}

/// `out = x @ W^T + bias` (the CPU matmul), `W` the 2-D quantized tensor `shape` (`[out, in]`)
/// given by its parts (in encoding order); `x` (`[batch, in]`), `bias` (`[out]`) and `out`
/// (`[batch, out]`, written) are buffers of `dtype` (float16, bfloat16 or float32). `exact`:
/// no int8 activations (else 4- and 8-bit integer codes multiply int8-quantized activations
/// where the CPU has AVX-512 VNNI): fp32 products, or bf16 tiles of the weight for bf16
/// batches where `linear_bf16_available`.
#[pyfunction]
#[pyo3(signature = (parts, shape, encoding, x, dtype, out, bias = None, exact = false))]
#[allow(clippy::too_many_arguments)]
fn linear(
    py: Python<'_>,
    parts: Vec<Bound<'_, PyAny>>,
    shape: Vec<u64>,
    encoding: &str,
    x: &Bound<'_, PyAny>,
    dtype: &str,
    out: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    exact: bool,
) -> PyResult<()> {
    let dtype = parse_dtype(dtype)?;
    let enc = parse_encoding(encoding, shape.len())?;
    let inputs = part_inputs(&parts, &enc, DType::Float32, &shape)?;
    let info = TensorInfo {
        name: "<weight>".into(),
        dtype: DType::Float32,
        shape,
        encoding: enc,
        parts: vec![],
    };
    let slices: Vec<&[u8]> = inputs.iter().map(|i| i.as_slice()).collect();
    let x = InputBytes::new(x)?;
    let bias = bias.map(InputBytes::new).transpose()?;
    let ob = InputBytes::new(out)?;
    // SAFETY: we hold the only Rust reference to the output buffer.
    let dst = unsafe { ob.as_mut_slice()? };
    let k = simd::best();
    py.detach(|| {
        let b = bias.as_ref().map(|b| b.as_slice());
        tensor::linear(k, &info, &slices, x.as_slice(), b, dtype, dst, exact)
    })
    .py()
}

/// The parts' buffers, checked against the encoding's part specs (count and sizes).
fn part_inputs(
    parts: &[Bound<'_, PyAny>],
    enc: &Encoding,
    dtype: DType,
    shape: &[u64],
) -> PyResult<Vec<InputBytes>> {
    let specs = enc.part_specs(dtype, shape).py()?;
    let inputs = parts
        .iter()
        .map(InputBytes::new)
        .collect::<PyResult<Vec<_>>>()?;
    if inputs.len() != specs.len() {
        return Err(PyValueError::new_err(format!(
            "encoding '{}' has {} parts, {} given",
            enc.name(),
            specs.len(),
            inputs.len()
        )));
    }
    for (s, i) in specs.iter().zip(&inputs) {
        if i.as_slice().len() as u64 != s.length {
            return Err(PyValueError::new_err(format!(
                "part '{}' has {} bytes, {} expected",
                s.name,
                i.as_slice().len(),
                s.length
            )));
        }
    }
    Ok(inputs)
}

fn numel(shape: &[u64]) -> u64 {
    qtensors_core::format::encoding::numel(shape).unwrap_or(0)
}

/// Run `decode` (without the GIL) into `out`, a writable buffer of the exact size, or into a new
/// buffer for `n` elements of `t`'s dtype that is returned.
fn decode_to(
    py: Python<'_>,
    out: Option<&Bound<'_, PyAny>>,
    t: &TensorInfo,
    n: u64,
    decode: impl FnOnce(&mut [u8]) -> qtensors_core::Result<()> + Send,
) -> PyResult<Option<OwnedBuffer>> {
    match out {
        Some(o) => {
            let ob = InputBytes::new(o)?;
            // SAFETY: we hold the only Rust reference to the output buffer.
            let dst = unsafe { ob.as_mut_slice()? };
            py.detach(|| decode(dst)).py()?;
            Ok(None)
        }
        None => {
            let mut data = AlignedBytes::zeroed(n as usize * t.dtype.itemsize());
            py.detach(|| decode(data.as_mut_slice())).py()?;
            Ok(Some(OwnedBuffer { data }))
        }
    }
}

/// Names of the kernel tables this CPU can run, and the one in use.
#[pyfunction]
fn kernels() -> (Vec<&'static str>, &'static str) {
    (
        simd::available().iter().map(|k| k.name).collect(),
        simd::best().name,
    )
}

/// Whether `linear` multiplies 4- and 8-bit integer codes by int8-quantized activations on this
/// CPU (AVX-512 VNNI), unless `exact`.
#[pyfunction]
fn linear_int8_available() -> bool {
    qtensors_core::matmul::int8_available()
}

/// Whether `linear` multiplies bf16 activations by bf16 tiles of the weight (AVX-512 BF16) where
/// neither the int8 kernel nor a GEMV takes the call; elsewhere they widen to fp32.
#[pyfunction]
fn linear_bf16_available() -> bool {
    qtensors_core::matmul::bf16_available()
}

/// Which threads run `linear`'s parallel work: `("rayon", None)`, or `("openmp", library)`.
#[pyfunction]
fn cpu_pool() -> (&'static str, Option<String>) {
    qtensors_core::matmul::pool::current()
}

/// Run `linear`'s parallel work on rayon's pool (`"rayon"`) or on the team of the OpenMP runtime
/// `library` (`"openmp"`), which the process must already have loaded (torch's libgomp);
/// ValueError / UnsupportedError (the pool unchanged) where it is not loaded or lacks libgomp's
/// entry points.
#[pyfunction]
#[pyo3(signature = (kind, library = None))]
fn set_cpu_pool(kind: &str, library: Option<&str>) -> PyResult<()> {
    use qtensors_core::matmul::pool;
    match (kind, library) {
        ("rayon", None) => {
            pool::use_rayon();
            Ok(())
        }
        ("openmp", Some(lib)) => pool::use_openmp(lib).py(),
        _ => Err(PyValueError::new_err(format!(
            "set_cpu_pool takes (\"rayon\") or (\"openmp\", library), not ({kind:?}, {library:?})"
        ))),
    }
}

/// Threads `linear` splits a large call across when called from this thread.
#[pyfunction]
fn cpu_pool_threads() -> usize {
    qtensors_core::matmul::pool::threads()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Reader>()?;
    m.add_class::<Writer>()?;
    m.add_class::<StreamReader>()?;
    m.add_class::<OwnedBuffer>()?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(kernels, m)?)?;
    m.add_function(wrap_pyfunction!(linear, m)?)?;
    m.add_function(wrap_pyfunction!(linear_int8_available, m)?)?;
    m.add_function(wrap_pyfunction!(linear_bf16_available, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_pool, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_pool, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_pool_threads, m)?)?;
    m.add(
        "FORMAT_VERSION",
        (
            qtensors_core::format::limits::VERSION_MAJOR,
            qtensors_core::format::limits::VERSION_MINOR,
        ),
    )?;
    Ok(())
}
