//! VMDK images built in code for the tests: monolithicSparse (tables first or last),
//! streamOptimized with markers and a footer, a sparse header naming a parent. The helpers
//! shared with the other formats' tests live in `crate::testutil`.

use std::io::Write;

use flate2::Compression;
use flate2::write::ZlibEncoder;

/// Grain size of the built images: 8 sectors (4 KiB), so tiny images have several grains.
const GRAIN_SECTORS: u64 = 8;

/// A sparse header: flags, capacity and the table/metadata offsets (all in sectors).
pub(super) fn header(flags: u32, capacity: u64, gd_offset: u64, overhead: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"KDMV"); // magic
    h[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
    h[8..12].copy_from_slice(&flags.to_le_bytes()); // flags
    h[12..20].copy_from_slice(&capacity.to_le_bytes()); // capacity
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes()); // grainSize
    h[44..48].copy_from_slice(&512u32.to_le_bytes()); // numGTEsPerGT
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes()); // gdOffset
    h[64..72].copy_from_slice(&overhead.to_le_bytes()); // overHead
    h[73..77].copy_from_slice(b"\n \r\n"); // newline check characters
    h[77..79].copy_from_slice(&1u16.to_le_bytes()); // compressAlgorithm (deflate)
    h
}

/// monolithicSparse: header, GD at sector 1, one GT at sectors 2..6, grains from sector 6.
/// `grains` lists (guest grain index, fill byte); capacity is 64 grains (256 KiB).
pub(super) fn build_sparse(grains: &[(u32, u8)]) -> Vec<u8> {
    let mut img = header(1, 64 * GRAIN_SECTORS, 1, 6);
    img.resize(6 * 512, 0);
    img[512..516].copy_from_slice(&2u32.to_le_bytes()); // GD[0] -> GT at sector 2
    for (n, &(index, fill)) in grains.iter().enumerate() {
        let sector = 6 + n as u32 * GRAIN_SECTORS as u32;
        let gte = 1024 + index as usize * 4;
        img[gte..gte + 4].copy_from_slice(&sector.to_le_bytes());
        img.extend(std::iter::repeat_n(fill, 4096));
    }
    img
}

/// monolithicSparse with the tables after the grains: header, grains from sector 1, then the
/// GD and one GT. Valid for random access, not streamable without scratch space.
pub(super) fn build_sparse_tables_last(grains: &[(u32, u8)]) -> Vec<u8> {
    let gd_sector = 1 + grains.len() as u64 * GRAIN_SECTORS;
    let mut img = header(1, 64 * GRAIN_SECTORS, gd_sector, 1);
    for &(_, fill) in grains {
        img.extend(std::iter::repeat_n(fill, 4096));
    }
    let mut gd = (gd_sector as u32 + 1).to_le_bytes().to_vec();
    pad(&mut gd);
    img.extend(gd);
    let mut gt = vec![0u8; 2048];
    for (n, &(index, _)) in grains.iter().enumerate() {
        let sector = 1 + n as u32 * GRAIN_SECTORS as u32;
        gt[index as usize * 4..index as usize * 4 + 4].copy_from_slice(&sector.to_le_bytes());
    }
    img.extend(gt);
    img
}

/// A sparse header whose embedded descriptor names a parent disk.
pub(super) fn sparse_with_parent() -> Vec<u8> {
    let mut img = header(1, 64 * GRAIN_SECTORS, 3, 8);
    img[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptorOffset
    img[36..44].copy_from_slice(&1u64.to_le_bytes()); // descriptorSize
    let mut desc =
        b"# Disk DescriptorFile\nparentCID=12345678\nparentFileNameHint=\"base.vmdk\"\n".to_vec();
    desc.resize(512, 0);
    img.extend(desc);
    img.resize(8 * 512, 0);
    img
}

pub(super) fn zlib(data: &[u8]) -> Vec<u8> {
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Pad to a whole sector.
fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(512) * 512, 0);
}

fn metadata_marker(sectors: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// VMware's streamOptimized layout: header with the grain directory "at end", grains with
/// markers, then GT marker + GT, GD marker + GD, footer marker + footer, end-of-stream.
/// `grains` lists (guest grain index, zlib payload); capacity is 64 grains.
pub(super) fn build_stream_optimized(grains: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let flags = 1 | (1 << 16) | (1 << 17);
    let capacity = 64 * GRAIN_SECTORS;
    let mut img = header(flags, capacity, u64::MAX, 1);
    let mut gt = vec![0u8; 2048];
    for (index, payload) in grains {
        let sector = (img.len() / 512) as u32;
        gt[*index as usize * 4..*index as usize * 4 + 4].copy_from_slice(&sector.to_le_bytes());
        img.extend_from_slice(&(index * GRAIN_SECTORS).to_le_bytes()); // lba
        img.extend_from_slice(&(payload.len() as u32).to_le_bytes()); // size
        img.extend_from_slice(payload);
        pad(&mut img);
    }
    img.extend(metadata_marker(4, 1));
    let gt_sector = (img.len() / 512) as u32;
    img.extend_from_slice(&gt);
    img.extend(metadata_marker(1, 2));
    let gd_sector = (img.len() / 512) as u64;
    let mut gd = gt_sector.to_le_bytes().to_vec();
    pad(&mut gd);
    img.extend(gd);
    img.extend(metadata_marker(1, 3));
    img.extend(header(flags, capacity, gd_sector, 1));
    img.extend(metadata_marker(0, 0));
    img
}

/// The guest disk of a built image: 64 grains of 4 KiB, `grains` (index, fill byte) filled.
pub(super) fn expected_disk(grains: &[(u64, u8)]) -> Vec<u8> {
    let mut disk = vec![0u8; 64 * 4096];
    for &(index, fill) in grains {
        disk[index as usize * 4096..(index as usize + 1) * 4096].fill(fill);
    }
    disk
}
