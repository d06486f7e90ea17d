//! Conversions between the float dtypes and fp32, and the rounding of stored scales (`st` in the spec).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::DType;

const PAR_CHUNK: usize = 1 << 16;

/// fp32 values as their little-endian bytes: a view on little-endian targets, else a copy.
pub fn f32_le_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: same memory; u8 has no alignment or validity requirement.
        let b = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) };
        std::borrow::Cow::Borrowed(b)
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// The memory of fp32 values as bytes, for kernels that write little-endian bytes into it;
/// `from_le_in_place` afterwards makes them the values on any target.
pub fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: same memory; any bytes are a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), size_of_val(v)) }
}

/// Little-endian fp32 bytes written through `f32_bytes_mut` -> values (nothing to do on
/// little-endian targets).
pub fn from_le_in_place(v: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for x in v {
            *x = f32::from_bits(x.to_bits().swap_bytes());
        }
    }
}

/// `st(v)`: round fp32 to the scale dtype (nearest-even) and back.
#[inline]
pub fn store_scale(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::Float16 => f16::from_f32(v).to_f32(),
        DType::Bfloat16 => bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// `store_scale` over a slice, in place, through the half crate's slice conversions (F16C).
pub fn store_scales(v: &mut [f32], dtype: DType) {
    use half::slice::HalfFloatSliceExt;
    const STEP: usize = 64;
    match dtype {
        DType::Float16 => {
            let mut tmp = [f16::ZERO; STEP];
            for c in v.chunks_mut(STEP) {
                let t = &mut tmp[..c.len()];
                t.convert_from_f32_slice(c);
                t.convert_to_f32_slice(c);
            }
        }
        DType::Bfloat16 => {
            let mut tmp = [bf16::ZERO; STEP];
            for c in v.chunks_mut(STEP) {
                let t = &mut tmp[..c.len()];
                t.convert_from_f32_slice(c);
                t.convert_to_f32_slice(c);
            }
        }
        _ => {}
    }
}

/// Widen little-endian float bytes to fp32 (float64 is rounded to fp32, per spec 4.3).
pub fn bytes_to_f32(src: &[u8], dtype: DType) -> Result<Vec<f32>> {
    let size = dtype.itemsize();
    if !src.len().is_multiple_of(size) {
        return Err(Error::Invalid(format!(
            "{} bytes are not a whole number of {dtype} elements",
            src.len()
        )));
    }
    if !dtype.is_quantizable_float() {
        return Err(Error::Invalid(format!(
            "dtype {dtype} cannot be quantized: only float16, bfloat16, float32 and float64 can"
        )));
    }
    let mut out = super::zeroed_here::<f32>(src.len() / size);
    out.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK * size))
        .try_for_each(|(o, s)| widen_into(s, dtype, o))?;
    Ok(out)
}

/// Widen one block of little-endian float bytes into `out` (sequential: callers are threads).
pub fn widen_into(src: &[u8], dtype: DType, out: &mut [f32]) -> Result<()> {
    match dtype {
        DType::Float16 => {
            // SAFETY: any bits are a valid f16; only the aligned middle is used (little-endian).
            let (pre, mid, post) = unsafe { src.align_to::<f16>() };
            if cfg!(target_endian = "little") && pre.is_empty() && post.is_empty() {
                use half::slice::HalfFloatSliceExt;
                mid.convert_to_f32_slice(out); // F16C where the CPU has it
            } else {
                for (v, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *v = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
        DType::Bfloat16 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *v = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        DType::Float32 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::Float64 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(8)) {
                *v = f64::from_le_bytes(b.try_into().unwrap()) as f32;
            }
        }
        other => {
            return Err(Error::Invalid(format!(
                "dtype {other} cannot be quantized: only float16, bfloat16, float32 and float64 can"
            )))
        }
    }
    Ok(())
}

/// Narrow fp32 values into little-endian bytes of `dtype` (round-to-nearest-even), in threads.
pub fn f32_to_bytes(src: &[f32], dtype: DType, out: &mut [u8]) -> Result<()> {
    let size = dtype.itemsize();
    if out.len() != src.len() * size {
        return Err(Error::Invalid("output buffer has the wrong size".into()));
    }
    out.par_chunks_mut(PAR_CHUNK * size)
        .zip(src.par_chunks(PAR_CHUNK))
        .try_for_each(|(o, s)| narrow_into(s, dtype, o))
}

/// Narrow one block of fp32 values into little-endian bytes of a float `dtype`
/// (round-to-nearest-even; sequential: callers are threads). fp16 goes through F16C where the
/// CPU has it.
pub fn narrow_into(src: &[f32], dtype: DType, out: &mut [u8]) -> Result<()> {
    use half::slice::HalfFloatSliceExt;
    if out.len() != src.len() * dtype.itemsize() {
        return Err(Error::Invalid("output buffer has the wrong size".into()));
    }
    match dtype {
        DType::Float16 => {
            // SAFETY: any bits are a valid f16; only the aligned middle is used (little-endian).
            let (pre, mid, post) = unsafe { out.align_to_mut::<f16>() };
            if cfg!(target_endian = "little") && pre.is_empty() && post.is_empty() {
                mid.convert_from_f32_slice(src);
            } else {
                for (b, &v) in out.chunks_exact_mut(2).zip(src) {
                    b.copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
        }
        DType::Bfloat16 => {
            for (b, &v) in out.chunks_exact_mut(2).zip(src) {
                b.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
        DType::Float32 => {
            for (b, &v) in out.chunks_exact_mut(4).zip(src) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::Float64 => {
            for (b, &v) in out.chunks_exact_mut(8).zip(src) {
                b.copy_from_slice(&(v as f64).to_le_bytes());
            }
        }
        other => return Err(Error::Invalid(format!("cannot decode to dtype {other}"))),
    }
    Ok(())
}
