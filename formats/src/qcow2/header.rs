//! The qcow2 header and its extensions: parsed, bounds-checked and turned into a [`Header`]
//! that the random-access reader and the stream converter share.
//!
//! Specification: QEMU `docs/interop/qcow2.txt`
//! (<https://gitlab.com/qemu-project/qemu/-/blob/master/docs/interop/qcow2.txt>).
//!
//! Everything here is a pure function of the first cluster's bytes. Every field is checked
//! before it is used for arithmetic or allocation; features we refuse (encryption, external
//! data files, unknown incompatible bits, a set corrupt bit) fail here with their own message,
//! so `probe`, `open` and `stream` refuse them identically.

use crate::error::{Error, ErrorKind, Result};
use crate::limits;

/// "QFI\xfb" at byte 0.
pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";

/// A version 2 header is exactly this long (and has no extension fields).
const V2_HEADER_LEN: u64 = 72;
/// A version 3 header is at least this long (through `header_length`).
const V3_MIN_HEADER_LEN: u64 = 104;
/// Byte offset of the v3 `compression_type` field.
const COMPRESSION_TYPE_OFFSET: u64 = 104;
/// Smallest cluster: 512 bytes (spec minimum).
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB (QEMU's implementation limit; it refuses larger images).
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need at least 16 KiB clusters (32 subclusters of 512 bytes).
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Longest backing file name the spec allows.
const MAX_BACKING_NAME_LEN: u64 = 1023;
/// Longest backing format name QEMU accepts (its buffer is 16 bytes including the NUL).
const MAX_BACKING_FORMAT_LEN: u64 = 15;
/// Widest refcount entry: 64 bits (`refcount_order` 6).
const MAX_REFCOUNT_ORDER: u32 = 6;
/// One feature-name-table entry: type, bit, 46-byte name.
const FEATURE_NAME_ENTRY_LEN: usize = 48;

/// Incompatible feature bits (header bytes 72..80).
mod incompat {
    /// Refcounts may be stale; harmless for reading.
    pub const DIRTY: u64 = 1 << 0;
    /// Some structure may be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// 128-bit L2 entries with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this reader understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Header extension types.
mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Full disk encryption header pointer (LUKS).
    pub const CRYPTO_HEADER: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// The fixed header fields as stored (big-endian on disk). Only this module sees raw values.
#[derive(Debug, Clone)]
struct RawHeader {
    /// Bytes 4..8: 2 or 3.
    version: u32,
    /// Bytes 8..16: file offset of the backing file name, 0 for none.
    backing_file_offset: u64,
    /// Bytes 16..20: length of the backing file name.
    backing_file_size: u32,
    /// Bytes 20..24: log2 of the cluster size.
    cluster_bits: u32,
    /// Bytes 24..32: virtual disk size in bytes.
    size: u64,
    /// Bytes 32..36: 0 none, 1 AES, 2 LUKS.
    crypt_method: u32,
    /// Bytes 36..40: entries in the active L1 table.
    l1_size: u32,
    /// Bytes 40..48: file offset of the active L1 table.
    l1_table_offset: u64,
    /// Bytes 48..56: file offset of the refcount table.
    refcount_table_offset: u64,
    /// Bytes 56..60: clusters the refcount table occupies.
    refcount_table_clusters: u32,
    /// Bytes 72..80 (v3): incompatible feature bits.
    incompatible_features: u64,
    /// Bytes 96..100 (v3): log2 of the refcount width in bits (4 for v2).
    refcount_order: u32,
    /// Bytes 100..104 (v3): header length (72 for v2).
    header_length: u64,
    /// Byte 104 (v3, if `header_length` covers it): 0 zlib, 1 zstd.
    compression_type: u8,
}

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// Raw deflate (no zlib wrapper), window 4 KiB, as QEMU writes it.
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

/// A validated header: everything the readers need, in checked units.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Guest-visible size (≤ [`limits::MAX_VIRTUAL_SIZE`]).
    pub virtual_size: u64,
    /// File offset of the active L1 table (cluster aligned).
    pub l1_offset: u64,
    /// Entries the header declares for the L1 table (≥ [`Header::l1_needed`]).
    pub l1_size: u64,
    /// File offset of the refcount table (cluster aligned).
    pub refcount_table_offset: u64,
    /// Bytes of the refcount table.
    pub refcount_table_bytes: u64,
    /// 128-bit L2 entries with 32 subclusters per cluster.
    pub extended_l2: bool,
    /// Encoding of compressed clusters.
    pub compression: Compression,
    /// The backing file name, when the image has one.
    pub backing_file: Option<String>,
    /// The backing file format from the header extension, if present.
    pub backing_format: Option<String>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// Subclusters per cluster: 32 with extended L2 entries, else the cluster is one unit.
    pub fn subclusters(&self) -> u32 {
        if self.extended_l2 { 32 } else { 1 }
    }

    /// Bytes per subcluster (the cluster size without extended L2 entries).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }

    /// L1 entries the virtual size needs; later entries (VM state of snapshots, leftovers of a
    /// shrink) never map guest data and are ignored.
    pub fn l1_needed(&self) -> u64 {
        self.virtual_size.div_ceil(self.l2_span())
    }

    /// End of the active L1 table in the file (checked at parse time not to overflow).
    pub fn l1_end(&self) -> u64 {
        self.l1_offset + self.l1_size * 8
    }

    /// End of the refcount table in the file (checked at parse time not to overflow).
    pub fn refcount_table_end(&self) -> u64 {
        self.refcount_table_offset + self.refcount_table_bytes
    }

    /// "v2" or "v3", for [`crate::image::FormatInfo::subformat`].
    pub fn subformat(&self) -> &'static str {
        if self.version == 2 { "v2" } else { "v3" }
    }
}

