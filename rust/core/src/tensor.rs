//! Encode a whole tensor into its parts and decode parts back, for every encoding.

use std::ops::Range;

use rayon::prelude::*;

use crate::codecs::region::{self, Runs, Stored};
use crate::codecs::{self, compress, float, fp4, Codec, Kernels};
use crate::error::{Error, Result};
use crate::format::compression::Compression;
use crate::format::{DType, Encoding, GroupLayout, GroupParams, TensorInfo};

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
    let scales = if codec.is_fp4() {
        fp4::scale_bytes(&q.scales, params.scale_dtype)?
    } else {
        scale_bytes(&q.scales, params.scale_dtype)?
    };
    let mut parts = vec![q.codes, scales];
    if codec.has_mins() {
        parts.push(scale_bytes(&q.mins, params.scale_dtype)?);
    }
    if let Codec::Nvfp4 { .. } = codec {
        parts.push(q.tensor_scale.to_le_bytes().to_vec());
    }
    Ok(parts)
}

/// `encode` from the little-endian bytes of a tensor of `dtype` (what bindings hold); fp32,
/// fp16 and bf16 bytes are quantized in place, without a copy.
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
    let full: Vec<Range<u64>> = info.shape.iter().map(|&d| 0..d).collect();
    decode_region(k, info, parts, &full, out)
}

/// Decode the box `ranges` (one `start..stop` per dimension) of a tensor into `out`, bytes of
/// the logical dtype in row-major order of the box. Only the code bytes and scales of the
/// groups the box touches are read. `parts` are the parts' stored bytes: compressed parts
/// (spec 2.1) have only the chunks holding those bytes decompressed.
pub fn decode_region(
    k: &Kernels,
    info: &TensorInfo,
    parts: &[&[u8]],
    ranges: &[Range<u64>],
    out: &mut [u8],
) -> Result<()> {
    check_decodable(info, ranges)?;
    let runs = Runs::new(&info.shape, ranges);
    if info.is_compressed() {
        return decode_compressed(k, info, parts, ranges, &runs, out);
    }
    if out.len() != runs.numel() * info.dtype.itemsize() {
        return Err(Error::Invalid(format!(
            "output buffer of {} bytes for {} {} elements of tensor '{}'",
            out.len(),
            runs.numel(),
            info.dtype,
            info.name
        )));
    }
    let Some((codec, params)) = Codec::from_encoding(&info.encoding) else {
        region::copy_box(parts[0], info.dtype.itemsize(), &runs, out);
        if info.dtype == DType::Bool {
            check_bools(&info.name, out)?;
        }
        return Ok(());
    };
    let stored = stored(info, codec, &params, parts)?;
    region::decode_box(k, &stored, &runs, info.dtype, out)
}

/// `decode_region` for a tensor with compressed parts: each compressed part is decompressed
/// into a buffer of its decoded size in which only the chunks the box reads are filled (the
/// rest stays untouched zero pages), then decoded as usual. A whole raw tensor is decompressed
/// straight into `out`.
fn decode_compressed(
    k: &Kernels,
    info: &TensorInfo,
    parts: &[&[u8]],
    ranges: &[Range<u64>],
    runs: &Runs,
    out: &mut [u8],
) -> Result<()> {
    let p0 = &info.parts[0];
    if let (Encoding::Raw, Some(c)) = (&info.encoding, &p0.compression) {
        if runs.numel() as u64 * info.dtype.itemsize() as u64 == c.decoded_len
            && out.len() as u64 == c.decoded_len
        {
            let what = format!("tensor '{}' part '{}'", info.name, p0.name);
            let offsets = c.stored_offsets();
            compress::decompress_chunks(c, &offsets, parts[0], 0..c.chunks.len(), out, &what)?;
            if info.dtype == DType::Bool {
                check_bools(&info.name, out)?;
            }
            return Ok(());
        }
    }
    let needed = needed_chunks(info, runs)?;
    let expanded: Vec<Vec<u8>> = info
        .parts
        .iter()
        .zip(parts)
        .zip(&needed)
        .map(|((p, stored), flags)| match (&p.compression, flags) {
            (Some(c), Some(flags)) => {
                let what = format!("tensor '{}' part '{}'", info.name, p.name);
                expand(c, stored, flags, &what)
            }
            _ => Ok(Vec::new()),
        })
        .collect::<Result<_>>()?;
    let slices: Vec<&[u8]> = info
        .parts
        .iter()
        .zip(parts)
        .zip(&expanded)
        .map(|((p, stored), e)| {
            if p.compression.is_some() {
                &e[..]
            } else {
                *stored
            }
        })
        .collect();
    let mut plain = info.clone();
    for p in &mut plain.parts {
        p.compression = None;
    }
    decode_region(k, &plain, &slices, ranges, out)
}

