//! The VMDK text descriptor: `createType`, the parent link and the extent lines.
//!
//! ```text
//! # Disk DescriptorFile
//! createType="monolithicFlat"
//! parentCID=ffffffff
//! RW 2097152 FLAT "disk-flat.vmdk" 0
//! ```
//! Only what conversion needs is parsed; everything else (the disk database) is ignored.

use crate::error::{Error, Result};
use crate::limits;

/// The first line every descriptor written by VMware or qemu-img starts with.
const DESCRIPTOR_MAGIC: &[u8] = b"# Disk DescriptorFile";

/// `parentCID` of a disk without a parent.
const NO_PARENT_CID: &str = "ffffffff";

/// True when `head` starts like a text descriptor.
pub(crate) fn looks_like_descriptor(head: &[u8]) -> bool {
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    head[start..].starts_with(DESCRIPTOR_MAGIC)
}

/// How an extent's data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExtentKindText {
    /// Raw sectors in a file, from an offset (`FLAT`, `VMFS`).
    Flat,
    /// A hosted sparse extent file (`SPARSE`).
    Sparse,
    /// Reads as zeroes, no file (`ZERO`).
    Zero,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    pub sectors: u64,
    pub kind: ExtentKindText,
    pub file: Option<String>,
    pub offset_sectors: u64,
}

/// The parsed parts of a descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub create_type: Option<String>,
    /// The parent named by `parentFileNameHint` (or the parent CID when no hint is given).
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

impl Descriptor {
    /// Parse descriptor text (NUL padding after the text is ignored).
    pub(crate) fn parse(bytes: &[u8]) -> Result<Descriptor> {
        if bytes.len() as u64 > limits::MAX_DESCRIPTOR_BYTES {
            return Err(Error::limit(format!(
                "vmdk descriptor is {} bytes, more than the {} byte limit",
                bytes.len(),
                limits::MAX_DESCRIPTOR_BYTES
            )));
        }
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let text = String::from_utf8_lossy(&bytes[..end]);
        let mut desc = Descriptor::default();
        let mut parent_cid = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((key, value)) = line.split_once('=') {
                let key = key.trim();
                let value = value.trim().trim_matches('"');
                match key {
                    "createType" => desc.create_type = Some(value.to_string()),
                    "parentFileNameHint" => desc.parent_hint = Some(value.to_string()),
                    "parentCID" => parent_cid = Some(value.to_ascii_lowercase()),
                    _ => {}
                }
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                desc.extents.push(parse_extent(line)?);
            }
        }
        if desc.parent_hint.is_none()
            && let Some(cid) = parent_cid.filter(|c| c != NO_PARENT_CID)
        {
            desc.parent_hint = Some(format!("parent CID {cid}"));
        }
        if let Some(ct) = &desc.create_type {
            let lower = ct.to_ascii_lowercase();
            if lower == "sesparse" || lower == "vmfssparse" {
                return Err(Error::unsupported(format!(
                    "vmdk createType {ct:?} is not supported"
                )));
            }
        }
        Ok(desc)
    }

    /// Sum of all extent sizes, in sectors.
    pub(crate) fn total_sectors(&self) -> Result<u64> {
        self.extents.iter().try_fold(0u64, |acc, e| {
            acc.checked_add(e.sectors)
                .ok_or_else(|| Error::limit("vmdk descriptor extent sizes overflow"))
        })
    }
}

/// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; the file name may contain spaces inside its quotes.
fn parse_extent(line: &str) -> Result<ExtentLine> {
    let bad = || {
        Error::corrupt(format!(
            "vmdk descriptor has a malformed extent line {line:?}"
        ))
    };
    let mut words = line.splitn(3, char::is_whitespace);
    let _access = words.next().ok_or_else(bad)?;
    let rest = words.next().ok_or_else(bad)?;
    let sectors: u64 = rest.trim().parse().map_err(|_| bad())?;
    let rest = words.next().ok_or_else(bad)?.trim_start();
    let (kind_word, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let kind = match kind_word {
        "FLAT" | "VMFS" => ExtentKindText::Flat,
        "SPARSE" => ExtentKindText::Sparse,
        "ZERO" => ExtentKindText::Zero,
        other => {
            return Err(Error::unsupported(format!(
                "vmdk extent type {other:?} is not supported"
            )));
        }
    };
    let rest = rest.trim();
    let (file, after) = if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted.find('"').ok_or_else(bad)?;
        (
            Some(quoted[..close].to_string()),
            quoted[close + 1..].trim(),
        )
    } else {
        (None, rest)
    };
    let offset_sectors = if after.is_empty() {
        0
    } else {
        after.parse().map_err(|_| bad())?
    };
    if kind != ExtentKindText::Zero && file.is_none() {
        return Err(bad());
    }
    Ok(ExtentLine {
        sectors,
        kind,
        file,
        offset_sectors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_descriptor_lists_extents_with_offsets() {
        let text = b"# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"my disk-flat.vmdk\" 4\nRW 10 ZERO\n";

        let desc = Descriptor::parse(text).unwrap();

        assert_eq!(desc.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(desc.parent_hint, None);
        assert_eq!(
            desc.extents,
            vec![
                ExtentLine {
                    sectors: 2048,
                    kind: ExtentKindText::Flat,
                    file: Some("my disk-flat.vmdk".into()),
                    offset_sectors: 4
                },
                ExtentLine {
                    sectors: 10,
                    kind: ExtentKindText::Zero,
                    file: None,
                    offset_sectors: 0
                },
            ]
        );
    }

    #[test]
    fn parent_cid_is_reported_as_parent() {
        let text = b"# Disk DescriptorFile\nparentCID=1234abcd\nparentFileNameHint=\"base.vmdk\"\n";

        let desc = Descriptor::parse(text).unwrap();

        assert_eq!(desc.parent_hint.as_deref(), Some("base.vmdk"));
    }

    #[test]
    fn sesparse_create_type_is_unsupported() {
        let text = b"# Disk DescriptorFile\ncreateType=\"seSparse\"\n";

        let err = Descriptor::parse(text).unwrap_err();

        assert_eq!(err.kind(), crate::error::ErrorKind::Unsupported);
    }
}
