//! Fuzz target: any bytes, as a qtensors file, through every reading path of the core: open
//! (prefix, header parse and every check of spec section 7, strict and lenient), decode of every
//! tensor, checksum verification, and the streaming reader (layout, whole and split reads with
//! verification). The property: never a panic (overflow checks are on), a hang or an allocation
//! out of proportion to the file; only clean errors.
//!
//! Half the mutations are structure-aware: the header JSON is parsed, one value in it is replaced
//! by a boundary value (or a key, element or name changed), and the file is reassembled with a
//! correct `header_len`, so that mutations reach the checks past JSON parsing.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use qtensors_core::codecs::simd;
use qtensors_core::format::encoding::numel;
use qtensors_core::format::Encoding;
use qtensors_core::io::{QFile, ReadMode, StreamFile};
use serde_json::Value;

/// Decoding never needs more output than 1-bit codes widened to 8-byte elements: 64 bytes per
/// byte of file. More would mean the checks let a header size an allocation. Compressed parts
/// (spec 2.1) may expand up to 32768 times on top of that, and are decoded only when small.
const MAX_OUTPUT_PER_FILE_BYTE: u64 = 64;
const MAX_EXPANSION: u64 = qtensors_core::format::compression::MAX_EXPANSION;
const MAX_FUZZ_OUTPUT: u64 = 1 << 28;

fn scratch_path() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("qtensors-fuzz-{}.qtensors", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_path();
    std::fs::write(&path, data).expect("write the scratch file");
    if let Ok(f) = QFile::open(&path, true) {
        // Lenient open (newer minors, unknown encodings): listing only, as `inspect` does.
        let _ = f.header().to_json();
    }
    if let Ok(f) = QFile::open(&path, false) {
        decode_every_tensor(&f, data.len() as u64);
        let _ = f.verify();
    }
    if let Ok(s) = StreamFile::open(&path, ReadMode::Pread, 2, 4096) {
        stream_every_tensor(&s);
    }
});

fn decode_every_tensor(f: &QFile, file_len: u64) {
    let k = simd::best();
    for t in &f.header().tensors {
        if matches!(t.encoding, Encoding::Unknown { .. }) {
            continue;
        }
        let n = numel(&t.shape).expect("validated shapes have an element count");
        let bytes = n
            .checked_mul(t.dtype.itemsize() as u64)
            .expect("output size overflows u64");
        let per_byte = MAX_OUTPUT_PER_FILE_BYTE * if t.is_compressed() { MAX_EXPANSION } else { 1 };
        assert!(
            bytes <= per_byte * file_len + 64,
            "tensor '{}' decodes to {bytes} bytes from a file of {file_len}",
            t.name
        );
        if bytes > MAX_FUZZ_OUTPUT {
            continue;
        }
        let mut out = vec![0u8; bytes as usize];
        let _ = f.decode(k, t, &mut out);
        let _ = f.verify_tensor(t);
    }
}

fn stream_every_tensor(s: &StreamFile) {
    for i in 0..s.header().tensors.len() {
        let (a, b) = s.tensor_range(i).expect("a listed tensor has a range");
        let layout = s.tensor_layout(i).expect("a listed tensor has a layout");
        let parts: u64 = layout.parts.iter().map(|p| p.2).sum();
        let compressed = s.header().tensors[i].is_compressed();
        assert!(
            compressed || layout.len <= b - a,
            "buffer larger than the span"
        );
        if layout.len > MAX_FUZZ_OUTPUT {
            continue;
        }
        assert!(
            layout.len <= parts + 4096 * layout.segments.len() as u64 + (1 << 20) * 3,
            "buffer of {} bytes for {parts} bytes of parts",
            layout.len
        );
        let mut buf = vec![0u8; layout.len as usize];
        let _ = s.read(i, 0, &mut buf, true);
        // The same in two pieces (incremental hashing across calls).
        let cut = buf.len() / 3;
        let (head, tail) = buf.split_at_mut(cut);
        if s.read(i, 0, head, true).is_ok() {
            let _ = s.read(i, cut as u64, tail, true);
        }
    }
}

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = Rng(u64::from(seed) | 1);
    if rng.below(2) == 0 {
        if let Some(new) = mutate_header(&data[..size], &mut rng) {
            if new.len() <= max_size {
                data[..new.len()].copy_from_slice(&new);
                return new.len();
            }
        }
    }
    libfuzzer_sys::fuzzer_mutate(data, size, max_size)
});