/// For each compressed part, a flag per chunk: does the box `runs` read a byte of it.
fn needed_chunks(info: &TensorInfo, runs: &Runs) -> Result<Vec<Option<Vec<bool>>>> {
    let mut flags: Vec<Option<Vec<bool>>> = info
        .parts
        .iter()
        .map(|p| p.compression.as_ref().map(|c| vec![false; c.chunks.len()]))
        .collect();
    let mut mark = |part: usize, a: u64, b: u64| {
        if let (Some(f), Some(c)) = (&mut flags[part], &info.parts[part].compression) {
            for i in c.chunks_of(a, b) {
                f[i] = true;
            }
        }
    };
    let quant = Codec::from_encoding(&info.encoding);
    let layout = match &quant {
        Some((_, params)) => Some(GroupLayout::new(
            &info.shape,
            params.axis,
            params.group_size,
        )?),
        None => None,
    };
    for i in 0..runs.count {
        let (s, e) = (runs.start(i) as u64, (runs.start(i) + runs.len) as u64);
        match (&quant, &layout) {
            (Some((codec, params)), Some(layout)) => {
                let b = params.bits as u64;
                mark(0, s * b / 8, (e * b).div_ceil(8));
                let w = region::scale_window(layout, s as usize, e as usize);
                let size = params.scale_dtype.itemsize() as u64;
                let (wa, wb) = (w.start as u64 * size, w.end as u64 * size);
                mark(1, wa, wb);
                if codec.has_mins() {
                    mark(2, wa, wb);
                }
            }
            _ => {
                let size = info.dtype.itemsize() as u64;
                mark(0, s * size, e * size);
            }
        }
    }
    Ok(flags)
}

/// The decoded bytes of a compressed part with the flagged chunks filled, in parallel.
fn expand(c: &Compression, stored: &[u8], flags: &[bool], what: &str) -> Result<Vec<u8>> {
    // Zeroed allocation: pages of chunks never filled are never touched (nor committed).
    let mut buf = vec![0u8; c.decoded_len as usize];
    let offsets = c.stored_offsets();
    buf.par_chunks_mut(c.chunk_size as usize)
        .enumerate()
        .filter(|(i, _)| flags[*i])
        .try_for_each(|(i, dst)| {
            let from = &stored[offsets[i] as usize..];
            compress::decompress_chunks(c, &offsets, from, i..i + 1, dst, what)
        })?;
    Ok(buf)
}

/// The decoded bytes of one part (stored bytes `stored`), decompressed if it is compressed.
pub fn decoded_part(info: &TensorInfo, part: usize, stored: &[u8]) -> Result<Vec<u8>> {
    let p = &info.parts[part];
    match &p.compression {
        None => Ok(stored.to_vec()),
        Some(c) => {
            let mut out = vec![0u8; c.decoded_len as usize];
            let what = format!("tensor '{}' part '{}'", info.name, p.name);
            let offsets = c.stored_offsets();
            compress::decompress_chunks(c, &offsets, stored, 0..c.chunks.len(), &mut out, &what)?;
            Ok(out)
        }
    }
}

