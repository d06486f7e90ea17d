//! Encodings (spec section 4): their parameters, the parts they are made of, and the sizes those
//! parts must have. Everything here is computed in checked arithmetic because shapes come from
//! untrusted headers.

use serde_json::{Map, Value};

use super::dtype::DType;
use super::json::Shallow;
use super::limits::MAX_SHAPE_BYTES;
use crate::error::{Error, Result};

/// Parameters shared by the group-quantized encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupParams {
    pub bits: u8,
    pub group_size: u64,
    /// Normalized: `0 <= axis < max(rank, 1)`.
    pub axis: usize,
    pub scale_dtype: DType,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Encoding {
    Raw,
    Affine(GroupParams),
    Symmetric(GroupParams),
    /// `symmetric` with `"levels": "full"` (spec 4.6): all 2^bits codes, llama.cpp's Q4_0/Q5_0
    /// rule. It decodes as `Symmetric`; only quantization differs.
    SymmetricFull(GroupParams),
    Nf4(GroupParams),
    /// OCP MXFP4 (spec 4.8): `bits` 4, `group_size` 32, `scale_dtype` uint8 (E8M0 exponents),
    /// all fixed; `axis` is the one free parameter.
    Mxfp4(GroupParams),
    /// NVFP4 (spec 4.9): `bits` 4, `group_size` 16, `scale_dtype` float8_e4m3fn, all fixed,
    /// plus an fp32 `tensor_scale` part; `axis` is the one free parameter.
    Nvfp4(GroupParams),
    /// Only produced by lenient (listing) parsing: a tensor this version cannot decode, because
    /// its encoding or one of its dtypes is unknown. Its structure is still checked.
    Unknown {
        /// What is unknown, for messages: the encoding's name, or "raw with unknown dtype 'x'".
        name: String,
        /// The encoding object as written.
        params: Map<String, Value>,
        /// The dtype names as written (they may be unknown), so that listings show them.
        dtypes: DtypeNames,
    },
}

/// The dtypes of a tensor this reader cannot decode, as written in the header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DtypeNames {
    pub logical: String,
    /// One per part, in the order of `TensorInfo::parts`.
    pub parts: Vec<String>,
}

/// What one part of a tensor must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub length: u64,
}

/// The (P, L, Q, G) view of spec section 4.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    pub outer: u64,
    pub axis_len: u64,
    pub inner: u64,
    pub group_size: u64,
    pub groups_along_axis: u64,
}

impl GroupLayout {
    pub fn new(shape: &[u64], axis: usize, group_size: u64) -> Result<Self> {
        let overflow = || Error::Format(format!("shape {shape:?} overflows 64-bit element counts"));
        let (outer, axis_len, inner) = if shape.is_empty() {
            (1, 1, 1)
        } else {
            let mut outer: u64 = 1;
            for &d in &shape[..axis] {
                outer = outer.checked_mul(d).ok_or_else(overflow)?;
            }
            let mut inner: u64 = 1;
            for &d in &shape[axis + 1..] {
                inner = inner.checked_mul(d).ok_or_else(overflow)?;
            }
            (outer, shape[axis], inner)
        };
        if group_size == 0 {
            return Err(Error::Format("group_size must be at least 1".into()));
        }
        let groups_along_axis = axis_len.div_ceil(group_size);
        // Overflow check of the full products.
        outer
            .checked_mul(axis_len)
            .and_then(|v| v.checked_mul(inner))
            .ok_or_else(overflow)?;
        Ok(GroupLayout {
            outer,
            axis_len,
            inner,
            group_size,
            groups_along_axis,
        })
    }

    pub fn numel(&self) -> u64 {
        self.outer * self.axis_len * self.inner
    }

    pub fn num_groups(&self) -> u64 {
        self.outer * self.groups_along_axis * self.inner
    }
}

