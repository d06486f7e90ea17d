//! The JSON header (spec section 2): parsing with every check of section 7, and serialization.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

use super::compression::{self, Compression, RawCompression};
use super::dtype::DType;
use super::encoding::{shape_fits, DtypeNames, Encoding, PartSpec};
use super::json::{
    array_as, object_as, read_object, scalars_as, BoundedValue, Field, Shallow, ShapeField,
};
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
    /// Bytes stored in the file (compressed, for a compressed part).
    pub length: u64,
    /// XXH3-64 of the stored bytes.
    pub checksum: u64,
    /// How the part is compressed (spec 2.1); `None`: stored as its decoded bytes.
    pub compression: Option<Box<Compression>>,
}

impl PartInfo {
    /// Bytes of the part once decoded (decompressed): what the encoding reads.
    pub fn decoded_len(&self) -> u64 {
        self.compression
            .as_ref()
            .map_or(self.length, |c| c.decoded_len)
    }
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
    pub fn is_compressed(&self) -> bool {
        self.parts.iter().any(|p| p.compression.is_some())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: (u16, u16),
    pub alignment: u64,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorInfo>,
    /// Tensor indices sorted by name: lookups by binary search, without a second copy of the names.
    by_name: Vec<u32>,
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

/// Spec rules 1-3 on the fixed prefix. Returns (major, minor, header_len). `lenient` (listing
/// tools) accepts newer minor versions; no reader accepts another major version, whose layout
/// it cannot know.
pub fn parse_prefix(prefix: &[u8], file_len: u64, lenient: bool) -> Result<(u16, u16, u64)> {
    if prefix.len() < PREFIX_LEN || file_len < PREFIX_LEN as u64 {
        return Err(format_err!(
            "file is {file_len} bytes, shorter than the {PREFIX_LEN}-byte qtensors prefix: truncated or not a qtensors file"
        ));
    }
    if &prefix[..8] != MAGIC {
        if looks_like_safetensors(prefix, file_len) {
            return Err(format_err!(
                "this is a safetensors file, not a qtensors file: convert it with `qtensors convert FILE` (FILE: this file)"
            ));
        }
        return Err(format_err!(
            "not a qtensors file: magic bytes are {:?}, expected \"QTENSORS\"",
            String::from_utf8_lossy(&prefix[..8])
        ));
    }
    let major = u16::from_le_bytes([prefix[8], prefix[9]]);
    let minor = u16::from_le_bytes([prefix[10], prefix[11]]);
    let reserved = u32::from_le_bytes(prefix[12..16].try_into().unwrap());
    let header_len = u64::from_le_bytes(prefix[16..24].try_into().unwrap());
    check_version(major, minor, lenient)?;
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

/// A safetensors file starts with its header length (u64, little-endian) and then the JSON `{`.
pub fn looks_like_safetensors(prefix: &[u8], file_len: u64) -> bool {
    let n = u64::from_le_bytes(prefix[..8].try_into().unwrap());
    prefix[8] == b'{' && n >= 2 && n <= file_len - 8
}

/// Rule 2. Major version 0 never existed; a newer major version may lay files out differently.
fn check_version(major: u16, minor: u16, lenient: bool) -> Result<()> {
    let ours = format!("{VERSION_MAJOR}.{VERSION_MINOR}");
    if major == 0 {
        return Err(format_err!(
            "file format version {major}.{minor} is invalid: versions start at 1.0 (this reader: {ours})"
        ));
    }
    if major != VERSION_MAJOR || (minor > VERSION_MINOR && !lenient) {
        let older = if major < VERSION_MAJOR {
            "older"
        } else {
            "newer"
        };
        return Err(Error::Unsupported(format!(
            "file format version {major}.{minor} is {older} than this reader's {ours}: {}",
            if major > VERSION_MAJOR || minor > VERSION_MINOR {
                "upgrade qtensors"
            } else {
                "use an older qtensors"
            }
        )));
    }
    Ok(())
}

impl Header {
    pub fn new(
        alignment: u64,
        metadata: BTreeMap<String, String>,
        tensors: Vec<TensorInfo>,
    ) -> Result<Self> {
        if tensors.len() > MAX_TENSORS {
            return Err(format_err!(
                "{} tensors exceed the limit of {MAX_TENSORS}",
                tensors.len()
            ));
        }
        let mut by_name: Vec<u32> = (0..tensors.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| tensors[a as usize].name.cmp(&tensors[b as usize].name));
        for w in by_name.windows(2) {
            let name = &tensors[w[0] as usize].name;
            if *name == tensors[w[1] as usize].name {
                return Err(format_err!("tensor name '{name}' appears twice"));
            }
        }
        Ok(Header {
            version: (VERSION_MAJOR, VERSION_MINOR),
            alignment,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.position(name).map(|i| &self.tensors[i])
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name
            .binary_search_by(|&i| self.tensors[i as usize].name.as_str().cmp(name))
            .ok()
            .map(|k| self.by_name[k] as usize)
    }

    /// Parse and check the header (rules 4-12). `data_len` is the length of the data section.
    /// With `lenient` (listing tools), tensors with an unknown encoding, dtype or part
    /// compression are kept as `Encoding::Unknown`, their structure checked all the same.
    ///
    /// The JSON is read in one pass straight into the checked structs (no `Value` tree), so
    /// memory stays a small multiple of the header's length, and every check is linear or
    /// sorts once.
    pub fn parse(
        json: &[u8],
        version: (u16, u16),
        data_start: u64,
        data_len: u64,
        lenient: bool,
    ) -> Result<Self> {
        let text =
            std::str::from_utf8(json).map_err(|e| format_err!("header is not valid UTF-8: {e}"))?;
        let failure = RefCell::new(None);
        let mut root = RawRoot::default();
        let seed = RootSeed {
            root: &mut root,
            lenient,
            failure: &failure,
        };
        let mut de = serde_json::Deserializer::from_str(text.trim_end_matches(' '));
        let parsed = seed.deserialize(&mut de).and_then(|()| de.end());
        if let Some(e) = failure.into_inner() {
            return Err(e);
        }
        parsed.map_err(|e| format_err!("header is not valid JSON: {e}"))?;

        let a = match root.alignment {
            Some(Shallow::Uint(a)) => a,
            other => {
                return Err(format_err!(
                    "header field 'alignment' must be a non-negative integer{}",
                    other.map(|v| format!(", not {v}")).unwrap_or_default()
                ))
            }
        };
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
        let metadata = check_metadata(root.metadata)?;
        let tensors = match root.tensors {
            Some(Field::Got(t)) => t,
            Some(Field::Not(v)) => {
                return Err(format_err!(
                    "header field 'tensors' must be an array, not {v}"
                ))
            }
            None => return Err(format_err!("header field 'tensors' must be an array")),
        };
        for t in &tensors {
            check_places(t, a, data_len)?;
        }
        check_overlaps(&tensors)?;
        let mut h = Header::new(a, metadata, tensors)?;
        h.version = version;
        Ok(h)
    }

    /// The header JSON, deterministic (sorted keys), without padding. Written straight from the
    /// structs, without building a tree.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&JsonHeader(self)).expect("JSON of plain values")
    }
}

impl TensorInfo {
    /// This tensor's header entry as JSON, as it appears in [`Header::to_json`].
    pub fn to_json(&self) -> String {
        serde_json::to_string(&JsonTensor(self)).expect("JSON of plain values")
    }
}

// -- reading ------------------------------------------------------------------------------------

/// The top-level object as read: fields of the wrong type are kept for the error message.
#[derive(Default)]
struct RawRoot {
    alignment: Option<Shallow>,
    metadata: Option<Field<Vec<(String, Shallow)>>>,
    tensors: Option<Field<Vec<TensorInfo>>>,
}

/// Where a visitor leaves a qtensors error (serde errors carry only text), and the mode.
struct RootSeed<'a> {
    root: &'a mut RawRoot,
    lenient: bool,
    failure: &'a RefCell<Option<Error>>,
}

/// Stop the JSON parse with `e`, kept aside to be returned as it is.
fn fail<E: de::Error>(failure: &RefCell<Option<Error>>, e: Error) -> E {
    let text = e.to_string();
    *failure.borrow_mut() = Some(e);
    E::custom(text)
}

impl<'de> DeserializeSeed<'de> for RootSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RootSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<(), A::Error> {
        let RootSeed {
            root,
            lenient,
            failure,
        } = self;
        let known = ["alignment", "metadata", "tensors"];
        read_object(map, "the header", &known, |key, map| {
            match key {
                "alignment" => root.alignment = Some(map.next_value()?),
                "metadata" => root.metadata = Some(map.next_value::<MetadataField>()?.0),
                "tensors" => {
                    root.tensors = Some(map.next_value_seed(TensorsSeed { lenient, failure })?)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        })
    }
    // Anything but an object: refused with a clear message rather than serde's.
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> std::result::Result<(), A::Error> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not an array"),
        ))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<(), E> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not a string"),
        ))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<(), E> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not a number"),
        ))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<(), E> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not a number"),
        ))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<(), E> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not a number"),
        ))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<(), E> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not a boolean"),
        ))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        Err(fail(
            self.failure,
            format_err!("header must be a JSON object, not null"),
        ))
    }
}