/// Cluster size claimed by the first bytes of an image, so callers know how much to read
/// before [`parse`]. Fails on a bad magic or an out-of-range `cluster_bits`.
pub(crate) fn cluster_size_hint(head: &[u8]) -> Result<u64> {
    check_magic(head)?;
    let bits = be32(head, 20)?;
    check_cluster_bits(bits)?;
    Ok(1 << bits)
}

/// Parse and validate the header from `buf`, the image's first cluster (or as much of the
/// image as exists, or the detection head). Backing files are reported, not refused: the
/// caller applies its [`crate::image::BackingPolicy`].
pub(crate) fn parse(buf: &[u8]) -> Result<Header> {
    let raw = parse_fixed(buf)?;
    let cluster_size = 1u64 << raw.cluster_bits;
    let exts = parse_extensions(buf, &raw, cluster_size)?;
    check_features(&raw, &exts)?;
    let backing_file = read_backing_name(buf, &raw, cluster_size)?;
    let header = Header {
        version: raw.version,
        cluster_bits: raw.cluster_bits,
        virtual_size: raw.size,
        l1_offset: raw.l1_table_offset,
        l1_size: u64::from(raw.l1_size),
        refcount_table_offset: raw.refcount_table_offset,
        refcount_table_bytes: u64::from(raw.refcount_table_clusters) * cluster_size,
        extended_l2: raw.incompatible_features & incompat::EXTENDED_L2 != 0,
        compression: compression(&raw)?,
        backing_file,
        backing_format: exts.backing_format,
    };
    check_geometry(&header, &raw)?;
    Ok(header)
}

fn check_magic(buf: &[u8]) -> Result<()> {
    match buf.get(..4) {
        Some(m) if m == MAGIC => Ok(()),
        Some(_) => Err(Error::corrupt("not a qcow2 image (bad magic)")),
        None => Err(short(4, buf.len())),
    }
}

fn check_cluster_bits(bits: u32) -> Result<()> {
    if bits < MIN_CLUSTER_BITS {
        return Err(Error::corrupt(format!(
            "qcow2 cluster_bits {bits} is out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
        )));
    }
    if bits > MAX_CLUSTER_BITS {
        return Err(Error::unsupported(format!(
            "qcow2 cluster_bits {bits} is out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
        )));
    }
    Ok(())
}

