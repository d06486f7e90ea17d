//! The JSON header (spec section 2): parsing with every check of section 7, and serialization.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::dtype::DType;
use super::encoding::{Encoding, PartSpec};
use super::limits::*;
use crate::error::{format_err, Error, Result};

/// A part of a tensor, checked against its encoding and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Relative to the data section.
    pub offset: u64,
    pub length: u64,
    pub checksum: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub encoding: Encoding,
    /// In the order the encoding defines (for unknown encodings: the header's order).
    pub parts: Vec<PartInfo>,
}

impl TensorInfo {
    pub fn part(&self, name: &str) -> Option<&PartInfo> {
        self.parts.iter().find(|p| p.name == name)
    }
    pub fn stored_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.length).sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: (u16, u16),
    pub alignment: u64,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

struct RawHeader<'a> {
    alignment: u64,
    metadata: BTreeMap<String, String>,
    tensors: &'a [Value],
}

#[derive(Deserialize)]
struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    encoding: Map<String, Value>,
    parts: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawPart {
    dtype: String,
    shape: Vec<u64>,
    offset: u64,
    length: u64,
    checksum: String,
    #[serde(default)]
    compression: Option<Value>,
}

pub fn format_checksum(hash: u64) -> String {
    format!("xxh3-64:{hash:016x}")
}