/// Spec rule 7: the byte size of the tensor with each zero dimension counted as 1 fits in a
/// signed 64-bit integer. Then every dimension, the element count and every row-major stride fit
/// too, in any order of multiplication, and an empty tensor of the shape can be created in numpy
/// and torch.
pub fn shape_fits(shape: &[u64], itemsize: u64) -> bool {
    shape
        .iter()
        .try_fold(itemsize, |acc, &d| acc.checked_mul(d.max(1)))
        .is_some_and(|bytes| bytes <= MAX_SHAPE_BYTES)
}

pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Bytes of `n` codes of `bits` bits, packed.
pub fn packed_len(n: u64, bits: u8) -> Option<u64> {
    n.checked_mul(bits as u64).map(|b| b.div_ceil(8))
}

/// Block size and scale dtype of the FP4 block formats (spec 4.8, 4.9).
fn fp4_fixed(name: &str) -> Option<(u64, DType)> {
    match name {
        "mxfp4" => Some((32, DType::Uint8)),
        "nvfp4" => Some((16, DType::Float8E4m3fn)),
        _ => None,
    }
}

/// The parameters of an FP4 block format; only the axis comes from the header.
fn fp4_params(axis: u64, rank: usize, name: &str) -> Result<GroupParams> {
    let (group_size, scale_dtype) = fp4_fixed(name).expect("an FP4 format");
    if axis >= rank.max(1) as u64 {
        return Err(Error::Format(format!(
            "encoding '{name}': axis {axis} is out of range for a tensor of rank {rank}"
        )));
    }
    Ok(GroupParams {
        bits: 4,
        group_size,
        axis: axis as usize,
        scale_dtype,
    })
}

/// The shape of the scales/mins parts: the tensor's shape with the group axis cut to its group count.
pub fn scales_shape(shape: &[u64], p: &GroupParams) -> Vec<u64> {
    if shape.is_empty() {
        return vec![1];
    }
    let mut s = shape.to_vec();
    s[p.axis] = s[p.axis].div_ceil(p.group_size);
    s
}