fn parse_fixed(buf: &[u8]) -> Result<RawHeader> {
    check_magic(buf)?;
    let version = be32(buf, 4)?;
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!(
            "qcow2 version {version} is not supported (only 2 and 3)"
        )));
    }
    let cluster_bits = be32(buf, 20)?;
    check_cluster_bits(cluster_bits)?;
    let mut raw = RawHeader {
        version,
        backing_file_offset: be64(buf, 8)?,
        backing_file_size: be32(buf, 16)?,
        cluster_bits,
        size: be64(buf, 24)?,
        crypt_method: be32(buf, 32)?,
        l1_size: be32(buf, 36)?,
        l1_table_offset: be64(buf, 40)?,
        refcount_table_offset: be64(buf, 48)?,
        refcount_table_clusters: be32(buf, 56)?,
        incompatible_features: 0,
        refcount_order: 4,
        header_length: V2_HEADER_LEN,
        compression_type: 0,
    };
    if version == 3 {
        raw.incompatible_features = be64(buf, 72)?;
        raw.refcount_order = be32(buf, 96)?;
        raw.header_length = u64::from(be32(buf, 100)?);
        check_header_length(raw.header_length, 1 << cluster_bits)?;
        if raw.header_length > COMPRESSION_TYPE_OFFSET {
            raw.compression_type = byte(buf, COMPRESSION_TYPE_OFFSET)?;
        }
    }
    Ok(raw)
}

fn check_header_length(len: u64, cluster_size: u64) -> Result<()> {
    if len < V3_MIN_HEADER_LEN {
        return Err(Error::corrupt(format!(
            "qcow2 header_length {len} is below the v3 minimum of {V3_MIN_HEADER_LEN}"
        )));
    }
    if !len.is_multiple_of(8) {
        return Err(Error::corrupt(format!(
            "qcow2 header_length {len} is not a multiple of 8"
        )));
    }
    if len > cluster_size {
        return Err(Error::corrupt(format!(
            "qcow2 header_length {len} exceeds the cluster size {cluster_size}"
        )));
    }
    Ok(())
}

/// What the header extensions told us.
#[derive(Debug, Default)]
struct Extensions {
    /// Backing file format ("qcow2", "raw").
    backing_format: Option<String>,
    /// Names of incompatible feature bits from the feature name table, by bit.
    incompat_names: Vec<(u8, String)>,
    /// External data file name, when the extension is present.
    data_file: Option<String>,
    /// True when a full-disk-encryption header pointer is present.
    crypto_header: bool,
}

/// Walk the extensions between the header and the backing file name (or the end of the first
/// cluster), as QEMU does: each must fit in that area.
fn parse_extensions(buf: &[u8], raw: &RawHeader, cluster_size: u64) -> Result<Extensions> {
    let mut exts = Extensions::default();
    let end = if raw.backing_file_offset != 0 {
        raw.backing_file_offset.min(cluster_size)
    } else {
        cluster_size
    };
    let mut off = raw.header_length;
    while off < end {
        if end - off < 8 {
            return Err(overrun(off, 8, end));
        }
        let kind = be32(buf, off)?;
        let len = u64::from(be32(buf, off + 4)?);
        let data_off = off + 8;
        if len > end - data_off {
            return Err(overrun(off, len, end));
        }
        if kind == ext::END {
            break;
        }
        let data = slice(buf, data_off, len)?;
        apply_extension(&mut exts, kind, data, off)?;
        off = data_off + len.next_multiple_of(8);
    }
    Ok(exts)
}

fn overrun(off: u64, len: u64, end: u64) -> Error {
    Error::corrupt(format!(
        "qcow2 header extension at {off:#x} (length {len}) overruns the header area ending at \
         {end:#x}"
    ))
}

