//! The `compression` record of a part (spec section 2.1): how a part's bytes are stored as
//! independently compressed chunks, read from the header and checked (rule 9) before any byte
//! of the part is read. The transform itself lives in `codecs::compress`.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};

use super::dtype::DType;
use super::json::{array_as, read_object, scalars_as, Field, Shallow};
use crate::error::{format_err, Error, Result};

/// Smallest and largest `chunk_size` (powers of two): chunks stay big enough for zstd to work
/// and small enough that one chunk is a cheap unit of random access.
pub const MIN_CHUNK: u64 = 4096;
pub const MAX_CHUNK: u64 = 64 << 20;
/// A zstd block holds at most 128 KiB and takes at least 4 bytes (an RLE block), so no zstd
/// frame expands more than 32768 times: a chunk claiming more is refused before it is read.
pub const MAX_EXPANSION: u64 = 32768;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecId {
    Zstd,
}

impl CodecId {
    pub fn name(self) -> &'static str {
        match self {
            CodecId::Zstd => "zstd",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        (s == "zstd").then_some(CodecId::Zstd)
    }
}

/// The reversible transform applied to each chunk before compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// The bytes as they are.
    None,
    /// Byte planes: byte `j` of every element, for `j` = 0 .. itemsize-1 in turn.
    Bytes,
    /// Floats: each element, read as a little-endian unsigned integer, rotated left by one bit
    /// (the sign moves to bit 0, the exponent to the top byte), then byte planes.
    Float,
}

impl Filter {
    pub fn name(self) -> &'static str {
        match self {
            Filter::None => "none",
            Filter::Bytes => "bytes",
            Filter::Float => "float",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Filter::None, Filter::Bytes, Filter::Float]
            .into_iter()
            .find(|f| f.name() == s)
    }
    /// The filter a writer uses for a part of `dtype`.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype.itemsize() {
            1 => Filter::None,
            _ if is_float(dtype) => Filter::Float,
            _ => Filter::Bytes,
        }
    }
}

fn is_float(d: DType) -> bool {
    matches!(
        d,
        DType::Float16 | DType::Bfloat16 | DType::Float32 | DType::Float64
    )
}

/// A checked compression record. `chunks[i]` is the stored length of chunk `i`; chunk `i`
/// holds decoded bytes `[i·chunk_size, min((i+1)·chunk_size, decoded_len))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    pub codec: CodecId,
    pub level: i32,
    pub filter: Filter,
    pub chunk_size: u64,
    pub chunks: Vec<u32>,
    /// Bytes of the part once decoded (from its dtype and shape).
    pub decoded_len: u64,
    /// Bytes per element of the part's dtype: the filter's element size.
    pub itemsize: usize,
}

impl Compression {
    /// Decoded bytes of chunk `i`.
    pub fn chunk_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.chunk_size;
        self.chunk_size.min(self.decoded_len - start)
    }

    /// Offset of each chunk's stored bytes in the part, and the end: `chunks.len() + 1` values.
    pub fn stored_offsets(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        let mut at = 0u64;
        out.push(0);
        for &c in &self.chunks {
            at += c as u64;
            out.push(at);
        }
        out
    }

    /// The chunks holding decoded bytes `[a, b)`.
    pub fn chunks_of(&self, a: u64, b: u64) -> std::ops::Range<usize> {
        if a >= b {
            return 0..0;
        }
        (a / self.chunk_size) as usize..b.div_ceil(self.chunk_size) as usize
    }
}

/// A `compression` object as read: fields as found.
#[derive(Default)]
pub(crate) struct RawCompression {
    codec: Option<Shallow>,
    level: Option<Shallow>,
    filter: Option<Shallow>,
    chunk_size: Option<Shallow>,
    chunks: Option<Field<ChunkList>>,
}

/// The chunk table: lengths that fit in u32 (a chunk is at most `MAX_CHUNK` bytes), 4 bytes each
/// whatever the header holds, and the first entry that is not such an integer.
#[derive(Default)]
pub(crate) struct ChunkList {
    lengths: Vec<u32>,
    bad: Option<(usize, Shallow)>,
}

impl<'de> de::Deserialize<'de> for Field<ChunkList> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<ChunkList>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chunk table")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut list = ChunkList::default();
                let mut i = 0;
                while let Some(v) = seq.next_element::<Shallow>()? {
                    match v {
                        Shallow::Uint(n) if n <= u32::MAX as u64 => list.lengths.push(n as u32),
                        other if list.bad.is_none() => list.bad = Some((i, other)),
                        _ => {}
                    }
                    i += 1;
                }
                Ok(Field::Got(list))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Not(Shallow::Object))
            }
            scalars_as!(Field::Not);
        }
        d.deserialize_any(V)
    }
}

impl<'de> de::Deserialize<'de> for Field<RawCompression> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<RawCompression>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a compression record")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut c = RawCompression::default();
                let known = ["codec", "level", "filter", "chunk_size", "chunks"];
                read_object(map, "a compression record", &known, |key, map| {
                    match key {
                        "codec" => c.codec = Some(map.next_value()?),
                        "level" => c.level = Some(map.next_value()?),
                        "filter" => c.filter = Some(map.next_value()?),
                        "chunk_size" => c.chunk_size = Some(map.next_value()?),
                        "chunks" => c.chunks = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(())
                })?;
                Ok(Field::Got(c))
            }
            array_as!(Field::Not);
            scalars_as!(Field::Not);
        }
        d.deserialize_any(V)
    }
}

