//! Protobuf request bodies (`Content-Type: application/vnd.kubernetes.protobuf`).
//!
//! kubectl's typed clients (`kubectl create configmap|secret|namespace …`) send built-in objects
//! in Kubernetes' protobuf envelope and accept JSON back, with no fallback when the server
//! refuses protobuf. This module decodes that envelope for the kinds such commands create here —
//! ConfigMap, Secret and Namespace — into the JSON the rest of the API works on; any other kind
//! is refused with `415`, naming JSON as the way. Responses are always JSON.
//!
//! The envelope is `k8s\0` followed by a `runtime.Unknown` message (`typeMeta` = 1 with
//! `apiVersion` = 1 and `kind` = 2, `raw` = 2 holding the object's own message). Field numbers
//! are those of `k8s.io/api/core/v1/generated.proto` and
//! `k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto`. Server-owned metadata (uid,
//! timestamps, generation) is not decoded: the store assigns it.

use base64::Engine;
use serde_json::{Map, Value, json};

/// The protobuf media type.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

/// Why a protobuf body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Not the `k8s\0` envelope.
    #[error("the protobuf body does not start with the Kubernetes envelope")]
    BadMagic,
    /// Cut short or malformed.
    #[error("malformed protobuf body: {0}")]
    Malformed(&'static str),
    /// A kind this server does not decode from protobuf.
    #[error(
        "protobuf bodies are accepted for v1 ConfigMap, Secret and Namespace only, not {0}; send application/json"
    )]
    Unsupported(String),
}

/// One field's value on the wire.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one message, in order.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ProtoError> {
    fn varint(buf: &mut &[u8]) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf
                .split_first()
                .ok_or(ProtoError::Malformed("truncated varint"))?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Malformed("varint too long"))
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(&mut buf)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if buf.len() < n {
                    return Err(ProtoError::Malformed("truncated fixed-width field"));
                }
                buf = &buf[n..];
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?)
                    .map_err(|_| ProtoError::Malformed("length too large"))?;
                if buf.len() < len {
                    return Err(ProtoError::Malformed("truncated length-delimited field"));
                }
                let (v, rest) = buf.split_at(len);
                buf = rest;
                Wire::Bytes(v)
            }
            _ => return Err(ProtoError::Malformed("unknown wire type")),
        };
        out.push((key >> 3, wire));
    }
    Ok(out)
}

fn bytes<'a>(w: &Wire<'a>) -> Result<&'a [u8], ProtoError> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(ProtoError::Malformed("expected a length-delimited field")),
    }
}

fn string(w: &Wire<'_>) -> Result<String, ProtoError> {
    String::from_utf8(bytes(w)?.to_vec()).map_err(|_| ProtoError::Malformed("string is not UTF-8"))
}

fn boolean(w: &Wire<'_>) -> Result<bool, ProtoError> {
    match w {
        Wire::Varint(v) => Ok(*v != 0),
        _ => Err(ProtoError::Malformed("expected a varint")),
    }
}

/// A `map<string, string>` (or `map<string, bytes>`, base64-encoded as JSON has it) entry.
fn map_entry(w: &Wire<'_>, value_bytes: bool) -> Result<(String, Value), ProtoError> {
    let mut key = String::new();
    let mut value = json!("");
    for (n, f) in fields(bytes(w)?)? {
        match n {
            1 => key = string(&f)?,
            2 if value_bytes => {
                value = json!(base64::engine::general_purpose::STANDARD.encode(bytes(&f)?))
            }
            2 => value = json!(string(&f)?),
            _ => {}
        }
    }
    Ok((key, value))
}

fn insert_entry(obj: &mut Value, field: &str, entry: (String, Value)) {
    if !obj[field].is_object() {
        obj[field] = Value::Object(Map::new());
    }
    obj[field][entry.0] = entry.1;
}

fn set_string(obj: &mut Value, field: &str, s: String) {
    // Go's encoder writes empty strings; they mean "unset".
    if !s.is_empty() {
        obj[field] = json!(s);
    }
}