/// `metadata`: its entries (values as found), or what stood there instead of an object.
struct MetadataField(Field<Vec<(String, Shallow)>>);

impl<'de> de::Deserialize<'de> for MetadataField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<Vec<(String, Shallow)>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Shallow>()? {
                    out.push(entry);
                }
                Ok(Field::Got(out))
            }
            array_as!(Field::Not);
            scalars_as!(Field::Not);
        }
        d.deserialize_any(V).map(MetadataField)
    }
}

fn check_metadata(
    field: Option<Field<Vec<(String, Shallow)>>>,
) -> Result<BTreeMap<String, String>> {
    let entries = match field {
        None | Some(Field::Not(Shallow::Null)) => return Ok(BTreeMap::new()),
        Some(Field::Not(v)) => {
            return Err(format_err!(
                "header field 'metadata' must be an object, not {v}"
            ))
        }
        Some(Field::Got(entries)) => entries,
    };
    let mut metadata = BTreeMap::new();
    for (k, v) in entries {
        let Shallow::Str(v) = v else {
            return Err(format_err!(
                "metadata value of key '{k}' must be a string, not {v}"
            ));
        };
        if metadata.insert(k.clone(), v).is_some() {
            return Err(format_err!("metadata has the key '{k}' twice"));
        }
    }
    Ok(metadata)
}

