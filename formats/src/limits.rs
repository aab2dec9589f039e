//! Every bound applied to untrusted header values, in one place, each with the reason.
//!
//! Images are hostile input: a 512-byte header can claim an exabyte disk or a table that would
//! need gigabytes of memory. Format parsers check each size or count they read against one of
//! these before allocating or looping on it.

/// Largest virtual disk we accept: 64 TiB. Far above any VM disk CDI imports in practice
/// (upstream's largest reported imports are a few TiB), and small enough that offsets plus
/// lengths never overflow `u64` arithmetic in the table code.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Bytes peeked from the start of a stream for detection. ISO 9660's `CD001` sits at 0x8001,
/// the furthest signature we look for; 64 KiB covers it with room and is one read from
/// every decoder.
pub const DETECT_HEAD_LEN: usize = 64 << 10;

/// Compression layers unwrapped before giving up (`.tar.gz` inside `.xz` is already absurd).
/// A cap keeps a crafted "gzip of gzip of gzip…" from recursing without bound.
pub const MAX_COMPRESSION_LAYERS: usize = 4;

/// Memory the streaming converters may hold for data that arrived before the table mapping
/// it (and for tables waiting on their data). Beyond this they spill to the scratch
/// directory, or fail with `ScratchSpaceRequired` when there is none. 32 MiB keeps the whole
/// process under the 64 MiB RSS target with decoder windows and I/O buffers on top.
pub const STREAM_MEMORY_BUDGET: usize = 32 << 20;

/// Size of the I/O buffers the converters read and write with. 1 MiB amortises syscalls
/// (measured: larger buffers gain nothing on loopback or page cache) and stays small in RSS.
pub const IO_CHUNK: usize = 1 << 20;

/// Granularity of zero detection in raw data. 4 KiB matches the page and file-system block
/// size, so a skipped zero block is a real hole, and it is what `qemu-img convert` uses by
/// default (`-S 4k`), which keeps our allocation within a hair of the oracle's.
pub const ZERO_DETECT_BLOCK: usize = 4 << 10;

/// Largest qcow2 L1 table we accept, in bytes: QEMU's own `QCOW_MAX_L1_SIZE` (32 MiB). An image
/// that needs more cannot have been written by QEMU.
pub const QCOW2_MAX_L1_BYTES: u64 = 32 << 20;

/// Largest qcow2 refcount table, in bytes: QEMU's `QCOW_MAX_REFTABLE_SIZE` (8 MiB).
pub const QCOW2_MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// Largest qcow2 header (including extensions) we parse: one maximum-size cluster. QEMU
/// requires the header and its extensions to fit in the first cluster.
pub const QCOW2_MAX_HEADER_BYTES: u64 = 2 << 20;

/// Backing-file chains followed when the caller allows backing files at all. QEMU has no hard
/// limit; 16 is deeper than any real golden-image chain and stops a loop of images that name
/// each other.
pub const MAX_BACKING_CHAIN_DEPTH: usize = 16;

/// Longest text descriptor (VMDK) we read. Real descriptors are well under 4 KiB; QEMU refuses
/// more than 1 MiB.
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Largest VMDK grain we accept: 2 MiB. VMware and qemu-img always write 64 KiB grains; a
/// compressed grain is inflated into a buffer of this size, so a bound keeps one grain from
/// costing more than a few MiB of memory (qemu allows up to 1 GiB, which no tool produces).
pub const VMDK_MAX_GRAIN_BYTES: u64 = 2 << 20;

/// Largest VMDK grain directory we load, in bytes: 8 MiB. With the standard 64 KiB grains and
/// 512-entry grain tables one directory entry covers 32 MiB, so 8 MiB of directory covers
/// `MAX_VIRTUAL_SIZE`; the directory is kept in memory for the life of the image.
pub const VMDK_MAX_GD_BYTES: u64 = 8 << 20;

/// Most extents a VMDK descriptor may name. A twoGbMaxExtent disk needs one per 2 GiB, so
/// 4096 covers an 8 TiB split disk; each extent holds an open file, and the bound keeps a
/// crafted descriptor from exhausting file descriptors.
pub const VMDK_MAX_EXTENTS: usize = 4096;

/// Pending work a qcow2 stream converter tracks: mappings ahead of the stream position (runs of
/// data clusters, compressed clusters) and clusters held back waiting for a table. Each costs
/// about 64 bytes of bookkeeping, so this bounds it to ~32 MiB. A QEMU-written image keeps at
/// most one L2 table's entries pending (8192 with the default 64 KiB clusters, 262144 with
/// 2 MiB clusters), because QEMU allocates each L2 table before the data it maps; twice the
/// largest table leaves room for the few clusters held back around it.
pub const QCOW2_STREAM_MAX_PENDING: usize = 1 << 19;

/// Allocated L2 tables a qcow2 stream converter remembers from the L1 table (16 bytes each, so
/// 16 MiB). That covers 512 TiB of guest with the default 64 KiB clusters and 32 GiB with
/// 512-byte clusters; beyond it, convert from a seekable file.
pub const QCOW2_STREAM_MAX_L2_TABLES: usize = 1 << 20;

/// Largest VHDX log entry we read to verify its checksum: 32 MiB. Hyper-V and qemu write
/// entries of a few sectors (qemu's whole default log is 1 MiB); a larger entry is assumed to
/// be live, so the image is refused as dirty rather than read into memory.
pub const VHDX_MAX_LOG_ENTRY_BYTES: u64 = 32 << 20;

/// Buffers of [`IO_CHUNK`] bytes between a conversion and its writer thread
/// (the `pipeline` module). Two keep both cores busy (one being filled, one being written); four
/// absorb the uneven pace of a converter (a table read, a compressed cluster) at 4 MiB of
/// memory, well inside the 64 MiB RSS target.
pub const PIPELINE_BUFFERS: usize = 4;

/// Operations one pipeline batch may carry. A run of tiny writes or zero ranges (a sparse image
/// seen through 4 KiB zero detection) goes out in batches of this many, which bounds the
/// bookkeeping (about 32 bytes each, so 128 KiB per batch) while keeping channel traffic low.
pub const PIPELINE_BATCH_ITEMS: usize = 4096;
