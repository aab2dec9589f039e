//! L1 and L2 table entries: decoded into what backs each guest cluster, with every reserved
//! bit and alignment rule checked (QEMU `docs/interop/qcow2.txt`, "Cluster mapping" and
//! "Extended L2 Entries").

use super::header::Header;
use crate::error::{Error, Result};

/// L1 entry bits 0-8 and 56-62 are reserved.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits 9-55 of L1 and standard L2 entries hold a cluster-aligned host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 descriptor bits 1-8 and 56-61 are reserved.
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// L2 entry bit 62: compressed cluster.
const L2_COMPRESSED: u64 = 1 << 62;
/// Standard L2 descriptor bit 0: reads as zeroes (v3 without extended L2 only).
const L2_ZERO: u64 = 1;
/// Compressed sizes are counted in 512-byte sectors.
const SECTOR: u64 = 512;
/// Host offsets must stay below 2^56 (64 PB), compressed ones included.
const MAX_HOST_OFFSET_BITS: u32 = 56;

/// What backs one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// A standard cluster split into [`Header::subclusters`] units. Bit `i` of `alloc` set: unit
    /// `i` is data at `host + i * subcluster_size`; else bit `i` of `zero` set: it reads as
    /// zeroes; else it is unallocated (backing file, or zeroes).
    Standard {
        /// Host cluster offset (0 when nothing is allocated).
        host: u64,
        /// Allocated units.
        alloc: u32,
        /// Units that read as zeroes.
        zero: u32,
    },
    /// A compressed cluster stored at `[host, host + len)` (the range ends on a sector boundary
    /// and may run past the end of the file; decompression stops after one cluster).
    Compressed {
        /// Byte offset of the compressed data (not aligned).
        host: u64,
        /// Bytes from `host` to the end of its last sector.
        len: u64,
    },
}

/// Refcount table entries: bits 9-63 hold the refcount block offset, bits 0-8 are reserved.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// The refcount block a refcount table entry names, if it names a plausible one. Refcounts do
/// not change what the guest reads, so malformed entries are skipped rather than refused; the
/// readers only use the blocks to check that the image is complete and to avoid holding them.
pub(crate) fn refblock(h: &Header, word: u64) -> Option<u64> {
    let block = word & REFTABLE_OFFSET_MASK;
    let plausible = block != 0 && block.is_multiple_of(h.cluster_size()) && block >> 56 == 0;
    plausible.then_some(block)
}

/// Decode an L1 entry into the L2 table's host offset (`None` when unallocated).
pub(crate) fn l1_entry(h: &Header, word: u64, index: u64) -> Result<Option<u64>> {
    if word & L1_RESERVED != 0 {
        return Err(Error::corrupt(format!(
            "qcow2 l1 entry {index} ({word:#018x}) has reserved bits set"
        )));
    }
    let host = word & OFFSET_MASK;
    if host == 0 {
        return Ok(None);
    }
    if !host.is_multiple_of(h.cluster_size()) {
        return Err(Error::corrupt(format!(
            "qcow2 l2 table offset {host:#x} in l1 entry {index} is not cluster aligned"
        )));
    }
    Ok(Some(host))
}

/// Decode an L2 entry (`bitmap` is the second word of an extended entry, else 0) for the guest
/// cluster at `guest`.
pub(crate) fn l2_entry(h: &Header, word: u64, bitmap: u64, guest: u64) -> Result<Cluster> {
    if word & L2_COMPRESSED != 0 {
        return compressed(h, word, bitmap, guest);
    }
    if word & L2_STD_RESERVED != 0 {
        return Err(reserved(word, guest));
    }
    let host = word & OFFSET_MASK;
    if !host.is_multiple_of(h.cluster_size()) {
        return Err(Error::corrupt(format!(
            "qcow2 data cluster offset {host:#x} for guest offset {guest:#x} is not cluster aligned"
        )));
    }
    if h.extended_l2 {
        return subclustered(host, bitmap, guest);
    }
    if word & L2_ZERO != 0 {
        if h.version < 3 {
            return Err(Error::corrupt(format!(
                "qcow2 zero cluster entry for guest offset {guest:#x} in a v2 image"
            )));
        }
        return Ok(Cluster::Standard {
            host,
            alloc: 0,
            zero: 1,
        });
    }
    // Offset 0 is unallocated whatever bit 63 says: without an external data file no guest
    // cluster can live at host offset 0 (the header is there).
    let alloc = u32::from(host != 0);
    Ok(Cluster::Standard {
        host,
        alloc,
        zero: 0,
    })
}

fn subclustered(host: u64, bitmap: u64, guest: u64) -> Result<Cluster> {
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return Err(Error::corrupt(format!(
            "qcow2 extended l2 entry for guest offset {guest:#x} marks subclusters both \
             allocated and zero ({bitmap:#018x})"
        )));
    }
    if host == 0 && alloc != 0 {
        return Err(Error::corrupt(format!(
            "qcow2 extended l2 entry for guest offset {guest:#x} allocates subclusters without \
             a host cluster"
        )));
    }
    Ok(Cluster::Standard { host, alloc, zero })
}