/// The `tensors` array: each entry is checked (rules 6-9, 12) as soon as it is read, so only
/// the compact `TensorInfo`s are kept; placement (rules 10-11) needs the alignment, and is
/// checked after the whole header is read.
struct TensorsSeed<'a> {
    lenient: bool,
    failure: &'a RefCell<Option<Error>>,
}

impl<'de> DeserializeSeed<'de> for TensorsSeed<'_> {
    type Value = Field<Vec<TensorInfo>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TensorsSeed<'_> {
    type Value = Field<Vec<TensorInfo>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tensors")
    }
    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut tensors = Vec::new();
        let index = Cell::new(0usize);
        while let Some(raw) = seq.next_element_seed(TensorSeed)? {
            let i = index.get();
            if i == MAX_TENSORS {
                return Err(fail(
                    self.failure,
                    format_err!("more than {MAX_TENSORS} tensors: the limit is {MAX_TENSORS}"),
                ));
            }
            let t = check_tensor(raw, i, self.lenient).map_err(|e| fail(self.failure, e))?;
            tensors.push(t);
            index.set(i + 1);
        }
        Ok(Field::Got(tensors))
    }
    object_as!(Field::Not);
    scalars_as!(Field::Not);
}

/// A tensor entry as read: every field as found, checked by `check_tensor`.
#[derive(Default)]
struct RawTensor {
    not_object: Option<Shallow>,
    name: Option<Shallow>,
    dtype: Option<Shallow>,
    shape: Option<ShapeField>,
    encoding: Option<Field<Map<String, Value>>>,
    parts: Option<Field<RawParts>>,
}

struct TensorSeed;

impl<'de> DeserializeSeed<'de> for TensorSeed {
    type Value = RawTensor;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<RawTensor, D::Error> {
        d.deserialize_any(self)
    }
}