fn parse_checksum(s: &str, where_: &str) -> Result<u64> {
    let hex = s.strip_prefix("xxh3-64:").filter(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    match hex {
        Some(h) => Ok(u64::from_str_radix(h, 16).expect("validated hex")),
        None => Err(format_err!(
            "{where_}: checksum '{}' is not 'xxh3-64:' followed by 16 lowercase hex digits",
            s.chars().take(40).collect::<String>()
        )),
    }
}

/// Spec rules 1-3 on the fixed prefix. Returns (major, minor, header_len).
pub fn parse_prefix(prefix: &[u8], file_len: u64, lenient: bool) -> Result<(u16, u16, u64)> {
    if prefix.len() < PREFIX_LEN || file_len < PREFIX_LEN as u64 {
        return Err(format_err!(
            "file is {file_len} bytes, shorter than the {PREFIX_LEN}-byte qtensors prefix: truncated or not a qtensors file"
        ));
    }
    if &prefix[..8] != MAGIC {
        return Err(format_err!(
            "not a qtensors file: magic bytes are {:?}, expected \"QTENSORS\"",
            String::from_utf8_lossy(&prefix[..8])
        ));
    }
    let major = u16::from_le_bytes([prefix[8], prefix[9]]);
    let minor = u16::from_le_bytes([prefix[10], prefix[11]]);
    let reserved = u32::from_le_bytes(prefix[12..16].try_into().unwrap());
    let header_len = u64::from_le_bytes(prefix[16..24].try_into().unwrap());
    if major != VERSION_MAJOR || (minor > VERSION_MINOR && !lenient) {
        return Err(Error::Unsupported(format!(
            "file format version {major}.{minor} is newer than this reader's {VERSION_MAJOR}.{VERSION_MINOR}: upgrade qtensors"
        )));
    }
    if reserved != 0 {
        return Err(format_err!(
            "reserved prefix field is {reserved}, must be 0"
        ));
    }
    if header_len > MAX_HEADER_LEN {
        return Err(format_err!(
            "header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"
        ));
    }
    if PREFIX_LEN as u64 + header_len > file_len {
        return Err(format_err!(
            "header length {header_len} runs past the end of the {file_len}-byte file: truncated file"
        ));
    }
    Ok((major, minor, header_len))
}

impl Header {
    pub fn new(
        alignment: u64,
        metadata: BTreeMap<String, String>,
        tensors: Vec<TensorInfo>,
    ) -> Result<Self> {
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                return Err(format_err!("tensor name '{}' appears twice", t.name));
            }
        }
        Ok(Header {
            version: (VERSION_MAJOR, VERSION_MINOR),
            alignment,
            metadata,
            tensors,
            index,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Parse and check the header (rules 4-12). `data_len` is the length of the data section.
    /// With `lenient` (listing tools), unknown encodings and part compressions are kept.
    pub fn parse(
        json: &[u8],
        version: (u16, u16),
        data_start: u64,
        data_len: u64,
        lenient: bool,
    ) -> Result<Self> {
        let text =
            std::str::from_utf8(json).map_err(|e| format_err!("header is not valid UTF-8: {e}"))?;
        let root: Value = serde_json::from_str(text.trim_end_matches(' '))
            .map_err(|e| format_err!("header is not valid JSON: {e}"))?;
        let root = root
            .as_object()
            .ok_or_else(|| format_err!("header must be a JSON object"))?;
        let alignment = root
            .get("alignment")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                format_err!("header field 'alignment' must be a non-negative integer")
            })?;
        let mut metadata = BTreeMap::new();
        match root.get("metadata") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let v = v.as_str().ok_or_else(|| {
                        format_err!("metadata value of key '{k}' must be a string")
                    })?;
                    metadata.insert(k.clone(), v.to_string());
                }
            }
            Some(_) => return Err(format_err!("header field 'metadata' must be an object")),
        }
        let raw_tensors = root
            .get("tensors")
            .and_then(Value::as_array)
            .ok_or_else(|| format_err!("header field 'tensors' must be an array"))?;
        let raw = RawHeader {
            alignment,
            metadata,
            tensors: raw_tensors,
        };

        let a = raw.alignment;
        if !a.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&a) {
            return Err(format_err!(
                "alignment {a} must be a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}"
            ));
        }
        if !data_start.is_multiple_of(a) {
            return Err(format_err!(
                "data section starts at byte {data_start}, not a multiple of the alignment {a}"
            ));
        }
        if raw.tensors.len() > MAX_TENSORS {
            return Err(format_err!(
                "{} tensors exceed the limit of {MAX_TENSORS}",
                raw.tensors.len()
            ));
        }

        let mut tensors = Vec::with_capacity(raw.tensors.len());
        for (i, tv) in raw.tensors.iter().enumerate() {
            let label = match tv.get("name").and_then(Value::as_str) {
                Some(n) => format!("'{}'", n.chars().take(80).collect::<String>()),
                None => format!("#{i}"),
            };
            let rt = RawTensor::deserialize(tv).map_err(|e| format_err!("tensor {label}: {e}"))?;
            tensors.push(check_tensor(rt, a, data_len, lenient)?);
        }
        check_overlaps(&tensors)?;
        let mut h = Header::new(a, raw.metadata, tensors)?;
        h.version = version;
        Ok(h)
    }

    /// The header JSON, deterministic (sorted keys), without padding.
    pub fn to_json(&self) -> String {
        let tensors: Vec<Value> = self
            .tensors
            .iter()
            .map(|t| {
                let mut parts = Map::new();
                for p in &t.parts {
                    let mut pm = Map::new();
                    pm.insert("dtype".into(), Value::from(p.dtype.name()));
                    pm.insert("shape".into(), Value::from(p.shape.clone()));
                    pm.insert("offset".into(), Value::from(p.offset));
                    pm.insert("length".into(), Value::from(p.length));
                    pm.insert("checksum".into(), Value::from(format_checksum(p.checksum)));
                    parts.insert(p.name.clone(), Value::Object(pm));
                }
                let mut tm = Map::new();
                tm.insert("name".into(), Value::from(t.name.clone()));
                tm.insert("dtype".into(), Value::from(t.dtype.name()));
                tm.insert("shape".into(), Value::from(t.shape.clone()));
                tm.insert("encoding".into(), t.encoding.to_json());
                tm.insert("parts".into(), Value::Object(parts));
                Value::Object(tm)
            })
            .collect();
        let mut root = Map::new();
        root.insert("alignment".into(), Value::from(self.alignment));
        let meta: Map<String, Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        root.insert("metadata".into(), Value::Object(meta));
        root.insert("tensors".into(), Value::Array(tensors));
        serde_json::to_string(&Value::Object(root)).expect("JSON of plain values")
    }
}