fn apply_extension(exts: &mut Extensions, kind: u32, data: &[u8], off: u64) -> Result<()> {
    match kind {
        ext::BACKING_FORMAT => {
            if data.len() as u64 > MAX_BACKING_FORMAT_LEN {
                return Err(Error::corrupt(format!(
                    "qcow2 backing format extension at {off:#x} is {} bytes long (max {})",
                    data.len(),
                    MAX_BACKING_FORMAT_LEN
                )));
            }
            exts.backing_format = Some(String::from_utf8_lossy(data).into_owned());
        }
        ext::FEATURE_TABLE => {
            for entry in data.chunks_exact(FEATURE_NAME_ENTRY_LEN) {
                if entry[0] == 0 {
                    let name = entry[2..].split(|&b| b == 0).next().unwrap_or_default();
                    exts.incompat_names
                        .push((entry[1], String::from_utf8_lossy(name).into()));
                }
            }
        }
        ext::DATA_FILE => exts.data_file = Some(String::from_utf8_lossy(data).into_owned()),
        ext::CRYPTO_HEADER => exts.crypto_header = true,
        // Bitmaps and unknown extensions do not change what the guest reads.
        _ => {}
    }
    Ok(())
}

/// Refuse what we cannot convert faithfully, each with its own message.
fn check_features(raw: &RawHeader, exts: &Extensions) -> Result<()> {
    let features = raw.incompatible_features;
    let unknown = features & !incompat::KNOWN;
    if unknown != 0 {
        return Err(Error::unsupported(format!(
            "qcow2 image uses unknown incompatible features: {}",
            describe_bits(unknown, &exts.incompat_names)
        )));
    }
    if features & incompat::CORRUPT != 0 {
        return Err(Error::corrupt(
            "qcow2 image is marked corrupt (incompatible bit 1); repair it with qemu-img check -r",
        ));
    }
    if features & incompat::DATA_FILE != 0 || exts.data_file.is_some() {
        let name = exts
            .data_file
            .as_deref()
            .map(|n| format!(" ({n:?})"))
            .unwrap_or_default();
        return Err(Error::unsupported(format!(
            "qcow2 image keeps its data in an external data file{name}; external data files \
             are refused"
        )));
    }
    match raw.crypt_method {
        0 if exts.crypto_header => Err(Error::corrupt(
            "qcow2 image has an encryption header extension but crypt_method 0",
        )),
        0 => Ok(()),
        1 => Err(Error::unsupported(
            "qcow2 image is encrypted (aes); encrypted images are refused",
        )),
        2 => Err(Error::unsupported(
            "qcow2 image is encrypted (luks); encrypted images are refused",
        )),
        n => Err(Error::unsupported(format!(
            "qcow2 image uses unknown encryption method {n}"
        ))),
    }
}

fn describe_bits(bits: u64, names: &[(u8, String)]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1 << bit) == 0 {
            continue;
        }
        match names.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => parts.push(format!("bit {bit} ({name})")),
            None => parts.push(format!("bit {bit}")),
        }
    }
    parts.join(", ")
}

fn compression(raw: &RawHeader) -> Result<Compression> {
    let flagged = raw.incompatible_features & incompat::COMPRESSION_TYPE != 0;
    match (flagged, raw.compression_type) {
        (false, 0) => Ok(Compression::Zlib),
        (false, t) => Err(Error::corrupt(format!(
            "qcow2 compression_type {t} is set without incompatible bit 3"
        ))),
        (true, 0) => Err(Error::corrupt(
            "qcow2 incompatible bit 3 (compression type) is set but compression_type is zlib",
        )),
        (true, 1) => Ok(Compression::Zstd),
        (true, t) => Err(Error::unsupported(format!(
            "qcow2 compression type {t} is not supported"
        ))),
    }
}

fn read_backing_name(buf: &[u8], raw: &RawHeader, cluster_size: u64) -> Result<Option<String>> {
    if raw.backing_file_offset == 0 {
        return Ok(None);
    }
    let len = u64::from(raw.backing_file_size);
    if len > MAX_BACKING_NAME_LEN {
        return Err(Error::corrupt(format!(
            "qcow2 backing file name is {len} bytes long (max {MAX_BACKING_NAME_LEN})"
        )));
    }
    let off = raw.backing_file_offset;
    if off.checked_add(len).is_none_or(|end| end > cluster_size) {
        return Err(Error::corrupt(format!(
            "qcow2 backing file name at {off:#x} (length {len}) overruns the first cluster"
        )));
    }
    let name = slice(buf, off, len)?;
    Ok(Some(String::from_utf8_lossy(name).into_owned()))
}