fn not_object_tensor(v: Shallow) -> RawTensor {
    RawTensor {
        not_object: Some(v),
        ..RawTensor::default()
    }
}

impl<'de> Visitor<'de> for TensorSeed {
    type Value = RawTensor;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tensor object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<RawTensor, A::Error> {
        let mut t = RawTensor::default();
        let known = ["name", "dtype", "shape", "encoding", "parts"];
        read_object(map, "a tensor", &known, |key, map| {
            match key {
                "name" => t.name = Some(map.next_value()?),
                "dtype" => t.dtype = Some(map.next_value()?),
                "shape" => t.shape = Some(map.next_value()?),
                "encoding" => t.encoding = Some(map.next_value_seed(EncodingSeed)?),
                "parts" => t.parts = Some(map.next_value_seed(PartsSeed)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        })?;
        Ok(t)
    }
    array_as!(not_object_tensor);
    scalars_as!(not_object_tensor);
}

/// The `encoding` object, with a budget of values (it is kept whole for unknown encodings).
struct EncodingSeed;

impl<'de> DeserializeSeed<'de> for EncodingSeed {
    type Value = Field<Map<String, Value>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        let budget = Cell::new(MAX_ENCODING_VALUES);
        match (BoundedValue { budget: &budget }).deserialize(d)? {
            Value::Object(m) => Ok(Field::Got(m)),
            other => Ok(Field::Not(Shallow::from_value(&other))),
        }
    }
}

/// The `parts` object: (part name, record) in file order.
struct PartsSeed;

impl<'de> DeserializeSeed<'de> for PartsSeed {
    type Value = Field<RawParts>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PartsSeed {
    type Value = Field<RawParts>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of parts")
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut parts = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            parts.push((name, map.next_value()?));
        }
        Ok(Field::Got(parts))
    }
    array_as!(Field::Not);
    scalars_as!(Field::Not);
}

/// A tensor's `parts` object as read: (part name, record) in the order written.
type RawParts = Vec<(String, Field<RawPart>)>;

#[derive(Default)]
struct RawPart {
    dtype: Option<Shallow>,
    shape: Option<ShapeField>,
    offset: Option<Shallow>,
    length: Option<Shallow>,
    checksum: Option<Shallow>,
    compression: Option<Field<RawCompression>>,
}

impl<'de> de::Deserialize<'de> for Field<RawPart> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<RawPart>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a part record")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut p = RawPart::default();
                let known = [
                    "dtype",
                    "shape",
                    "offset",
                    "length",
                    "checksum",
                    "compression",
                ];
                read_object(map, "a part record", &known, |key, map| {
                    match key {
                        "dtype" => p.dtype = Some(map.next_value()?),
                        "shape" => p.shape = Some(map.next_value()?),
                        "offset" => p.offset = Some(map.next_value()?),
                        "length" => p.length = Some(map.next_value()?),
                        "checksum" => p.checksum = Some(map.next_value()?),
                        "compression" => p.compression = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(())
                })?;
                Ok(Field::Got(p))
            }
            array_as!(Field::Not);
            scalars_as!(Field::Not);
        }
        d.deserialize_any(V)
    }
}

// -- checking -----------------------------------------------------------------------------------

fn want<'a>(v: &'a Option<Shallow>, what: &str, kind: &str) -> Result<&'a Shallow> {
    v.as_ref()
        .ok_or_else(|| format_err!("{what} is missing (it must be {kind})"))
}

fn want_str(v: Option<Shallow>, what: &str) -> Result<String> {
    match v {
        Some(Shallow::Str(s)) => Ok(s),
        Some(other) => Err(format_err!("{what} must be a string, not {other}")),
        None => Err(format_err!("{what} is missing (it must be a string)")),
    }
}

fn want_u64(v: &Option<Shallow>, what: &str) -> Result<u64> {
    let kind = "an integer in 0..2^64";
    match want(v, what, kind)? {
        Shallow::Uint(n) => Ok(*n),
        other => Err(format_err!("{what} must be {kind}, not {other}")),
    }
}

