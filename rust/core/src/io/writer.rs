//! The writer: plans the layout from shapes and encodings alone, writes parts in any order into a
//! temporary file beside the target, then writes the header with the checksums, fsyncs and renames.
//! The final name never holds a partial file; the same inputs give the same bytes.
//!
//! With compression (spec 2.1) the stored size of a part is known only once it is compressed:
//! parts then go one after another in the order they are written, and the header space is
//! reserved up front for the largest compression records the parts can get. Parts shorter than
//! a chunk are copied and held until they add up to `STAGE_BYTES`, so that their chunks compress
//! in parallel as one large part's do (a model's norms, biases and small matrices would
//! otherwise compress one at a time on one core); parts longer than `PIECE_CHUNKS` chunks
//! compress in pieces of that many chunks, so the writer's buffers stay two pieces long (64 MiB
//! with 1 MiB chunks) whatever the part (a 1 GB embedding included). A batch is written (and hashed) by a background thread while the
//! next one compresses: the disk and the cores work at once (`benches/bench_compression.py`).

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use tempfile::NamedTempFile;
use xxhash_rust::xxh3::Xxh3Default;

use super::checksum::checksum;
use crate::codecs::compress::{self, Compressed, Input, Options};
use crate::error::{Error, Result};
use crate::format::compression::{CodecId, Compression, Filter};
use crate::format::header::PartInfo;
use crate::format::limits::*;
use crate::format::{DType, Encoding, Header, TensorInfo};

/// What the caller wants stored under one name.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub encoding: Encoding,
}

pub struct FileWriter {
    tmp: Option<NamedTempFile>,
    final_path: PathBuf,
    header: Header,
    written: Vec<Vec<bool>>,
    data_start: u64,
    /// Compress parts where it pays; parts are then placed at `next` in write order.
    compression: Option<Options>,
    next: u64,
    /// Header bytes available (the planned header plus the reserve), compressed mode only.
    header_room: u64,
    /// Parts given to a compressing writer (staged, being written, or written): each once.
    taken: Vec<Vec<bool>>,
    /// Parts shorter than a chunk waiting for a batch: their bytes one after another, and for
    /// each `(tensor, part, range in staged)`.
    staged: Vec<u8>,
    staged_parts: Vec<(usize, usize, Range<usize>)>,
    /// The batch being written in the background, and the buffer the next batch compresses
    /// into (the two alternate: no batch allocates its own).
    pending: Option<PendingWrite>,
    spare: Vec<u8>,
    /// The part being compressed in pieces: its chunks' stored lengths so far, and the hash of
    /// its stored bytes (with the writing thread while a piece is being written).
    open: Option<OpenPart>,
}

struct OpenPart {
    chunks: Vec<u32>,
    stored: u64,
    hash: Option<Xxh3Default>,
}

/// Parts shorter than a chunk wait, copied, until they add up to this: eight chunks of the
/// default size keep eight cores busy, and copying costs a fraction of compressing.
const STAGE_BYTES: usize = 8 << 20;

/// Parts longer than this many chunks compress and write a piece of this many chunks at a time:
/// enough for every core and to keep the writes large, and the writer's memory stays bounded.
const PIECE_CHUNKS: usize = 32;

/// A batch of compressed parts on its way to the file: each `(tensor, part)` (the last one may
/// be a piece of the open part), and the thread that writes their chunks and returns the buffer
/// and the hash of each one's stored bytes.
struct PendingWrite {
    parts: Vec<(usize, usize)>,
    piece: bool,
    thread: JoinHandle<(Vec<u8>, std::io::Result<Vec<Xxh3Default>>)>,
}