fn compressed(h: &Header, word: u64, bitmap: u64, guest: u64) -> Result<Cluster> {
    if bitmap != 0 {
        return Err(Error::corrupt(format!(
            "qcow2 compressed cluster for guest offset {guest:#x} has a non-zero subcluster \
             bitmap (reserved bits set)"
        )));
    }
    // Offset field: bits 0..x, sector count: bits x..62, where x = 62 - (cluster_bits - 8).
    let size_bits = h.cluster_bits - 8;
    let shift = 62 - size_bits;
    let host = word & ((1u64 << shift) - 1);
    if host >> MAX_HOST_OFFSET_BITS != 0 {
        return Err(Error::corrupt(format!(
            "qcow2 compressed cluster offset {host:#x} for guest offset {guest:#x} is out of range"
        )));
    }
    let sectors = ((word >> shift) & ((1u64 << size_bits) - 1)) + 1;
    let len = sectors * SECTOR - host % SECTOR;
    Ok(Cluster::Compressed { host, len })
}

fn reserved(word: u64, guest: u64) -> Error {
    Error::corrupt(format!(
        "qcow2 l2 entry for guest offset {guest:#x} ({word:#018x}) has reserved bits set"
    ))
}

/// The big-endian word at entry `index` of a table held in `table` (caller checked bounds).
pub(crate) fn word(table: &[u8], index: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&table[index * 8..index * 8 + 8]);
    u64::from_be_bytes(b)
}

/// Decode entry `index` of an L2 table (raw cluster bytes) for the guest cluster at `guest`.
pub(crate) fn l2_at(h: &Header, table: &[u8], index: u64, guest: u64) -> Result<Cluster> {
    let i = usize::try_from(index).map_err(|_| Error::corrupt("qcow2 l2 index overflows"))?;
    let needed = (i + 1) * h.l2_entry_bytes() as usize;
    if table.len() < needed {
        return Err(Error::corrupt("qcow2 l2 table is shorter than a cluster"));
    }
    if h.extended_l2 {
        l2_entry(h, word(table, 2 * i), word(table, 2 * i + 1), guest)
    } else {
        l2_entry(h, word(table, i), 0, guest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::header::Compression;

    fn header(cluster_bits: u32, extended_l2: bool) -> Header {
        Header {
            version: 3,
            cluster_bits,
            virtual_size: 1 << 30,
            l1_offset: 3 << cluster_bits,
            l1_size: 1,
            refcount_table_offset: 1 << cluster_bits,
            refcount_table_bytes: 1 << cluster_bits,
            extended_l2,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
        }
    }

    #[test]
    fn compressed_descriptor_with_64k_clusters_decodes_offset_and_length() {
        // x = 62 - 8 = 54: offset in bits 0..54, extra sectors in bits 54..62.
        let word = 1 << 62 | 3 << 54 | 0x12_3456;
        let got = l2_entry(&header(16, false), word, 0, 0).unwrap();
        assert_eq!(
            got,
            Cluster::Compressed {
                host: 0x12_3456,
                len: 4 * 512 - 0x56
            }
        );
    }

    #[test]
    fn compressed_descriptor_with_2m_clusters_decodes_offset_and_length() {
        // x = 62 - 13 = 49.
        let word = 1 << 62 | 0x1fff << 49 | 0x200;
        let got = l2_entry(&header(21, false), word, 0, 0).unwrap();
        assert_eq!(
            got,
            Cluster::Compressed {
                host: 0x200,
                len: 0x2000 * 512
            }
        );
    }

    #[test]
    fn compressed_offset_beyond_56_bits_is_corrupt() {
        // 512-byte clusters: x = 61, so bits 56..61 belong to the offset and must be zero.
        let word = 1 << 62 | 1 << 57;
        let err = l2_entry(&header(9, false), word, 0, 0).unwrap_err();
        assert!(err.message().contains("out of range"), "{err}");
    }

    #[test]
    fn unaligned_data_cluster_is_corrupt() {
        let err = l2_entry(&header(16, false), 0x1_0200, 0, 0).unwrap_err();
        assert!(err.message().contains("not cluster aligned"), "{err}");
    }

    #[test]
    fn extended_entry_with_subcluster_both_allocated_and_zero_is_corrupt() {
        let err = l2_entry(&header(16, true), 0x1_0000, 1 | 1 << 32, 0).unwrap_err();
        assert!(err.message().contains("both allocated and zero"), "{err}");
    }

    #[test]
    fn extended_entry_allocating_without_host_is_corrupt() {
        let err = l2_entry(&header(16, true), 0, 1, 0).unwrap_err();
        assert!(err.message().contains("without a host cluster"), "{err}");
    }

    #[test]
    fn unallocated_and_zero_entries_decode() {
        let h = header(16, false);
        assert_eq!(
            l2_entry(&h, 0, 0, 0).unwrap(),
            Cluster::Standard {
                host: 0,
                alloc: 0,
                zero: 0
            }
        );
        assert_eq!(
            l2_entry(&h, 1, 0, 0).unwrap(),
            Cluster::Standard {
                host: 0,
                alloc: 0,
                zero: 1
            }
        );
        let data = l2_entry(&h, 1 << 63 | 0x3_0000, 0, 0).unwrap();
        assert_eq!(
            data,
            Cluster::Standard {
                host: 0x3_0000,
                alloc: 1,
                zero: 0
            }
        );
    }
}
