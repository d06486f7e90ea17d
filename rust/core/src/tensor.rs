//! Encode a whole tensor into its parts and decode parts back, for every encoding.

use crate::codecs::{self, float, Codec, Kernels};
use crate::error::{Error, Result};
use crate::format::{DType, Encoding, TensorInfo};

/// The values of a tensor to encode: fp32, or bytes of its dtype (`Input::from_bytes`).
pub use crate::codecs::Source as Input;

/// Encode a tensor of logical `dtype` and `shape`; returns its parts' bytes in spec order.
pub fn encode(
    k: &Kernels,
    encoding: &Encoding,
    dtype: DType,
    shape: &[u64],
    input: Input<'_>,
) -> Result<Vec<Vec<u8>>> {
    let specs = encoding.part_specs(dtype, shape)?;
    if !encoding.accepts_dtype(dtype) {
        return Err(Error::Invalid(format!(
            "encoding '{}' cannot store dtype {dtype}: only float tensors can be quantized",
            encoding.name()
        )));
    }
    let Some((codec, params)) = Codec::from_encoding(encoding) else {
        // raw: the bytes themselves
        let bytes = match input {
            Input::Bytes(b, _) => b.to_vec(),
            Input::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        if bytes.len() as u64 != specs[0].length {
            return Err(Error::Invalid(format!(
                "{} bytes given for a {dtype} tensor of shape {shape:?} ({} expected)",
                bytes.len(),
                specs[0].length
            )));
        }
        return Ok(vec![bytes]);
    };
    let q = codecs::quantize_source(k, codec, &params, shape, input)?;
    let mut parts = vec![q.codes, scale_bytes(&q.scales, params.scale_dtype)?];
    if codec.has_mins() {
        parts.push(scale_bytes(&q.mins, params.scale_dtype)?);
    }
    Ok(parts)
}

/// `encode` from the little-endian bytes of a tensor of `dtype` (what bindings hold); aligned
/// fp32 bytes are quantized in place, without a copy.
pub fn encode_bytes(
    k: &Kernels,
    encoding: &Encoding,
    dtype: DType,
    shape: &[u64],
    bytes: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let input = match encoding {
        Encoding::Raw => Input::Bytes(bytes, dtype),
        _ => Input::from_bytes(bytes, dtype)?,
    };
    encode(k, encoding, dtype, shape, input)
}

fn scale_bytes(v: &[f32], dtype: DType) -> Result<Vec<u8>> {
    let mut out = vec![0u8; v.len() * dtype.itemsize()];
    float::f32_to_bytes(v, dtype, &mut out)?;
    Ok(out)
}

/// Decode a tensor from its parts (in `info.parts` order) into `out`, bytes of the logical dtype.
pub fn decode(k: &Kernels, info: &TensorInfo, parts: &[&[u8]], out: &mut [u8]) -> Result<()> {
    let n = crate::format::encoding::numel(&info.shape).unwrap_or(0) as usize;
    if out.len() != n * info.dtype.itemsize() {
        return Err(Error::Invalid(format!(
            "output buffer of {} bytes for tensor '{}' of {n} {} elements",
            out.len(),
            info.name,
            info.dtype
        )));
    }
    let Some((codec, params)) = Codec::from_encoding(&info.encoding) else {
        if let Encoding::Unknown { name, .. } = &info.encoding {
            return Err(Error::Unsupported(format!(
                "tensor '{}': unknown encoding '{name}': upgrade qtensors",
                info.name
            )));
        }
        out.copy_from_slice(parts[0]);
        return Ok(());
    };
    let scales = float::bytes_to_f32(parts[1], params.scale_dtype)?;
    let mins = if codec.has_mins() {
        float::bytes_to_f32(parts[2], params.scale_dtype)?
    } else {
        Vec::new()
    };
    // Decode straight into the output when it is fp32 and aligned; else through a temporary.
    if info.dtype == DType::Float32 {
        // SAFETY: any bit pattern is a valid f32; align_to_mut only yields the aligned middle.
        let (pre, mid, post) = unsafe { out.align_to_mut::<f32>() };
        if pre.is_empty() && post.is_empty() {
            return codecs::dequantize(
                k,
                codec,
                &params,
                &info.shape,
                parts[0],
                &scales,
                &mins,
                mid,
            );
        }
    }
    let mut tmp = codecs::zeroed_here::<f32>(n);
    codecs::dequantize(
        k,
        codec,
        &params,
        &info.shape,
        parts[0],
        &scales,
        &mins,
        &mut tmp,
    )?;
    float::f32_to_bytes(&tmp, info.dtype, out)
}