fn owner_reference(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut r = json!({});
    for (n, f) in fields(buf)? {
        match n {
            1 => set_string(&mut r, "kind", string(&f)?),
            3 => set_string(&mut r, "name", string(&f)?),
            4 => set_string(&mut r, "uid", string(&f)?),
            5 => set_string(&mut r, "apiVersion", string(&f)?),
            6 => r["controller"] = json!(boolean(&f)?),
            7 => r["blockOwnerDeletion"] = json!(boolean(&f)?),
            _ => {}
        }
    }
    Ok(r)
}

fn object_meta(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut m = json!({});
    for (n, f) in fields(buf)? {
        match n {
            1 => set_string(&mut m, "name", string(&f)?),
            2 => set_string(&mut m, "generateName", string(&f)?),
            3 => set_string(&mut m, "namespace", string(&f)?),
            6 => set_string(&mut m, "resourceVersion", string(&f)?),
            11 => insert_entry(&mut m, "labels", map_entry(&f, false)?),
            12 => insert_entry(&mut m, "annotations", map_entry(&f, false)?),
            13 => {
                let r = owner_reference(bytes(&f)?)?;
                match m["ownerReferences"].as_array_mut() {
                    Some(a) => a.push(r),
                    None => m["ownerReferences"] = json!([r]),
                }
            }
            14 => {
                let s = json!(string(&f)?);
                match m["finalizers"].as_array_mut() {
                    Some(a) => a.push(s),
                    None => m["finalizers"] = json!([s]),
                }
            }
            _ => {}
        }
    }
    Ok(m)
}

fn config_map(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut o = json!({"apiVersion": "v1", "kind": "ConfigMap"});
    for (n, f) in fields(buf)? {
        match n {
            1 => o["metadata"] = object_meta(bytes(&f)?)?,
            2 => insert_entry(&mut o, "data", map_entry(&f, false)?),
            3 => insert_entry(&mut o, "binaryData", map_entry(&f, true)?),
            4 => o["immutable"] = json!(boolean(&f)?),
            _ => {}
        }
    }
    Ok(o)
}

fn secret(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut o = json!({"apiVersion": "v1", "kind": "Secret"});
    for (n, f) in fields(buf)? {
        match n {
            1 => o["metadata"] = object_meta(bytes(&f)?)?,
            2 => insert_entry(&mut o, "data", map_entry(&f, true)?),
            3 => set_string(&mut o, "type", string(&f)?),
            4 => insert_entry(&mut o, "stringData", map_entry(&f, false)?),
            5 => o["immutable"] = json!(boolean(&f)?),
            _ => {}
        }
    }
    Ok(o)
}

fn namespace(buf: &[u8]) -> Result<Value, ProtoError> {
    let mut o = json!({"apiVersion": "v1", "kind": "Namespace", "spec": {}});
    for (n, f) in fields(buf)? {
        match n {
            1 => o["metadata"] = object_meta(bytes(&f)?)?,
            2 => {
                let finalizers = fields(bytes(&f)?)?
                    .iter()
                    .filter(|(n, _)| *n == 1)
                    .map(|(_, f)| string(f).map(Value::String))
                    .collect::<Result<Vec<_>, _>>()?;
                if !finalizers.is_empty() {
                    o["spec"]["finalizers"] = json!(finalizers);
                }
            }
            _ => {}
        }
    }
    Ok(o)
}

