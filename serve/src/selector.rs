//! Label and field selectors of list and watch requests (`labelSelector`, `fieldSelector`).
//!
//! Label selectors take the Kubernetes syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
//! `a notin (x)`, `a` (exists) and `!a` (does not exist), comma-separated and all required.
//! Field selectors take `path=value`, `path==value` and `path!=value` on any dotted field
//! (`metadata.name`, `involvedObject.uid`, `status.phase`); a missing field reads as `""`, and
//! non-string fields compare by their JSON text (`spec.replicas=2`, `spec.x=true`).

use serde_json::Value;

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector (all requirements must hold; empty matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, SelectorError> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(SelectorError(format!("unbalanced ')' in {s:?}")));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SelectorError(format!("unbalanced '(' in {s:?}")));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn set_values(rest: &str, whole: &str) -> Result<Vec<String>, SelectorError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| SelectorError(format!("expected a '(value, …)' set in {whole:?}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parse a label selector.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top(s)? {
            let p = part.trim();
            if p.is_empty() {
                return Err(SelectorError(format!("empty requirement in {s:?}")));
            }
            let key_of = |k: &str| -> Result<String, SelectorError> {
                let k = k.trim();
                if valid_key(k) {
                    Ok(k.to_string())
                } else {
                    Err(SelectorError(format!("invalid label key {k:?}")))
                }
            };
            let req = if let Some(k) = p.strip_prefix('!') {
                LabelReq::NotExists(key_of(k)?)
            } else if let Some((k, v)) = p.split_once("!=") {
                LabelReq::NotEq(key_of(k)?, v.trim().to_string())
            } else if let Some((k, v)) = p.split_once("==") {
                LabelReq::Eq(key_of(k)?, v.trim().to_string())
            } else if let Some((k, v)) = p.split_once('=') {
                LabelReq::Eq(key_of(k)?, v.trim().to_string())
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                LabelReq::NotIn(key_of(k)?, set_values(rest, p)?)
            } else if let Some((k, rest)) = p.split_once(" in ") {
                LabelReq::In(key_of(k)?, set_values(rest, p)?)
            } else {
                LabelReq::Exists(key_of(p)?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether `obj`'s `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            // As Kubernetes: `!=` and `notin` also match objects without the label.
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// One field requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    negated: bool,
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    /// Parse a field selector.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in s.split(',') {
            let (path, value, negated) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, v, false)
            } else {
                return Err(SelectorError(format!(
                    "{part:?}: field selectors take path=value, path==value or path!=value"
                )));
            };
            let path = path.trim();
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(SelectorError(format!("invalid field path {path:?}")));
            }
            reqs.push(FieldReq {
                path: path.to_string(),
                value: value.trim().to_string(),
                negated,
            });
        }
        Ok(FieldSelector(reqs))
    }

    /// The name a `metadata.name=x` requirement pins, if any (lets a get replace a scan).
    pub fn pinned_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|r| r.path == "metadata.name" && !r.negated)
            .map(|r| r.value.as_str())
    }

    /// Whether `obj` satisfies every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let v = r.path.split('.').fold(obj, |v, seg| &v[seg]);
            let equal = match v {
                Value::String(s) => *s == r.value,
                Value::Null => r.value.is_empty(),
                other => serde_json::from_str::<Value>(&r.value).is_ok_and(|w| w == *other),
            };
            equal != r.negated
        })
    }
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Selectors {
    /// Whether no selector was given (every object is selected).
    pub fn is_empty(&self) -> bool {
        self.labels.0.is_empty() && self.fields.0.is_empty()
    }

    /// Whether `obj` is selected.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels},
               "involvedObject": {"name": "dv"}, "count": 2, "spec": {"on": true}})
    }

    fn l(s: &str, o: &Value) -> bool {
        LabelSelector::parse(s).unwrap().matches(o)
    }

    #[test]
    fn label_equality_and_inequality() {
        let o = obj(json!({"app": "web", "tier": "db"}));
        assert!(l("app=web", &o));
        assert!(l("app==web", &o));
        assert!(!l("app=db", &o));
        assert!(l("app!=db", &o));
        assert!(!l("app!=web", &o));
        assert!(l("missing!=x", &o));
        assert!(l("app=web,tier=db", &o));
        assert!(!l("app=web,tier=x", &o));
        assert!(l("", &o));
    }

    #[test]
    fn label_sets_and_existence() {
        let o = obj(json!({"app": "web"}));
        assert!(l("app in (db, web)", &o));
        assert!(!l("app in (db)", &o));
        assert!(l("app notin (db)", &o));
        assert!(!l("app notin (web,db)", &o));
        assert!(l("other notin (x)", &o));
        assert!(l("app", &o));
        assert!(!l("other", &o));
        assert!(l("!other", &o));
        assert!(!l("!app", &o));
        assert!(l("app in (web),!other,app!=x", &o));
        assert!(!l("app", &json!({"metadata": {}})));
    }

    #[test]
    fn bad_label_selectors_fail() {
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a=b,,c=d").is_err());
        assert!(LabelSelector::parse("bad key=x").is_err());
    }

    #[test]
    fn field_selectors_match() {
        let o = obj(json!({}));
        let f = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(f("metadata.name=a"));
        assert!(f("metadata.name==a"));
        assert!(!f("metadata.name!=a"));
        assert!(f("metadata.namespace=ns,involvedObject.name=dv"));
        assert!(!f("involvedObject.name=x"));
        assert!(f("count=2"));
        assert!(f("spec.on=true"));
        assert!(f("status.phase="));
        assert!(f("status.phase!=Running"));
        assert!(FieldSelector::parse("metadata.name").is_err());
        assert!(FieldSelector::parse("a..b=c").is_err());
        assert_eq!(
            FieldSelector::parse("metadata.name=x")
                .unwrap()
                .pinned_name(),
            Some("x")
        );
    }
}