impl Encoding {
    pub fn name(&self) -> &str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Affine(_) => "affine",
            Encoding::Symmetric(_) | Encoding::SymmetricFull(_) => "symmetric",
            Encoding::Nf4(_) => "nf4",
            Encoding::Mxfp4(_) => "mxfp4",
            Encoding::Nvfp4(_) => "nvfp4",
            Encoding::Unknown { name, .. } => name,
        }
    }

    pub fn group_params(&self) -> Option<&GroupParams> {
        match self {
            Encoding::Affine(p)
            | Encoding::Symmetric(p)
            | Encoding::SymmetricFull(p)
            | Encoding::Nf4(p)
            | Encoding::Mxfp4(p)
            | Encoding::Nvfp4(p) => Some(p),
            _ => None,
        }
    }

    /// Parse a header `encoding` object. `rank` normalizes nothing: axes in files are already
    /// normalized, and must be `< max(rank, 1)`. With `lenient`, unknown names become `Unknown`.
    pub fn from_json(obj: &Map<String, Value>, rank: usize, lenient: bool) -> Result<Self> {
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Format("encoding has no string 'name'".into()))?;
        let int = |key: &str| -> Result<u64> {
            let v = obj.get(key);
            v.and_then(Value::as_u64).ok_or_else(|| {
                let got = match v {
                    Some(v) => format!(", not {}", Shallow::from_value(v)),
                    None => String::new(),
                };
                Error::Format(format!(
                    "encoding '{name}' needs a non-negative integer '{key}' below 2^64{got}"
                ))
            })
        };
        let group = |default_bits: Option<u8>| -> Result<GroupParams> {
            let bits = match (obj.get("bits"), default_bits) {
                (None, Some(b)) => b as u64,
                _ => int("bits")?,
            };
            let group_size = int("group_size")?;
            let axis = int("axis")?;
            let sd_name = obj
                .get("scale_dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::Format(format!("encoding '{name}' needs a string 'scale_dtype'"))
                })?;
            let scale_dtype = DType::parse(sd_name)
                .filter(|d| d.is_scale_dtype())
                .ok_or_else(|| {
                    Error::Format(format!(
                        "encoding '{name}': scale_dtype '{sd_name}' is not float16, bfloat16 or float32"
                    ))
                })?;
            if group_size == 0 {
                return Err(Error::Format(format!(
                    "encoding '{name}': group_size must be at least 1"
                )));
            }
            if axis >= rank.max(1) as u64 {
                return Err(Error::Format(format!(
                    "encoding '{name}': axis {axis} is out of range for a tensor of rank {rank}"
                )));
            }
            let (lo, hi) = match name {
                "symmetric" => (2, 8),
                "nf4" => (4, 4),
                _ => (1, 8),
            };
            if !(lo..=hi).contains(&bits) {
                return Err(Error::Format(if lo == hi {
                    format!("{name} bits must be {lo}, not {bits}")
                } else {
                    format!("{name} bits {bits} is out of range {lo}..={hi}")
                }));
            }
            Ok(GroupParams {
                bits: bits as u8,
                group_size,
                axis: axis as usize,
                scale_dtype,
            })
        };
        // The FP4 formats fix their block size and width: a writer may state them, but only
        // as those values (a file claiming other ones is not one of these formats).
        if let Some((gs, sd)) = fp4_fixed(name) {
            for (key, want) in [("bits", 4), ("group_size", gs)] {
                if obj.contains_key(key) && int(key)? != want {
                    return Err(Error::Format(format!(
                        "encoding '{name}': {key} is fixed at {want}, not {}",
                        Shallow::from_value(&obj[key])
                    )));
                }
            }
            if let Some(v) = obj.get("scale_dtype") {
                if v.as_str() != Some(sd.name()) {
                    return Err(Error::Format(format!(
                        "encoding '{name}': scale_dtype is fixed at {sd}, not {}",
                        Shallow::from_value(v)
                    )));
                }
            }
        }
        let enc = match name {
            "raw" => Encoding::Raw,
            "affine" => Encoding::Affine(group(None)?),
            "symmetric" => match symmetric_levels(obj)? {
                false => Encoding::Symmetric(group(None)?),
                true => Encoding::SymmetricFull(group(None)?),
            },
            "nf4" => Encoding::Nf4(group(Some(4))?),
            "mxfp4" => Encoding::Mxfp4(fp4_params(int("axis")?, rank, name)?),
            "nvfp4" => Encoding::Nvfp4(fp4_params(int("axis")?, rank, name)?),
            other if lenient => Encoding::Unknown {
                name: other.to_string(),
                params: obj.clone(),
                dtypes: DtypeNames::default(),
            },
            other => {
                return Err(Error::Unsupported(format!(
                    "unknown encoding '{other}': this file needs a newer qtensors (known: raw, affine, symmetric, nf4, mxfp4, nvfp4)"
                )))
            }
        };
        enc.check_params()?;
        Ok(enc)
    }

    /// Range checks of the parameters (spec rule 8).
    pub fn check_params(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Format(msg));
        match self {
            Encoding::Affine(p) if !(1..=8).contains(&p.bits) => {
                bad(format!("affine bits {} is out of range 1..=8", p.bits))
            }
            Encoding::Symmetric(p) | Encoding::SymmetricFull(p) if !(2..=8).contains(&p.bits) => {
                bad(format!("symmetric bits {} is out of range 2..=8", p.bits))
            }
            Encoding::Nf4(p) if p.bits != 4 => bad(format!("nf4 bits must be 4, not {}", p.bits)),
            Encoding::Mxfp4(p) | Encoding::Nvfp4(p)
                if fp4_fixed(self.name()) != Some((p.group_size, p.scale_dtype)) || p.bits != 4 =>
            {
                bad(format!(
                    "{} has fixed parameters: bits 4, group_size {}",
                    self.name(),
                    fp4_fixed(self.name()).map_or(0, |f| f.0)
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), Value::from(self.name()));
        match self {
            Encoding::Raw => {}
            // The FP4 formats fix all but the axis; writing them keeps headers self-describing.
            Encoding::Affine(p)
            | Encoding::Symmetric(p)
            | Encoding::SymmetricFull(p)
            | Encoding::Nf4(p)
            | Encoding::Mxfp4(p)
            | Encoding::Nvfp4(p) => {
                m.insert("bits".into(), Value::from(p.bits));
                m.insert("group_size".into(), Value::from(p.group_size));
                m.insert("axis".into(), Value::from(p.axis as u64));
                m.insert("scale_dtype".into(), Value::from(p.scale_dtype.name()));
                if matches!(self, Encoding::SymmetricFull(_)) {
                    m.insert("levels".into(), Value::from("full"));
                }
            }
            Encoding::Unknown { params, .. } => return Value::Object(params.clone()),
        }
        Value::Object(m)
    }

    /// Whether `dtype` may be the logical dtype of a tensor in this encoding.
    pub fn accepts_dtype(&self, dtype: DType) -> bool {
        match self {
            Encoding::Raw | Encoding::Unknown { .. } => true,
            _ => dtype.is_quantizable_float(),
        }
    }

    /// The parts a tensor of this encoding must have, in file order.
    pub fn part_specs(&self, dtype: DType, shape: &[u64]) -> Result<Vec<PartSpec>> {
        let n =
            numel(shape).ok_or_else(|| Error::Format(format!("shape {shape:?} overflows u64")))?;
        let too_big = || Error::Format(format!("shape {shape:?} is too large"));
        match self {
            Encoding::Raw => Ok(vec![PartSpec {
                name: "data",
                dtype,
                shape: shape.to_vec(),
                length: n.checked_mul(dtype.itemsize() as u64).ok_or_else(too_big)?,
            }]),
            Encoding::Affine(p)
            | Encoding::Symmetric(p)
            | Encoding::SymmetricFull(p)
            | Encoding::Nf4(p)
            | Encoding::Mxfp4(p)
            | Encoding::Nvfp4(p) => {
                let layout = GroupLayout::new(shape, p.axis, p.group_size)?;
                let code_bytes = packed_len(n, p.bits).ok_or_else(too_big)?;
                let sshape = scales_shape(shape, p);
                let slen = layout
                    .num_groups()
                    .checked_mul(p.scale_dtype.itemsize() as u64)
                    .ok_or_else(too_big)?;
                let mut parts = vec![
                    PartSpec {
                        name: "codes",
                        dtype: DType::Uint8,
                        shape: vec![code_bytes],
                        length: code_bytes,
                    },
                    PartSpec {
                        name: "scales",
                        dtype: p.scale_dtype,
                        shape: sshape.clone(),
                        length: slen,
                    },
                ];
                if matches!(self, Encoding::Affine(_)) {
                    parts.push(PartSpec {
                        name: "mins",
                        dtype: p.scale_dtype,
                        shape: sshape,
                        length: slen,
                    });
                }
                if matches!(self, Encoding::Nvfp4(_)) {
                    parts.push(PartSpec {
                        name: "tensor_scale",
                        dtype: DType::Float32,
                        shape: vec![],
                        length: 4,
                    });
                }
                Ok(parts)
            }
            Encoding::Unknown { name, .. } => Err(Error::Unsupported(format!(
                "unknown encoding '{name}': this file needs a newer qtensors"
            ))),
        }
    }
}

/// The optional `levels` parameter of `symmetric` (spec 4.6): true for `"full"`, false for
/// `"balanced"` or no key.
fn symmetric_levels(obj: &Map<String, Value>) -> Result<bool> {
    match obj.get("levels") {
        None => Ok(false),
        Some(Value::String(v)) if v == "balanced" => Ok(false),
        Some(Value::String(v)) if v == "full" => Ok(true),
        Some(v) => Err(Error::Format(format!(
            "encoding 'symmetric': levels must be \"balanced\" or \"full\", not {}",
            Shallow::from_value(v)
        ))),
    }
}