/// Rule 4 and the rank of rule 7 for a `shape` field.
fn want_shape(v: Option<ShapeField>, what: &str) -> Result<Vec<u64>> {
    let (dims, rank) = match v {
        Some(ShapeField::Dims { dims, rank }) => (dims, rank),
        Some(ShapeField::NotArray(other)) => {
            return Err(format_err!(
                "{what} must be an array of integers, not {other}"
            ))
        }
        None => return Err(format_err!("{what} is missing")),
    };
    if rank > MAX_RANK {
        return Err(format_err!(
            "{what}: rank {rank} exceeds the limit of {MAX_RANK}"
        ));
    }
    dims.iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| format_err!("{what}: dimension {d} is not an integer in 0..2^64"))
        })
        .collect()
}

fn check_tensor(rt: RawTensor, index: usize, lenient: bool) -> Result<TensorInfo> {
    if let Some(v) = rt.not_object {
        return Err(format_err!("tensor #{index} must be an object, not {v}"));
    }
    let name = match rt.name {
        Some(Shallow::Str(n)) => n,
        other => {
            return Err(format_err!(
                "tensor #{index}: 'name' must be a string{}",
                other.map(|v| format!(", not {v}")).unwrap_or_default()
            ))
        }
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format_err!(
            "tensor #{index}: name of {} bytes: names must be 1 to {MAX_NAME_LEN} bytes",
            name.len()
        ));
    }
    let short: String = name.chars().take(80).collect();
    let at = format!("tensor '{short}'");
    let dtype_name = want_str(rt.dtype, &format!("{at} field 'dtype'"))?;
    let shape = want_shape(rt.shape, &format!("{at} shape"))?;
    let enc_obj = match rt.encoding {
        Some(Field::Got(m)) => m,
        Some(Field::Not(v)) => {
            return Err(format_err!("{at}: 'encoding' must be an object, not {v}"))
        }
        None => return Err(format_err!("{at}: 'encoding' is missing")),
    };
    let raw_parts = match rt.parts {
        Some(Field::Got(p)) => p,
        Some(Field::Not(v)) => return Err(format_err!("{at}: 'parts' must be an object, not {v}")),
        None => return Err(format_err!("{at}: 'parts' is missing")),
    };
    let mut parts = Vec::with_capacity(raw_parts.len());
    for (pname, rp) in raw_parts {
        let where_ = format!("{at} part '{pname}'");
        match rp {
            Field::Got(rp) => parts.push((pname, check_part_record(rp, &where_)?)),
            Field::Not(v) => return Err(format_err!("{where_} must be an object, not {v}")),
        }
    }
    // Repeated part names: sort a copy of the names, compare neighbours.
    let mut names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format_err!("{at}: part '{}' appears twice", w[0]));
    }

    let dtype = DType::parse(&dtype_name);
    let itemsize = dtype.map_or(1, |d| d.itemsize() as u64);
    if !shape_fits(&shape, itemsize) {
        return Err(format_err!(
            "{at}: shape {shape:?} is too large: its byte size with zero dimensions counted as 1 must stay below 2^63 (rule 7)"
        ));
    }
    let encoding =
        Encoding::from_json(&enc_obj, shape.len(), lenient).map_err(|e| prefix_err(e, &at))?;
    let opaque = |what: String| -> TensorInfo {
        opaque_tensor(
            name.clone(),
            dtype_name.clone(),
            shape.clone(),
            what,
            enc_obj.clone(),
            &parts,
        )
    };
    let Some(dtype) = dtype else {
        if lenient {
            let what = format!("{} with unknown dtype '{dtype_name}'", encoding.name());
            return Ok(opaque(what));
        }
        return Err(Error::Unsupported(format!(
            "{at}: unknown dtype '{dtype_name}': this file needs a newer qtensors"
        )));
    };
    if let Encoding::Unknown { name: enc_name, .. } = &encoding {
        return Ok(opaque(enc_name.clone()));
    }
    if !encoding.accepts_dtype(dtype) {
        return Err(format_err!(
            "{at}: encoding '{}' cannot hold logical dtype {dtype}",
            encoding.name()
        ));
    }
    for (pname, p) in &parts {
        let Some(c) = &p.compression else { continue };
        match compression::check_known(c, &format!("{at} part '{pname}'")) {
            Err(Error::Unsupported(_)) if lenient => {
                return Ok(opaque(format!(
                    "{} with unknown compression",
                    encoding.name()
                )));
            }
            r => r?,
        }
    }
    let specs: Vec<PartSpec> = encoding
        .part_specs(dtype, &shape)
        .map_err(|e| prefix_err(e, &at))?;
    let mut by_name: BTreeMap<String, CheckedPart> = parts.into_iter().collect();
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let where_ = format!("{at} part '{}'", spec.name);
        let rp = by_name.remove(spec.name).ok_or_else(|| {
            format_err!(
                "{at}: encoding '{}' needs a part '{}', which is missing",
                encoding.name(),
                spec.name
            )
        })?;
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
        let compression = match rp.compression {
            Some(c) => Some(Box::new(compression::check(
                c,
                spec.dtype,
                spec.length,
                rp.length,
                &where_,
            )?)),
            None if rp.length != spec.length => {
                return Err(format_err!(
                    "{where_}: length {} should be {} for shape {:?}",
                    rp.length,
                    spec.length,
                    shape
                ));
            }
            None => None,
        };
        out.push(PartInfo {
            name: spec.name.to_string(),
            dtype: spec.dtype,
            shape: spec.shape,
            offset: rp.offset,
            length: rp.length,
            checksum: rp.checksum,
            compression,
        });
    }
    if let Some(extra) = by_name.keys().next() {
        return Err(format_err!(
            "{at}: unexpected part '{extra}' for encoding '{}'",
            encoding.name()
        ));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        encoding,
        parts: out,
    })
}