/// Write the stored chunks of each part of `c` one after another from its position in `at`,
/// each hashed as it goes into its hasher of `hashes` (fresh, or the open part's so far).
fn write_chunks(
    file: &File,
    c: &Compressed,
    at: &[u64],
    mut hashes: Vec<Xxh3Default>,
) -> std::io::Result<Vec<Xxh3Default>> {
    for (j, (&start, hash)) in at.iter().zip(&mut hashes).enumerate() {
        let mut pos = start;
        for chunk in c.stored(j) {
            write_at(file, chunk, pos)?;
            hash.update(chunk);
            pos += chunk.len() as u64;
        }
    }
    Ok(hashes)
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

#[cfg(unix)]
fn write_at(f: &File, buf: &[u8], pos: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(buf, pos)
}

#[cfg(windows)]
fn write_at(f: &File, mut buf: &[u8], mut pos: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_write(buf, pos)?;
        buf = &buf[n..];
        pos += n as u64;
    }
    Ok(())
}

/// Plan every part's offset: tensors in the given order, parts in encoding order, aligned.
pub fn plan_layout(
    plans: Vec<PlannedTensor>,
    metadata: BTreeMap<String, String>,
    alignment: u64,
) -> Result<Header> {
    if !alignment.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&alignment) {
        return Err(Error::Invalid(format!(
            "alignment {alignment} must be a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}"
        )));
    }
    let mut offset = 0u64;
    let mut tensors = Vec::with_capacity(plans.len());
    for p in plans {
        if p.name.is_empty() || p.name.len() > MAX_NAME_LEN {
            return Err(Error::Invalid(format!(
                "tensor name '{}' must be 1 to {MAX_NAME_LEN} bytes",
                p.name
            )));
        }
        if p.shape.len() > MAX_RANK {
            return Err(Error::Invalid(format!(
                "tensor '{}' has rank {}, above the limit of {MAX_RANK}",
                p.name,
                p.shape.len()
            )));
        }
        p.encoding.check_params()?;
        if !p.encoding.accepts_dtype(p.dtype) {
            return Err(Error::Invalid(format!(
                "tensor '{}': encoding '{}' cannot store dtype {}: only float tensors can be quantized",
                p.name,
                p.encoding.name(),
                p.dtype
            )));
        }
        let specs = p.encoding.part_specs(p.dtype, &p.shape)?;
        let parts = specs
            .into_iter()
            .map(|s| {
                let part = PartInfo {
                    name: s.name.to_string(),
                    dtype: s.dtype,
                    shape: s.shape,
                    offset,
                    length: s.length,
                    checksum: 0,
                    compression: None,
                };
                offset = align_up(offset + s.length, alignment);
                part
            })
            .collect();
        tensors.push(TensorInfo {
            name: p.name,
            dtype: p.dtype,
            shape: p.shape,
            encoding: p.encoding,
            parts,
        });
    }
    Header::new(alignment, metadata, tensors).map_err(|e| Error::Invalid(e.to_string()))
}

/// Header bytes that the compressed writer keeps free beyond the planned header: for each part,
/// the longest compression record it can get (every chunk at most its decoded length) and the
/// extra digits its offset can take when parts are placed in write order.
fn header_reserve(header: &Header, o: &Options) -> u64 {
    let end: u64 = header
        .tensors
        .iter()
        .flat_map(|t| &t.parts)
        .map(|p| align_up(p.length, header.alignment))
        .sum();
    let digits = |v: u64| v.to_string().len() as u64;
    let mut total = 0;
    for p in header.tensors.iter().flat_map(|t| &t.parts) {
        total += digits(end).saturating_sub(digits(p.offset));
        let n = p.length.div_ceil(o.chunk_size);
        let widest = Compression {
            codec: CodecId::Zstd,
            level: o.level,
            filter: Filter::Float,
            chunk_size: o.chunk_size,
            chunks: vec![],
            decoded_len: p.length,
            itemsize: 1,
        };
        let empty = serde_json::to_string(&widest).expect("JSON of plain values");
        // `,"compression":` + the record + one length (and comma) per chunk.
        total += 16 + empty.len() as u64 + n * (digits(o.chunk_size.min(p.length)) + 1);
    }
    total
}