/// xorshift64: the mutator must be a function of `seed` for libFuzzer to replay it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Parse the header JSON of `file`, change one thing in it, and reassemble the file.
fn mutate_header(file: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let header_len = u64::from_le_bytes(file.get(16..24)?.try_into().ok()?);
    let end = 24usize.checked_add(usize::try_from(header_len).ok()?)?;
    let mut header: Value = serde_json::from_slice(file.get(24..end)?).ok()?;
    let mut nodes = 0;
    count_nodes(&header, &mut nodes);
    let target = rng.below(nodes);
    mutate_node(&mut header, &mut 0, target, rng);
    let mut text = serde_json::to_vec(&header).ok()?;
    // Keep data_start aligned to the header's alignment (64 unless the mutation broke it).
    let align = header
        .get("alignment")
        .and_then(Value::as_u64)
        .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
        .unwrap_or(64) as usize;
    text.resize(
        text.len() + (align - (24 + text.len()) % align) % align,
        b' ',
    );
    let mut out = Vec::with_capacity(24 + text.len() + file.len() - end);
    out.extend_from_slice(&file[..16]);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&file[end..]);
    Some(out)
}

fn count_nodes(v: &Value, n: &mut usize) {
    *n += 1;
    match v {
        Value::Array(a) => a.iter().for_each(|x| count_nodes(x, n)),
        Value::Object(o) => o.values().for_each(|x| count_nodes(x, n)),
        _ => {}
    }
}

const NUMBERS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    31,
    32,
    63,
    64,
    65,
    255,
    256,
    4096,
    1 << 20,
    (1 << 20) + 1,
    1 << 31,
    1 << 32,
    (1 << 53) + 1,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX,
];

const NAMES: &[&str] = &[
    "raw",
    "affine",
    "symmetric",
    "nf4",
    "codes",
    "scales",
    "mins",
    "data",
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "uint8",
    "int8",
    "int64",
    "bool",
    "float8_e4m3fn",
    "zstd",
    "xxh3-64:0000000000000000",
    "",
];

/// Replace the `target`-th node (pre-order) with a nearby or boundary value.
fn mutate_node(v: &mut Value, seen: &mut usize, target: usize, rng: &mut Rng) -> bool {
    if *seen == target {
        *v = match v {
            Value::Number(n) => mutate_number(n, rng),
            Value::String(_) => Value::from(NAMES[rng.below(NAMES.len())]),
            Value::Array(a) if !a.is_empty() => {
                let (i, j) = (rng.below(a.len()), rng.below(a.len()));
                match rng.below(3) {
                    0 => drop(a.remove(i)),
                    1 => a.push(a[i].clone()),
                    _ => a.swap(i, j),
                }
                return true;
            }
            Value::Object(o) if !o.is_empty() => {
                let key = o
                    .keys()
                    .nth(rng.below(o.len()))
                    .cloned()
                    .unwrap_or_default();
                if rng.below(2) == 0 {
                    o.remove(&key);
                } else {
                    o.insert(key, Value::from(NUMBERS[rng.below(NUMBERS.len())]));
                }
                return true;
            }
            _ => Value::from(NUMBERS[rng.below(NUMBERS.len())]),
        };
        return true;
    }
    *seen += 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| mutate_node(x, seen, target, rng)),
        Value::Object(o) => o.values_mut().any(|x| mutate_node(x, seen, target, rng)),
        _ => false,
    }
}

fn mutate_number(n: &serde_json::Number, rng: &mut Rng) -> Value {
    let x = n.as_u64().unwrap_or(0);
    match rng.below(5) {
        0 => Value::from(x.wrapping_add(1)),
        1 => Value::from(x.saturating_sub(1)),
        2 => Value::from(x.wrapping_mul(2)),
        3 => Value::from(-1),
        _ => Value::from(NUMBERS[rng.below(NUMBERS.len())]),
    }
}
