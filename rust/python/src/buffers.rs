//! Memory shared with Python without copies, through the buffer protocol: `OwnedBuffer` hands a
//! Rust allocation to numpy/torch; `input_bytes`/`output_bytes` read and fill Python buffers.

use std::alloc::{alloc, dealloc, Layout};
use std::ffi::c_int;
use std::ptr::NonNull;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

/// 64-byte aligned so numpy/torch views are aligned for any dtype and for SIMD. Large buffers are
/// anonymous mappings with transparent huge pages requested: a fresh 64 MiB output otherwise
/// spends more time in 4 KiB page faults than in decoding.
pub struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
    /// Set for large buffers; `ptr` points into it.
    map: Option<memmap2::MmapMut>,
    /// Set for buffers adopted from a Vec (no copy); `ptr` points into it.
    vec: Option<Vec<u8>>,
}

// SAFETY: a plain owned allocation.
unsafe impl Send for AlignedBytes {}
unsafe impl Sync for AlignedBytes {}

const ALIGN: usize = 64;
const MAP_THRESHOLD: usize = 4 << 20;

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBytes {
                ptr: NonNull::dangling(),
                len: 0,
                map: None,
                vec: None,
            };
        }
        if len >= MAP_THRESHOLD {
            if let Ok(mut m) = memmap2::MmapMut::map_anon(len) {
                #[cfg(target_os = "linux")]
                let _ = m.advise(memmap2::Advice::HugePage);
                let ptr = NonNull::new(m.as_mut_ptr()).expect("mapping is not null");
                return AlignedBytes {
                    ptr,
                    len,
                    map: Some(m),
                    vec: None,
                };
            }
        }
        let layout = Layout::from_size_align(len, ALIGN).expect("size fits");
        // SAFETY: non-zero size; the bytes are zeroed by this thread (see above).
        let p = unsafe { alloc(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        AlignedBytes {
            ptr,
            len,
            map: None,
            vec: None,
        }
    }

    /// Adopt a Vec without copying. The system allocator aligns every non-empty allocation to
    /// at least 16 bytes on 64-bit targets, enough for every dtype's element alignment.
    pub fn from_vec(mut v: Vec<u8>) -> Self {
        if v.is_empty() {
            return Self::zeroed(0);
        }
        let ptr = NonNull::new(v.as_mut_ptr()).expect("non-empty Vec");
        AlignedBytes {
            ptr,
            len: v.len(),
            map: None,
            vec: Some(v),
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        if self.len > 0 && self.map.is_none() && self.vec.is_none() {
            let layout = Layout::from_size_align(self.len, ALIGN).expect("size fits");
            // SAFETY: allocated with this layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// Bytes owned by Rust, exported as a writable 1-D `uint8` buffer (wrap with `numpy.frombuffer`
/// or `torch.frombuffer`: no copy; the buffer lives as long as any view of it).
#[pyclass(frozen, module = "qtensors._core")]
pub struct OwnedBuffer {
    pub data: AlignedBytes,
}

#[pymethods]
impl OwnedBuffer {
    fn __len__(&self) -> usize {
        self.data.len
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            (me.data.ptr.as_ptr(), me.data.len)
        };
        // SAFETY: the exporter (`slf`) owns the memory and outlives the view via view.obj.
        unsafe { fill_view(view, flags, ptr, len, false, slf.into_any()) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Fill a `Py_buffer` describing `len` bytes at `ptr`, owned by `owner`.
///
/// # Safety
/// `ptr` must stay valid for `len` bytes while `owner` lives.
pub unsafe fn fill_view(
    view: *mut ffi::Py_buffer,
    flags: c_int,
    ptr: *mut u8,
    len: usize,
    readonly: bool,
    owner: Bound<'_, PyAny>,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("view is null"));
    }
    if readonly && (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
        return Err(PyBufferError::new_err("buffer is read-only"));
    }
    unsafe {
        (*view).obj = owner.into_ptr();
        (*view).buf = ptr as *mut std::os::raw::c_void;
        (*view).len = len as isize;
        (*view).readonly = readonly as c_int;
        (*view).itemsize = 1;
        (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
            c"B".as_ptr() as *mut _
        } else {
            std::ptr::null_mut()
        };
        (*view).ndim = 1;
        (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND {
            &mut (*view).len
        } else {
            std::ptr::null_mut()
        };
        (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES {
            &mut (*view).itemsize
        } else {
            std::ptr::null_mut()
        };
        (*view).suboffsets = std::ptr::null_mut();
        (*view).internal = std::ptr::null_mut();
    }
    Ok(())
}

/// A C-contiguous byte buffer from Python, readable without the GIL.
pub struct InputBytes {
    buf: PyBuffer<u8>,
}

// SAFETY: the PyBuffer keeps the exporter alive and its memory pinned until released (which
// PyBuffer does with the GIL); the bytes themselves are plain memory.
unsafe impl Send for InputBytes {}
unsafe impl Sync for InputBytes {}

impl InputBytes {
    pub fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let buf = PyBuffer::<u8>::get(obj).map_err(|_| {
            PyValueError::new_err(
                "expected a contiguous uint8 buffer (pass array.view(numpy.uint8).reshape(-1))",
            )
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("buffer must be C-contiguous"));
        }
        Ok(InputBytes { buf })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: contiguous, len_bytes valid bytes at buf_ptr while the buffer is held.
        unsafe { std::slice::from_raw_parts(self.buf.buf_ptr() as *const u8, self.buf.len_bytes()) }
    }

    /// # Safety
    /// The caller must hold no other reference into this buffer while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> PyResult<&mut [u8]> {
        if self.buf.readonly() {
            return Err(PyValueError::new_err("output buffer is read-only"));
        }
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.buf.buf_ptr() as *mut u8, self.buf.len_bytes())
        })
    }
}