fn check_tensor(rt: RawTensor, alignment: u64, data_len: u64, lenient: bool) -> Result<TensorInfo> {
    let name = rt.name;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format_err!(
            "tensor name of {} bytes: names must be 1 to {MAX_NAME_LEN} bytes",
            name.len()
        ));
    }
    let short: String = name.chars().take(80).collect();
    let dtype = DType::parse(&rt.dtype).ok_or_else(|| {
        Error::Unsupported(format!("tensor '{short}': unknown dtype '{}'", rt.dtype))
    })?;
    if rt.shape.len() > MAX_RANK {
        return Err(format_err!(
            "tensor '{short}': rank {} exceeds the limit of {MAX_RANK}",
            rt.shape.len()
        ));
    }
    if super::encoding::numel(&rt.shape).is_none() {
        return Err(format_err!(
            "tensor '{short}': shape {:?} has more elements than fit in 64 bits",
            rt.shape
        ));
    }
    let encoding = Encoding::from_json(&rt.encoding, rt.shape.len(), lenient)
        .map_err(|e| prefix_err(e, &format!("tensor '{short}'")))?;
    if !encoding.accepts_dtype(dtype) {
        return Err(format_err!(
            "tensor '{short}': encoding '{}' cannot hold logical dtype {dtype}",
            encoding.name()
        ));
    }

    let mut raw_parts = BTreeMap::new();
    for (pname, pv) in &rt.parts {
        let rp = RawPart::deserialize(pv)
            .map_err(|e| format_err!("tensor '{short}' part '{pname}': {e}"))?;
        raw_parts.insert(pname.clone(), rp);
    }
    let mut parts = Vec::with_capacity(raw_parts.len());
    let check_place = |pname: &str, rp: &RawPart| -> Result<()> {
        let where_ = format!("tensor '{short}' part '{pname}'");
        if !rp.offset.is_multiple_of(alignment) {
            return Err(format_err!(
                "{where_}: offset {} is not a multiple of the alignment {alignment}",
                rp.offset
            ));
        }
        match rp.offset.checked_add(rp.length) {
            Some(end) if end <= data_len => Ok(()),
            _ => Err(format_err!(
                "{where_}: bytes {}..+{} lie outside the {data_len}-byte data section (truncated file or lying offset)",
                rp.offset,
                rp.length
            )),
        }
    };
    if let Encoding::Unknown { .. } = encoding {
        for (pname, rp) in &raw_parts {
            check_place(pname, rp)?;
            parts.push(PartInfo {
                name: pname.clone(),
                dtype: DType::parse(&rp.dtype).unwrap_or(DType::Uint8),
                shape: rp.shape.clone(),
                offset: rp.offset,
                length: rp.length,
                checksum: parse_checksum(
                    &rp.checksum,
                    &format!("tensor '{short}' part '{pname}'"),
                )?,
            });
        }
        parts.sort_by_key(|p| p.offset);
    } else {
        let specs: Vec<PartSpec> = encoding
            .part_specs(dtype, &rt.shape)
            .map_err(|e| prefix_err(e, &format!("tensor '{short}'")))?;
        for spec in specs {
            let where_ = format!("tensor '{short}' part '{}'", spec.name);
            let rp = raw_parts.remove(spec.name).ok_or_else(|| {
                format_err!(
                    "tensor '{short}': encoding '{}' needs a part '{}', which is missing",
                    encoding.name(),
                    spec.name
                )
            })?;
            if let Some(c) = &rp.compression {
                if !lenient {
                    return Err(Error::Unsupported(format!(
                        "{where_}: compression {c} is not supported by this reader: upgrade qtensors"
                    )));
                }
            }
            if rp.dtype != spec.dtype.name() {
                return Err(format_err!(
                    "{where_}: dtype '{}' should be '{}'",
                    rp.dtype,
                    spec.dtype
                ));
            }
            if rp.shape != spec.shape {
                return Err(format_err!(
                    "{where_}: shape {:?} should be {:?}",
                    rp.shape,
                    spec.shape
                ));
            }
            if rp.length != spec.length {
                return Err(format_err!(
                    "{where_}: length {} should be {} for shape {:?}",
                    rp.length,
                    spec.length,
                    rt.shape
                ));
            }
            check_place(spec.name, &rp)?;
            parts.push(PartInfo {
                name: spec.name.to_string(),
                dtype: spec.dtype,
                shape: spec.shape,
                offset: rp.offset,
                length: rp.length,
                checksum: parse_checksum(&rp.checksum, &where_)?,
            });
        }
        if let Some(extra) = raw_parts.keys().next() {
            return Err(format_err!(
                "tensor '{short}': unexpected part '{extra}' for encoding '{}'",
                encoding.name()
            ));
        }
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape: rt.shape,
        encoding,
        parts,
    })
}

fn prefix_err(e: Error, prefix: &str) -> Error {
    match e {
        Error::Format(m) => Error::Format(format!("{prefix}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{prefix}: {m}")),
        other => other,
    }
}

/// Rule 11: no two non-empty parts share a byte.
fn check_overlaps(tensors: &[TensorInfo]) -> Result<()> {
    let mut spans: Vec<(u64, u64, &str, &str)> = tensors
        .iter()
        .flat_map(|t| {
            t.parts.iter().filter(|p| p.length > 0).map(move |p| {
                (
                    p.offset,
                    p.offset + p.length,
                    t.name.as_str(),
                    p.name.as_str(),
                )
            })
        })
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.0 < a.1 {
            return Err(format_err!(
                "tensor '{}' part '{}' overlaps tensor '{}' part '{}' (bytes {}..{} and {}..{})",
                a.2,
                a.3,
                b.2,
                b.3,
                a.0,
                a.1,
                b.0,
                b.1
            ));
        }
    }
    Ok(())
}