/// A part record with every field of the right type (rules 4 and 12).
struct CheckedPart {
    dtype: String,
    shape: Vec<u64>,
    offset: u64,
    length: u64,
    checksum: u64,
    compression: Option<Field<RawCompression>>,
}

fn check_part_record(rp: RawPart, where_: &str) -> Result<CheckedPart> {
    Ok(CheckedPart {
        dtype: want_str(rp.dtype, &format!("{where_} field 'dtype'"))?,
        shape: want_shape(rp.shape, &format!("{where_} shape"))?,
        offset: want_u64(&rp.offset, &format!("{where_} offset"))?,
        length: want_u64(&rp.length, &format!("{where_} length"))?,
        checksum: parse_checksum(
            &want_str(rp.checksum, &format!("{where_} checksum"))?,
            where_,
        )?,
        compression: rp.compression,
    })
}

/// A tensor a listing tool shows but cannot decode (lenient mode): structure checked, parts in
/// file order, dtype names kept as written.
fn opaque_tensor(
    name: String,
    dtype_name: String,
    shape: Vec<u64>,
    what: String,
    params: Map<String, Value>,
    parts: &[(String, CheckedPart)],
) -> TensorInfo {
    let mut parts: Vec<&(String, CheckedPart)> = parts.iter().collect();
    parts.sort_by_key(|(_, p)| p.offset);
    let dtypes = DtypeNames {
        logical: dtype_name,
        parts: parts.iter().map(|(_, p)| p.dtype.clone()).collect(),
    };
    TensorInfo {
        name,
        // A placeholder: `Encoding::Unknown` makes every decode refuse the tensor.
        dtype: DType::Uint8,
        shape,
        encoding: Encoding::Unknown {
            name: what,
            params,
            dtypes,
        },
        parts: parts
            .iter()
            .map(|(pname, p)| PartInfo {
                name: pname.clone(),
                dtype: DType::parse(&p.dtype).unwrap_or(DType::Uint8),
                shape: p.shape.clone(),
                offset: p.offset,
                length: p.length,
                checksum: p.checksum,
                compression: None,
            })
            .collect(),
    }
}

/// Rule 10 for every part of a tensor.
fn check_places(t: &TensorInfo, alignment: u64, data_len: u64) -> Result<()> {
    for p in &t.parts {
        let short: String = t.name.chars().take(80).collect();
        let where_ = format!("tensor '{short}' part '{}'", p.name);
        if !p.offset.is_multiple_of(alignment) {
            return Err(format_err!(
                "{where_}: offset {} is not a multiple of the alignment {alignment}",
                p.offset
            ));
        }
        match p.offset.checked_add(p.length) {
            Some(end) if end <= data_len => {}
            _ => {
                return Err(format_err!(
                    "{where_}: bytes {}..+{} lie outside the {data_len}-byte data section (truncated file or lying offset)",
                    p.offset,
                    p.length
                ))
            }
        }
    }
    Ok(())
}