/// `out = x @ W^T + bias` with `W` the 2-D quantized tensor `info` (`[out, in]`) given by its
/// parts, without decoding it to memory (see `matmul`). `x` (`[batch, in]`), `bias` (`[out]`)
/// and `out` (`[batch, out]`) are little-endian bytes of `dtype` (float16, bfloat16, float32).
/// `exact`: fp32 activations throughout (see `matmul::linear`).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    k: &Kernels,
    info: &TensorInfo,
    parts: &[&[u8]],
    x: &[u8],
    bias: Option<&[u8]>,
    dtype: DType,
    out: &mut [u8],
    exact: bool,
) -> Result<()> {
    let Some((codec, params)) = Codec::from_encoding(&info.encoding) else {
        return Err(Error::Unsupported(format!(
            "tensor '{}': linear needs a quantized weight, not '{}'",
            info.name,
            info.encoding.name()
        )));
    };
    let &[n_out, n_in] = info.shape.as_slice() else {
        return Err(Error::Invalid(format!(
            "tensor '{}': linear needs a 2-D weight, not shape {:?}",
            info.name, info.shape
        )));
    };
    let stored = stored(info, codec, &params, parts)?;
    crate::matmul::linear(
        k,
        &stored,
        n_out as usize,
        n_in as usize,
        x,
        bias,
        dtype,
        out,
        exact,
    )
}

/// The parts of a quantized tensor (in `info.parts` order) for the decoders; an NVFP4 codec
/// gets its tensor scale from the `tensor_scale` part.
fn stored<'a>(
    info: &TensorInfo,
    codec: Codec,
    params: &'a GroupParams,
    parts: &[&'a [u8]],
) -> Result<Stored<'a>> {
    let codec = match codec {
        Codec::Nvfp4 { .. } => {
            let b: [u8; 4] = parts[2].try_into().map_err(|_| {
                Error::Invalid(format!(
                    "tensor '{}': tensor_scale has {} bytes, not 4",
                    info.name,
                    parts[2].len()
                ))
            })?;
            Codec::nvfp4(f32::from_le_bytes(b))
        }
        c => c,
    };
    Ok(Stored {
        codec: codec.decoder(),
        params,
        layout: GroupLayout::new(&info.shape, params.axis, params.group_size)?,
        codes: parts[0],
        scales: parts[1],
        mins: if codec.has_mins() { parts[2] } else { &[] },
    })
}

/// Check, before any output is sized, that the tensor can be decoded (its encoding is known:
/// a leniently opened file may hold unknown ones, whose shapes were not checked) and that
/// `ranges` is a box inside it (one range per dimension, each within it).
pub fn check_decodable(info: &TensorInfo, ranges: &[Range<u64>]) -> Result<()> {
    if let Encoding::Unknown { name, .. } = &info.encoding {
        return Err(Error::Unsupported(format!(
            "tensor '{}': unknown encoding '{name}': upgrade qtensors",
            info.name
        )));
    }
    let fits = ranges.len() == info.shape.len()
        && ranges
            .iter()
            .zip(&info.shape)
            .all(|(r, &d)| r.start <= r.end && r.end <= d);
    if !fits {
        return Err(Error::Invalid(format!(
            "box {ranges:?} does not fit tensor '{}' of shape {:?}",
            info.name, info.shape
        )));
    }
    Ok(())
}

/// Spec 3: a bool is stored as the byte 0 or 1; any other byte is a malformed file (numpy and
/// torch would otherwise disagree on what it means).
fn check_bools(name: &str, bytes: &[u8]) -> Result<()> {
    match bytes.iter().position(|&b| b > 1) {
        None => Ok(()),
        Some(i) => Err(Error::Format(format!(
            "tensor '{name}': bool element {i} is stored as byte {}; bools must be 0 or 1",
            bytes[i]
        ))),
    }
}