fn string_field(v: &Option<Shallow>, what: &str) -> Result<String> {
    match v {
        Some(Shallow::Str(s)) => Ok(s.clone()),
        Some(other) => Err(format_err!("{what} must be a string, not {other}")),
        None => Err(format_err!("{what} is missing (it must be a string)")),
    }
}

/// The codec and filter names of a record, refused by name when this reader does not know them
/// (`UnsupportedError`; listing tools keep such tensors as opaque).
pub(crate) fn check_known(raw: &Field<RawCompression>, where_: &str) -> Result<()> {
    match raw {
        Field::Got(raw) => check_known_names(raw, where_),
        Field::Not(_) => Ok(()), // a type error, reported by `check`
    }
}

fn check_known_names(raw: &RawCompression, where_: &str) -> Result<()> {
    let codec = string_field(&raw.codec, &format!("{where_} compression 'codec'"))?;
    if CodecId::parse(&codec).is_none() {
        return Err(Error::Unsupported(format!(
            "{where_}: compression codec '{codec}' is not supported by this reader: upgrade qtensors"
        )));
    }
    let filter = string_field(&raw.filter, &format!("{where_} compression 'filter'"))?;
    if Filter::parse(&filter).is_none() {
        return Err(Error::Unsupported(format!(
            "{where_}: compression filter '{filter}' is not supported by this reader: upgrade qtensors"
        )));
    }
    Ok(())
}

/// Rule 9 for a compressed part: a known codec and filter, a valid chunk size, and a chunk
/// table that accounts for exactly the part's decoded bytes (`decoded_len`, from its dtype and
/// shape) and its stored bytes (`stored_len`, the record's `length`), no chunk longer than its
/// decoded bytes nor expanding more than `MAX_EXPANSION` times.
pub(crate) fn check(
    raw: Field<RawCompression>,
    dtype: DType,
    decoded_len: u64,
    stored_len: u64,
    where_: &str,
) -> Result<Compression> {
    let raw = match raw {
        Field::Got(r) => r,
        Field::Not(v) => {
            return Err(format_err!(
                "{where_}: 'compression' must be an object, not {v}"
            ))
        }
    };
    check_known_names(&raw, where_)?;
    let codec = CodecId::parse(&string_field(&raw.codec, "codec")?).expect("checked");
    let filter = Filter::parse(&string_field(&raw.filter, "filter")?).expect("checked");
    let w = format!("{where_} compression");
    if filter == Filter::Float && !is_float(dtype) {
        return Err(format_err!(
            "{w}: filter 'float' needs a float16, bfloat16, float32 or float64 part, not {dtype}"
        ));
    }
    let level = match &raw.level {
        Some(Shallow::Uint(v)) if *v <= i32::MAX as u64 => *v as i32,
        Some(Shallow::Int(v)) if *v >= i32::MIN as i64 => *v as i32,
        Some(other) => {
            return Err(format_err!(
                "{w} 'level' must be a 32-bit integer, not {other}"
            ))
        }
        None => {
            return Err(format_err!(
                "{w} 'level' is missing (it must be an integer)"
            ))
        }
    };
    let chunk_size = match &raw.chunk_size {
        Some(Shallow::Uint(v)) if v.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(v) => *v,
        Some(other) => {
            return Err(format_err!(
            "{w} 'chunk_size' {other} must be a power of two between {MIN_CHUNK} and {MAX_CHUNK}"
        ))
        }
        None => return Err(format_err!("{w} 'chunk_size' is missing")),
    };
    let list = match raw.chunks {
        Some(Field::Got(l)) => l,
        Some(Field::Not(v)) => {
            return Err(format_err!(
                "{w} 'chunks' must be an array of integers, not {v}"
            ))
        }
        None => return Err(format_err!("{w} 'chunks' is missing")),
    };
    if let Some((i, v)) = list.bad {
        return Err(format_err!(
            "{w}: chunk {i} has length {v}: lengths are integers in 0..2^32"
        ));
    }
    let c = Compression {
        codec,
        level,
        filter,
        chunk_size,
        chunks: list.lengths,
        decoded_len,
        itemsize: dtype.itemsize(),
    };
    let want = decoded_len.div_ceil(chunk_size);
    if c.chunks.len() as u64 != want {
        return Err(format_err!(
            "{w}: the chunk table has {} chunks, but {decoded_len} decoded bytes in chunks of {chunk_size} make {want}",
            c.chunks.len()
        ));
    }
    let mut total = 0u64;
    for (i, &s) in c.chunks.iter().enumerate() {
        let (s, n) = (s as u64, c.chunk_len(i));
        if s == 0 || s > n || n > s * MAX_EXPANSION {
            return Err(format_err!(
                "{w}: chunk {i} claims {s} stored bytes for {n} decoded bytes (it must be 1..={n} bytes, and at least 1/{MAX_EXPANSION} of them)"
            ));
        }
        total += s;
    }
    if total != stored_len {
        return Err(format_err!(
            "{w}: the chunks' lengths add up to {total} bytes, but the part's length is {stored_len}"
        ));
    }
    Ok(c)
}

impl Serialize for Compression {
    /// Keys in sorted order, like every object of the header.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("chunk_size", &self.chunk_size)?;
        m.serialize_entry("chunks", &self.chunks)?;
        m.serialize_entry("codec", self.codec.name())?;
        m.serialize_entry("filter", self.filter.name())?;
        m.serialize_entry("level", &self.level)?;
        m.end()
    }
}