/// Decode a protobuf request body into the object's JSON.
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let inner = body.strip_prefix(MAGIC).ok_or(ProtoError::BadMagic)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    for (n, f) in fields(inner)? {
        match n {
            1 => {
                for (m, g) in fields(bytes(&f)?)? {
                    match m {
                        1 => api_version = string(&g)?,
                        2 => kind = string(&g)?,
                        _ => {}
                    }
                }
            }
            2 => raw = Some(bytes(&f)?),
            _ => {}
        }
    }
    let raw = raw.ok_or(ProtoError::Malformed("no object in the envelope"))?;
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => config_map(raw),
        ("v1", "Secret") => secret(raw),
        ("v1", "Namespace") => namespace(raw),
        _ => Err(ProtoError::Unsupported(format!("{api_version} {kind}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal encoder for fixtures.
    fn field(n: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(n << 3 | 2) as u8];
        let mut len = payload.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(payload);
        out
    }

    fn envelope(kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = field(1, b"v1");
        tm.extend(field(2, kind.as_bytes()));
        let mut out = MAGIC.to_vec();
        out.extend(field(1, &tm));
        out.extend(field(2, raw));
        out.extend(field(3, b""));
        out.extend(field(4, b""));
        out
    }

    #[test]
    fn secret_as_kubectl_create_sends_it() {
        // Captured from `kubectl create secret generic s2 --from-literal=k=v` (kubectl 1.32).
        let body: &[u8] = &[
            0x6b, 0x38, 0x73, 0x00, 0x0a, 0x0c, 0x0a, 0x02, 0x76, 0x31, 0x12, 0x06, 0x53, 0x65,
            0x63, 0x72, 0x65, 0x74, 0x12, 0x1e, 0x0a, 0x12, 0x0a, 0x02, 0x73, 0x32, 0x12, 0x00,
            0x1a, 0x00, 0x22, 0x00, 0x2a, 0x00, 0x32, 0x00, 0x38, 0x00, 0x42, 0x00, 0x12, 0x06,
            0x0a, 0x01, 0x6b, 0x12, 0x01, 0x76, 0x1a, 0x00, 0x1a, 0x00, 0x22, 0x00,
        ];
        let o = decode(body).unwrap();
        assert_eq!(
            o,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s2"},
                   "data": {"k": "dg=="}})
        );
    }

    #[test]
    fn config_map_with_labels_owners_and_binary_data() {
        let mut meta = field(1, b"settings");
        meta.extend(field(3, b"team"));
        let mut label = field(1, b"app");
        label.extend(field(2, b"web"));
        meta.extend(field(11, &label));
        let mut owner = field(1, b"DataVolume");
        owner.extend(field(3, b"dv"));
        owner.extend(field(4, b"u-1"));
        owner.extend(field(5, b"cdi.kubevirt.io/v1beta1"));
        owner.extend([6 << 3, 1]);
        meta.extend(field(13, &owner));
        meta.extend(field(14, b"example.com/hold"));
        let mut raw = field(1, &meta);
        let mut entry = field(1, b"mode");
        entry.extend(field(2, b"fast"));
        raw.extend(field(2, &entry));
        let mut bin = field(1, b"blob");
        bin.extend(field(2, &[0, 1, 2]));
        raw.extend(field(3, &bin));
        let o = decode(&envelope("ConfigMap", &raw)).unwrap();
        assert_eq!(o["metadata"]["name"], "settings");
        assert_eq!(o["metadata"]["namespace"], "team");
        assert_eq!(o["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(
            o["metadata"]["ownerReferences"],
            json!([{"kind": "DataVolume", "name": "dv", "uid": "u-1",
                    "apiVersion": "cdi.kubevirt.io/v1beta1", "controller": true}])
        );
        assert_eq!(o["metadata"]["finalizers"], json!(["example.com/hold"]));
        assert_eq!(o["data"], json!({"mode": "fast"}));
        assert_eq!(o["binaryData"], json!({"blob": "AAEC"}));
    }

    #[test]
    fn namespace_and_refusals() {
        let raw = field(1, &field(1, b"team"));
        let o = decode(&envelope("Namespace", &raw)).unwrap();
        assert_eq!(o["metadata"]["name"], "team");
        assert_eq!(o["kind"], "Namespace");
        assert_eq!(
            decode(&envelope("Pod", &raw)),
            Err(ProtoError::Unsupported("v1 Pod".into()))
        );
        assert_eq!(decode(b"{\"a\":1}"), Err(ProtoError::BadMagic));
        let mut cut = envelope("Secret", &raw);
        cut.truncate(cut.len() - 6);
        assert!(matches!(decode(&cut), Err(ProtoError::Malformed(_))));
        assert!(matches!(
            decode(&[
                b'k', b'8', b's', 0, 0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0x01
            ]),
            Err(ProtoError::Malformed(_))
        ));
    }
}
