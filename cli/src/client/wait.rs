//! `cdi wait --for condition=NAME[=STATUS] | phase=PHASE | delete`: watch one object until it
//! meets the condition, or give up after `--timeout`.
//!
//! The object must exist when the wait starts (unless waiting for its deletion). Then
//! kube-runtime's `watch_object` follows it — a list and a watch on `metadata.name`, resumed
//! after dropped connections with back-off — and every version is checked.

use std::time::Duration;

use anyhow::{anyhow, bail};
use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde_json::Value;

use super::connect::{Connection, status_code};
use super::discovery;

/// Arguments of `cdi wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Resource type.
    resource: String,
    /// Name.
    name: String,
    /// `condition=Ready`, `condition=Running=False`, `phase=Succeeded` or `delete`.
    #[arg(long = "for", value_parser = parse_wait_for)]
    for_: WaitFor,
    /// Give up after this long (e.g. 30s, 5m).
    #[arg(long, default_value = "30s", value_parser = cdi_serve::cli::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    pub(super) conn: super::ConnFlags,
}

/// What `cdi wait --for` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// A condition with a status (default `True`).
    Condition(String, String),
    /// `status.phase`.
    Phase(String),
    /// The object is gone.
    Delete,
}

/// Parse `--for`.
fn parse_wait_for(s: &str) -> anyhow::Result<WaitFor> {
    if s == "delete" {
        return Ok(WaitFor::Delete);
    }
    if let Some(rest) = s.strip_prefix("condition=") {
        let (c, st) = rest.split_once('=').unwrap_or((rest, "True"));
        return Ok(WaitFor::Condition(c.to_string(), st.to_string()));
    }
    if let Some(p) = s
        .strip_prefix("phase=")
        .or_else(|| s.strip_prefix("jsonpath={.status.phase}="))
    {
        return Ok(WaitFor::Phase(p.to_string()));
    }
    Err(anyhow!(
        "unrecognized --for {s:?}: use condition=NAME[=STATUS], phase=PHASE or delete"
    ))
}

/// Whether `obj` (None: deleted) satisfies `w`.
fn satisfied(w: &WaitFor, obj: Option<&Value>) -> bool {
    match (w, obj) {
        (WaitFor::Delete, None) => true,
        (WaitFor::Delete, Some(_)) | (_, None) => false,
        (WaitFor::Phase(p), Some(o)) => o["status"]["phase"] == p.as_str(),
        (WaitFor::Condition(c, st), Some(o)) => {
            o["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|x| {
                    x["type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case(c))
                        && x["status"] == st.as_str()
                })
            })
        }
    }
}

/// Watch errors that retrying cannot cure: the server refused the request itself (bad
/// credentials, no such resource, forbidden). Expired resource versions (410), throttling
/// and lost connections are retried.
fn is_final(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => status_code(e),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    };
    api.is_some_and(|code| (400..500).contains(&code) && code != 410 && code != 429)
}

/// Run `cdi wait`.
pub async fn run(conn: &Connection, a: WaitArgs) -> anyhow::Result<()> {
    let res = discovery::resolve(conn, &a.resource).await?;
    let api = res.api(&conn.client, Some(&conn.namespace));
    let what = format!("{}/{}", res.api.plural, a.name);
    let run = async {
        match api.get(&a.name).await {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(404) && a.for_ == WaitFor::Delete => return Ok(()),
            Err(e) if status_code(&e) == Some(404) => bail!("{what} not found"),
            Err(e) => return Err(conn.explain(e)),
        }
        let mut versions = watcher::watch_object(api.clone(), &a.name)
            .default_backoff()
            .boxed();
        while let Some(next) = versions.next().await {
            match next {
                Ok(obj) => {
                    let obj = obj.map(serde_json::to_value).transpose()?;
                    if satisfied(&a.for_, obj.as_ref()) {
                        return Ok(());
                    }
                }
                Err(e) if is_final(&e) => return Err(anyhow!("watching {what}: {e}")),
                // The watcher resumes after its back-off.
                Err(_) => {}
            }
        }
        Err(anyhow!("the watch on {what} ended"))
    };
    match tokio::time::timeout(a.timeout, run).await {
        Ok(Ok(())) => {
            println!(
                "{}/{} condition met",
                res.api.kind.to_ascii_lowercase(),
                a.name
            );
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow!("timed out waiting for the condition on {what}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn wait_conditions() {
        let o = json!({"status": {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(satisfied(
            &parse_wait_for("condition=Ready").unwrap(),
            Some(&o)
        ));
        assert!(!satisfied(
            &parse_wait_for("condition=Ready=False").unwrap(),
            Some(&o)
        ));
        assert!(satisfied(
            &parse_wait_for("phase=Succeeded").unwrap(),
            Some(&o)
        ));
        assert!(!satisfied(
            &parse_wait_for("phase=Succeeded").unwrap(),
            None
        ));
        assert!(satisfied(&WaitFor::Delete, None));
        assert!(!satisfied(&WaitFor::Delete, Some(&o)));
        assert!(parse_wait_for("bogus").is_err());
    }

    #[test]
    fn refusals_are_final_and_expiry_is_retried() {
        let status = |code| {
            watcher::Error::WatchError(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(is_final(&status(401)));
        assert!(is_final(&status(404)));
        assert!(!is_final(&status(410)));
        assert!(!is_final(&status(500)));
        assert!(!is_final(&watcher::Error::NoResourceVersion));
    }
}