fn prefix_err(e: Error, prefix: &str) -> Error {
    match e {
        Error::Format(m) => Error::Format(format!("{prefix}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{prefix}: {m}")),
        other => other,
    }
}

/// Rule 11: no two non-empty parts share a byte. One sort: n log n for any number of parts.
fn check_overlaps(tensors: &[TensorInfo]) -> Result<()> {
    let mut spans: Vec<(u64, u64, u32, u32)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(ti, t)| {
            t.parts
                .iter()
                .enumerate()
                .filter(|(_, p)| p.length > 0)
                .map(move |(pi, p)| (p.offset, p.offset + p.length, ti as u32, pi as u32))
        })
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.0 < a.1 {
            let (ta, tb) = (&tensors[a.2 as usize], &tensors[b.2 as usize]);
            return Err(format_err!(
                "tensor '{}' part '{}' overlaps tensor '{}' part '{}' (bytes {}..{} and {}..{})",
                ta.name,
                ta.parts[a.3 as usize].name,
                tb.name,
                tb.parts[b.3 as usize].name,
                a.0,
                a.1,
                b.0,
                b.1
            ));
        }
    }
    Ok(())
}

// -- writing ------------------------------------------------------------------------------------

struct JsonHeader<'a>(&'a Header);
struct JsonTensor<'a>(&'a TensorInfo);
struct JsonParts<'a>(&'a TensorInfo);
struct JsonPart<'a>(&'a PartInfo, &'a str);

impl Serialize for JsonHeader<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let h = self.0;
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("alignment", &h.alignment)?;
        m.serialize_entry("metadata", &h.metadata)?;
        m.serialize_entry("tensors", &JsonTensors(&h.tensors))?;
        m.end()
    }
}

struct JsonTensors<'a>(&'a [TensorInfo]);

impl Serialize for JsonTensors<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for t in self.0 {
            seq.serialize_element(&JsonTensor(t))?;
        }
        seq.end()
    }
}

fn dtype_names(t: &TensorInfo) -> Option<&DtypeNames> {
    match &t.encoding {
        Encoding::Unknown { dtypes, .. } if !dtypes.logical.is_empty() => Some(dtypes),
        _ => None,
    }
}

/// Keys in sorted order, as `serde_json::Map` would write them.
impl Serialize for JsonTensor<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let t = self.0;
        let dtype = dtype_names(t).map_or(t.dtype.name(), |d| d.logical.as_str());
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("dtype", dtype)?;
        m.serialize_entry("encoding", &t.encoding.to_json())?;
        m.serialize_entry("name", &t.name)?;
        m.serialize_entry("parts", &JsonParts(t))?;
        m.serialize_entry("shape", &t.shape)?;
        m.end()
    }
}

impl Serialize for JsonParts<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let t = self.0;
        let names = dtype_names(t);
        let mut order: Vec<usize> = (0..t.parts.len()).collect();
        order.sort_by(|&a, &b| t.parts[a].name.cmp(&t.parts[b].name));
        let mut m = s.serialize_map(Some(order.len()))?;
        for i in order {
            let p = &t.parts[i];
            let dtype = names.map_or(p.dtype.name(), |d| d.parts[i].as_str());
            m.serialize_entry(&p.name, &JsonPart(p, dtype))?;
        }
        m.end()
    }
}

impl Serialize for JsonPart<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let p = self.0;
        let mut m = s.serialize_map(Some(6))?;
        m.serialize_entry("checksum", &format_checksum(p.checksum))?;
        if let Some(c) = &p.compression {
            m.serialize_entry("compression", c.as_ref())?;
        }
        m.serialize_entry("dtype", self.1)?;
        m.serialize_entry("length", &p.length)?;
        m.serialize_entry("offset", &p.offset)?;
        m.serialize_entry("shape", &p.shape)?;
        m.end()
    }
}