impl FileWriter {
    pub fn create(
        path: &Path,
        plans: Vec<PlannedTensor>,
        metadata: BTreeMap<String, String>,
        alignment: u64,
    ) -> Result<Self> {
        Self::create_compressed(path, plans, metadata, alignment, None)
    }

    /// `create`, compressing every part where it saves enough (`compress::MIN_SAVING`).
    pub fn create_compressed(
        path: &Path,
        plans: Vec<PlannedTensor>,
        metadata: BTreeMap<String, String>,
        alignment: u64,
        compression: Option<Options>,
    ) -> Result<Self> {
        if let Some(o) = &compression {
            let cs = o.chunk_size;
            let (lo, hi) = (
                crate::format::compression::MIN_CHUNK,
                crate::format::compression::MAX_CHUNK,
            );
            if !cs.is_power_of_two() || !(lo..=hi).contains(&cs) {
                return Err(Error::Invalid(format!(
                    "compression chunk size {cs} must be a power of two between {lo} and {hi}"
                )));
            }
        }
        let header = plan_layout(plans, metadata, alignment)?;
        let json = header.to_json();
        let header_room = match &compression {
            Some(o) => json.len() as u64 + header_reserve(&header, o),
            None => json.len() as u64,
        };
        let data_start = align_up(PREFIX_LEN as u64 + header_room, alignment);
        let data_len = header
            .tensors
            .iter()
            .flat_map(|t| t.parts.iter())
            .map(|p| p.offset + p.length)
            .max()
            .unwrap_or(0);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("'{}' is not a file path", path.display())))?
            .to_string_lossy()
            .into_owned();
        check_folder(&dir, path)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| {
                let context = format!("cannot create a file in '{}'", dir.display());
                Error::io(context, without_temp_name(e))
            })?;
        let initial = if compression.is_some() { 0 } else { data_len };
        tmp.as_file()
            .set_len(data_start + initial)
            .map_err(|e| Error::io("cannot size the output file", e))?;
        let written: Vec<Vec<bool>> = header
            .tensors
            .iter()
            .map(|t| vec![false; t.parts.len()])
            .collect();
        Ok(FileWriter {
            tmp: Some(tmp),
            final_path: path.to_path_buf(),
            header,
            data_start,
            compression,
            next: 0,
            header_room,
            taken: written.clone(),
            written,
            staged: Vec::new(),
            staged_parts: Vec::new(),
            pending: None,
            spare: Vec::new(),
            open: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Write one part's bytes; `tensor` and `part` index the planned header.
    pub fn write_part(&mut self, tensor: usize, part: usize, bytes: &[u8]) -> Result<()> {
        let t = self
            .header
            .tensors
            .get(tensor)
            .ok_or_else(|| Error::Invalid(format!("no tensor #{tensor} in this file")))?;
        let p = t
            .parts
            .get(part)
            .ok_or_else(|| Error::Invalid(format!("tensor '{}' has no part #{part}", t.name)))?;
        let planned = p.decoded_len();
        if bytes.len() as u64 != planned {
            return Err(Error::Invalid(format!(
                "tensor '{}' part '{}': {} bytes given, {} planned",
                t.name,
                p.name,
                bytes.len(),
                planned
            )));
        }
        if self.compression.is_some() && self.taken[tensor][part] {
            return Err(Error::Invalid(format!(
                "tensor '{}' part '{}' is written already (a compressing writer places parts in write order)",
                t.name, p.name
            )));
        }
        let Some(opts) = self.compression else {
            let file = self.tmp.as_ref().expect("writer is open").as_file();
            write_at(file, bytes, self.data_start + p.offset)
                .map_err(|e| Error::io(format!("writing tensor '{}'", t.name), e))?;
            self.header.tensors[tensor].parts[part].checksum = checksum(bytes);
            self.written[tensor][part] = true;
            return Ok(());
        };
        self.taken[tensor][part] = true;
        let cs = opts.chunk_size as usize;
        if bytes.len() < cs && self.staged.len() + bytes.len() <= STAGE_BYTES {
            let at = self.staged.len();
            self.staged.extend_from_slice(bytes);
            self.staged_parts
                .push((tensor, part, at..self.staged.len()));
            return Ok(());
        }
        let piece = PIECE_CHUNKS * cs;
        if bytes.len() <= piece {
            return self.flush(Some((tensor, part, bytes)), false);
        }
        self.write_in_pieces(tensor, part, bytes, piece)
    }

    /// A part longer than `piece` bytes: compressed and written a piece at a time (the staged
    /// parts go with the first), then judged as a whole. When compression does not pay, its bytes
    /// as they are replace the chunks written (from the same offset: nothing follows it yet).
    fn write_in_pieces(
        &mut self,
        tensor: usize,
        part: usize,
        bytes: &[u8],
        piece: usize,
    ) -> Result<()> {
        self.open = Some(OpenPart {
            chunks: Vec::new(),
            stored: 0,
            hash: Some(Xxh3Default::new()),
        });
        for p in bytes.chunks(piece) {
            self.flush(Some((tensor, part, p)), true)?;
        }
        self.settle()?;
        let open = self.open.take().expect("the open part");
        let opts = self.compression.expect("a compressing writer");
        let t = &mut self.header.tensors[tensor];
        let p = &mut t.parts[part];
        let len = bytes.len() as u64;
        if compress::pays(open.stored, len) {
            p.length = open.stored;
            p.checksum = open.hash.expect("the hash is back").digest();
            p.compression = Some(Box::new(compress::record(&opts, p.dtype, open.chunks, len)));
        } else {
            let f = self.tmp.as_ref().expect("writer is open").as_file();
            write_at(f, bytes, self.data_start + p.offset)
                .map_err(|e| Error::io(format!("writing tensor '{}'", t.name), e))?;
            p.length = len;
            p.checksum = checksum(bytes);
            p.compression = None;
        }
        self.next = align_up(p.offset + p.length, self.header.alignment);
        self.written[tensor][part] = true;
        Ok(())
    }

    /// Compress the staged parts and `current` (the caller's bytes) in one parallel pass, place
    /// them in that order, and hand them to a background thread that writes them while the
    /// caller goes on.
    /// `piece`: `current` is the next piece of the open part.
    fn flush(&mut self, current: Option<(usize, usize, &[u8])>, piece: bool) -> Result<()> {
        let Some(opts) = self.compression else {
            return Ok(());
        };
        let staged = std::mem::take(&mut self.staged);
        let mut ids: Vec<(usize, usize)> = Vec::with_capacity(self.staged_parts.len() + 1);
        let mut inputs: Vec<Input<'_>> = Vec::with_capacity(ids.capacity());
        let dtype_of = |t: usize, p: usize| self.header.tensors[t].parts[p].dtype;
        for (t, p, r) in self.staged_parts.drain(..) {
            ids.push((t, p));
            let dtype = dtype_of(t, p);
            inputs.push(Input {
                bytes: &staged[r],
                dtype,
                piece: false,
            });
        }
        if let Some((t, p, bytes)) = current {
            ids.push((t, p));
            let dtype = dtype_of(t, p);
            inputs.push(Input {
                bytes,
                dtype,
                piece,
            });
        }
        if ids.is_empty() {
            self.staged = staged;
            return Ok(());
        }
        // Compressed while the previous batch is still being written.
        let c = compress::compress_parts(&inputs, &opts, std::mem::take(&mut self.spare)).map_err(
            |e| {
                let (t, _) = ids[0];
                Error::Invalid(format!("tensor '{}': {e}", self.header.tensors[t].name))
            },
        )?;
        drop(inputs);
        self.staged = staged;
        self.staged.clear();
        let file = self.tmp.as_ref().expect("writer is open").as_file();
        let file = file
            .try_clone()
            .map_err(|e| Error::io("cannot share the output file with a writing thread", e))?;
        // Its buffer is about to be reused; a failed write fails this batch too.
        self.settle()?;
        let mut at = Vec::with_capacity(ids.len());
        let mut hashes = Vec::with_capacity(ids.len());
        for (j, &(t, p)) in ids.iter().enumerate() {
            let p = &mut self.header.tensors[t].parts[p];
            if piece && j + 1 == ids.len() {
                // The open part: placed at its first piece; its length is known at its end.
                let open = self.open.as_mut().expect("an open part");
                if open.chunks.is_empty() {
                    p.offset = self.next;
                }
                at.push(self.data_start + p.offset + open.stored);
                let rec = c.parts[j]
                    .record
                    .as_ref()
                    .expect("a piece keeps its chunks");
                open.chunks.extend_from_slice(&rec.chunks);
                open.stored += c.stored_len(j);
                hashes.push(open.hash.take().expect("the hash is back"));
                continue;
            }
            p.offset = self.next;
            p.length = c.stored_len(j);
            p.compression = c.parts[j].record.clone().map(Box::new);
            self.next = align_up(p.offset + p.length, self.header.alignment);
            at.push(self.data_start + p.offset);
            hashes.push(Xxh3Default::new());
        }
        let thread = std::thread::Builder::new()
            .name("qtensors-write".into())
            .spawn(move || {
                let hashes = write_chunks(&file, &c, &at, hashes);
                (c.buf, hashes)
            })
            .map_err(|e| Error::io("cannot start a writing thread", e))?;
        self.pending = Some(PendingWrite {
            parts: ids,
            piece,
            thread,
        });
        Ok(())
    }

    /// Wait for the batch being written in the background: its checksums go into the header,
    /// its buffer becomes the spare.
    fn settle(&mut self) -> Result<()> {
        let Some(w) = self.pending.take() else {
            return Ok(());
        };
        let (buf, sums) = w.thread.join().unwrap_or_else(|_| {
            let e = std::io::Error::other("the writing thread panicked");
            (Vec::new(), Err(e))
        });
        self.spare = buf;
        let sums = sums.map_err(|e| {
            let (t, _) = w.parts[0];
            Error::io(
                format!("writing tensor '{}'", self.header.tensors[t].name),
                e,
            )
        })?;
        let n = w.parts.len();
        for (j, (&(t, p), hash)) in w.parts.iter().zip(sums).enumerate() {
            if w.piece && j + 1 == n {
                self.open.as_mut().expect("an open part").hash = Some(hash);
                continue; // written once its last piece is
            }
            self.header.tensors[t].parts[p].checksum = hash.digest();
            // Only a part whose bytes reached the file counts as written (`finish` checks).
            self.written[t][p] = true;
        }
        Ok(())
    }

    /// Write every part of a tensor at once.
    pub fn write_tensor(&mut self, tensor: usize, parts: &[Vec<u8>]) -> Result<()> {
        for (i, p) in parts.iter().enumerate() {
            self.write_part(tensor, i, p)?;
        }
        Ok(())
    }

    /// Write the prefix and header, fsync, and rename into place.
    pub fn finish(mut self) -> Result<Header> {
        self.flush(None, false)?;
        self.settle()?;
        self.spare = Vec::new();
        for (t, w) in self.header.tensors.iter().zip(&self.written) {
            if let Some(i) = w.iter().position(|done| !done) {
                return Err(Error::Invalid(format!(
                    "tensor '{}' part '{}' was never written",
                    t.name, t.parts[i].name
                )));
            }
        }
        if self.compression.is_some() {
            // Compressed parts are placed in write order, which may differ from the plan's:
            // the header lists tensors in file order (spec: `tensors`).
            self.header.tensors.sort_by_key(file_position);
        }
        let json = self.header.to_json();
        if self.compression.is_some() && json.len() as u64 > self.header_room {
            return Err(Error::Invalid(format!(
                "the header grew to {} bytes, beyond the {} reserved for it (a bug: please report it)",
                json.len(),
                self.header_room
            )));
        }
        let mut header_bytes = json.into_bytes();
        header_bytes.resize((self.data_start - PREFIX_LEN as u64) as usize, b' ');
        // Only files that use a 1.1 feature (compressed parts, the FP4 encodings) say 1.1: the
        // rest stay 1.0, which every 1.x reader reads.
        let needs_1_1 = |t: &TensorInfo| {
            t.is_compressed() || matches!(t.encoding, Encoding::Mxfp4(_) | Encoding::Nvfp4(_))
        };
        let minor = if self.header.tensors.iter().any(needs_1_1) {
            VERSION_MINOR
        } else {
            0
        };
        let mut prefix = Vec::with_capacity(PREFIX_LEN);
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
        prefix.extend_from_slice(&minor.to_le_bytes());
        prefix.extend_from_slice(&0u32.to_le_bytes());
        prefix.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
        let tmp = self.tmp.take().expect("writer is open");
        let file = tmp.as_file();
        let io = |e| Error::io(format!("writing '{}'", self.final_path.display()), e);
        if self.compression.is_some() {
            // Zero-length parts may sit at the running offset past the last byte (rule 10).
            let end = self
                .header
                .tensors
                .iter()
                .flat_map(|t| &t.parts)
                .map(|p| p.offset + p.length)
                .max()
                .unwrap_or(0);
            file.set_len(self.data_start + end).map_err(io)?;
        }
        write_at(file, &prefix, 0).map_err(io)?;
        write_at(file, &header_bytes, PREFIX_LEN as u64).map_err(io)?;
        set_readable_permissions(file);
        file.sync_all().map_err(io)?;
        tmp.persist(&self.final_path).map_err(|e| {
            Error::io(
                format!("renaming into '{}'", self.final_path.display()),
                e.error,
            )
        })?;
        sync_parent_dir(&self.final_path);
        Ok(self.header.clone())
    }
}

/// Where a tensor sits in the data section: its first stored byte (zero-length parts, which
/// may sit anywhere, only where it has nothing else).
fn file_position(t: &TensorInfo) -> u64 {
    let first = |stored: bool| {
        t.parts
            .iter()
            .filter(|p| !stored || p.length > 0)
            .map(|p| p.offset)
            .min()
    };
    first(true).or_else(|| first(false)).unwrap_or(0)
}

impl Drop for FileWriter {
    /// An unfinished writer waits for its background write before its temporary file goes.
    fn drop(&mut self) {
        let _ = self.settle();
    }
}

#[cfg(unix)]
fn set_readable_permissions(f: &File) {
    use std::os::unix::fs::PermissionsExt;
    // Temporary files are created 0600; a saved model should be readable like any other file.
    let _ = f.set_permissions(std::fs::Permissions::from_mode(0o644));
}
#[cfg(not(unix))]
fn set_readable_permissions(_f: &File) {}

/// The folder the output goes into must exist: say so in its terms, not the temporary file's.
fn check_folder(dir: &Path, path: &Path) -> Result<()> {
    let output = path.display();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "cannot write '{output}': '{}' is not a folder",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::io(
            format!(
                "cannot write '{output}': the folder '{}' does not exist",
                dir.display()
            ),
            e,
        )),
        Err(e) => Err(Error::io(
            format!(
                "cannot write '{output}': cannot reach the folder '{}'",
                dir.display()
            ),
            e,
        )),
    }
}

/// The error of a failed temporary-file creation without the random temporary name tempfile
/// appends ("<OS message> at path \".x.qtensors.a1B2c3.tmp\""): it means nothing to the user.
fn without_temp_name(e: std::io::Error) -> std::io::Error {
    if e.raw_os_error().is_some() {
        return e;
    }
    let text = e.to_string();
    match text.rsplit_once(" at path ") {
        Some((message, _path)) => std::io::Error::new(e.kind(), message.to_string()),
        None => e,
    }
}

#[cfg(unix)]
fn sync_parent_dir(path: &Path) {
    // Makes the rename itself durable; failure here leaves a complete file, so it is not an error.
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}
#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) {}