fn check_geometry(h: &Header, raw: &RawHeader) -> Result<()> {
    let cs = h.cluster_size();
    if raw.refcount_order > MAX_REFCOUNT_ORDER {
        return Err(Error::corrupt(format!(
            "qcow2 refcount_order {} is above {MAX_REFCOUNT_ORDER}",
            raw.refcount_order
        )));
    }
    if h.extended_l2 && h.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(Error::corrupt(format!(
            "qcow2 extended l2 entries need clusters of at least 16 KiB, got {cs} bytes"
        )));
    }
    if h.virtual_size > limits::MAX_VIRTUAL_SIZE {
        return Err(Error::limit(format!(
            "qcow2 virtual size {} exceeds the limit of {} bytes",
            h.virtual_size,
            limits::MAX_VIRTUAL_SIZE
        )));
    }
    check_l1(h)?;
    check_refcount_table(h)
}

fn check_l1(h: &Header) -> Result<()> {
    let cs = h.cluster_size();
    let bytes = h.l1_size * 8;
    if bytes > limits::QCOW2_MAX_L1_BYTES {
        return Err(Error::limit(format!(
            "qcow2 l1 table of {} entries exceeds the limit of {} bytes",
            h.l1_size,
            limits::QCOW2_MAX_L1_BYTES
        )));
    }
    let needed = h.l1_needed();
    if h.l1_size < needed {
        return Err(Error::corrupt(format!(
            "qcow2 l1 table has {} entries but the virtual size needs {needed}",
            h.l1_size
        )));
    }
    if !h.l1_offset.is_multiple_of(cs) {
        return Err(Error::corrupt(format!(
            "qcow2 l1 table offset {:#x} is not cluster aligned",
            h.l1_offset
        )));
    }
    if needed > 0 && h.l1_offset < cs {
        return Err(Error::corrupt("qcow2 l1 table overlaps the header cluster"));
    }
    if h.l1_offset.checked_add(bytes).is_none() {
        return Err(Error::corrupt(format!(
            "qcow2 l1 table offset {:#x} overflows",
            h.l1_offset
        )));
    }
    Ok(())
}

fn check_refcount_table(h: &Header) -> Result<()> {
    if h.refcount_table_bytes > limits::QCOW2_MAX_REFCOUNT_TABLE_BYTES {
        return Err(Error::limit(format!(
            "qcow2 refcount table of {} bytes exceeds the limit of {} bytes",
            h.refcount_table_bytes,
            limits::QCOW2_MAX_REFCOUNT_TABLE_BYTES
        )));
    }
    if !h.refcount_table_offset.is_multiple_of(h.cluster_size()) {
        return Err(Error::corrupt(format!(
            "qcow2 refcount table offset {:#x} is not cluster aligned",
            h.refcount_table_offset
        )));
    }
    if h.refcount_table_offset
        .checked_add(h.refcount_table_bytes)
        .is_none()
    {
        return Err(Error::corrupt(format!(
            "qcow2 refcount table offset {:#x} overflows",
            h.refcount_table_offset
        )));
    }
    Ok(())
}

fn short(needed: u64, got: usize) -> Error {
    Error::new(
        ErrorKind::Truncated,
        format!("qcow2 header needs {needed} bytes but only {got} are available"),
    )
}

fn slice(buf: &[u8], off: u64, len: u64) -> Result<&[u8]> {
    let end = off
        .checked_add(len)
        .ok_or_else(|| short(u64::MAX, buf.len()))?;
    let (Ok(start), Ok(stop)) = (usize::try_from(off), usize::try_from(end)) else {
        return Err(short(end, buf.len()));
    };
    buf.get(start..stop).ok_or_else(|| short(end, buf.len()))
}

fn byte(buf: &[u8], off: u64) -> Result<u8> {
    Ok(slice(buf, off, 1)?[0])
}

fn be32(buf: &[u8], off: u64) -> Result<u32> {
    let b = slice(buf, off, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(buf: &[u8], off: u64) -> Result<u64> {
    let b = slice(buf, off, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_be_bytes(a))
}
