//! Object names and namespaces, checked as Kubernetes checks them.
//!
//! Names and namespaces arrive in URLs and request bodies and end up in file paths (worker
//! logs, run directories), environment variables and child-process arguments. Everything that
//! accepts one from outside checks it here first, so `../x`, `a..b` or a 253-character
//! DataVolume name never reaches the filesystem.

/// DNS-1123 label length limit (namespaces, Services, and the names upstream derives pod names
/// from).
pub const MAX_LABEL_LEN: usize = 63;
/// DNS-1123 subdomain length limit (names of most kinds).
pub const MAX_SUBDOMAIN_LEN: usize = 253;
/// Upstream's DataVolume name limit: a DataVolume names its claim and the claim's pods
/// (`importer-<name>`, `cdi-upload-<name>`), so it must stay a short label-sized name.
pub const MAX_DATAVOLUME_NAME_LEN: usize = 63;

/// Lowercase alphanumerics and `-`, alphanumeric at both ends, not empty (no length limit).
fn is_label_shaped(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.iter().all(|&b| alnum(b) || b == b'-')
        && bytes.first().copied().is_some_and(alnum)
        && bytes.last().copied().is_some_and(alnum)
}

/// Whether `s` is a DNS-1123 label: lowercase alphanumerics and `-`, alphanumeric at both
/// ends, 1 to 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= MAX_LABEL_LEN && is_label_shaped(s)
}

/// Whether `s` is a DNS-1123 subdomain as Kubernetes checks object names: dot-separated parts
/// shaped like labels, at most 253 characters in all (so no empty part: `a..b` and `.a` are
/// refused). As in Kubernetes, a single part may exceed 63 characters: controllers derive
/// names such as `importer-<63-character claim>` that the API server must accept.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SUBDOMAIN_LEN && s.split('.').all(is_label_shaped)
}

/// Why a namespace is refused, or `None` if it is valid.
pub fn namespace_problem(ns: &str) -> Option<String> {
    (!is_dns1123_label(ns)).then(|| {
        format!(
            "invalid namespace {:?}: must be a lowercase DNS-1123 label of at most {MAX_LABEL_LEN} characters",
            shorten(ns)
        )
    })
}

/// Why an object name is refused, or `None` if it is valid; `max_len` is the kind's limit
/// ([`MAX_SUBDOMAIN_LEN`] for most kinds, [`MAX_DATAVOLUME_NAME_LEN`] for DataVolumes).
pub fn name_problem(name: &str, max_len: usize) -> Option<String> {
    if name.is_empty() {
        return Some("metadata.name is required".to_string());
    }
    if name.len() > max_len {
        return Some(format!(
            "name {:?} is {} characters long: at most {max_len} are allowed",
            shorten(name),
            name.len()
        ));
    }
    (!is_dns1123_subdomain(name)).then(|| {
        format!(
            "invalid name {:?}: must be a lowercase DNS-1123 subdomain (alphanumerics, '-' and '.', alphanumeric at both ends of each dot-separated part)",
            shorten(name)
        )
    })
}

/// At most the first 80 characters of a refused value, so an error line stays one line.
fn shorten(s: &str) -> String {
    const SHOWN: usize = 80;
    let mut out: String = s.chars().take(SHOWN).filter(|c| !c.is_control()).collect();
    if s.chars().count() > SHOWN {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "default", "kube-system", "a1", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "..",
            "../../x",
            &"a".repeat(64),
        ] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
    }

    #[test]
    fn subdomains() {
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61));
        assert_eq!(longest.len(), MAX_SUBDOMAIN_LEN);
        let importer = format!("importer-{}", "d".repeat(63));
        for ok in [
            "fedora-dv.1",
            "a.b.c",
            &longest,
            &importer,
            &"a".repeat(253),
        ] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "a..b",
            ".a",
            "a.",
            "../../../../x/evil",
            "a/b",
            "Bad_Name",
            &"a".repeat(254),
            &format!("{longest}a"),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn problems_are_one_line_and_short() {
        let m = namespace_problem("../../../../x/evil").unwrap();
        assert!(m.contains("DNS-1123 label"), "{m}");
        assert!(namespace_problem("default").is_none());
        let long = format!("{}.{}", "a".repeat(32), "a".repeat(31));
        assert!(
            name_problem(&long, MAX_DATAVOLUME_NAME_LEN)
                .unwrap()
                .contains("at most 63")
        );
        assert!(name_problem(&long, MAX_SUBDOMAIN_LEN).is_none());
        let huge = format!("{}\n", "x".repeat(10_000));
        let m = name_problem(&huge, MAX_SUBDOMAIN_LEN).unwrap();
        assert!(!m.contains('\n') && m.len() < 200, "{m}");
        assert!(name_problem("", 63).unwrap().contains("required"));
    }
}
