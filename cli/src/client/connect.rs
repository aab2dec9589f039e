//! Where the client commands find the API server: a kubeconfig, as every Kubernetes client.
//!
//! ```text
//!  kubeconfig:  --kubeconfig PATH
//!            │  else --data-dir DIR, else $CDI_HOME   → DIR/kubeconfig (written by `cdi serve`)
//!            │  else ./cdi-data/kubeconfig when it exists (`cdi serve`'s default data dir)
//!            │  else $KUBECONFIG, else ~/.kube/config  (as kube::Config::infer)
//!            │  else the pod's service account         (in a cluster)
//!            └  else nothing: --server alone
//!  then:        --server, --token, --certificate-authority, --insecure-skip-tls-verify
//!               override what the kubeconfig says
//!  namespace:   -n, else the kubeconfig context's, else `default`
//! ```
//!
//! The flags go before or after the subcommand (`cdi --server URL get dv`, `cdi get dv
//! --server URL`). They are not clap `global` arguments: worker subcommands define some of the
//! same names (`cdi uploadserver --data-dir`, `cdi controller --kubeconfig`), which clap
//! refuses for globals. Instead [`ConnFlags`] is flattened into the top level and into each
//! client subcommand, and [`ConnFlags::or`] merges the two (the one after the subcommand wins).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use cdi_api::client::{CDI_HOME, DEFAULT_DATA_DIR, KUBECONFIG_FILE};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};

/// Connection flags of the client commands; every one optional so that the top-level and the
/// subcommand's copies can be merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnFlags {
    /// Kubeconfig file [default: DATA_DIR/kubeconfig, ./cdi-data/kubeconfig, $KUBECONFIG,
    /// ~/.kube/config].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Data directory of `cdi serve`: use DIR/kubeconfig [default: $CDI_HOME].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// API server URL (overrides the kubeconfig's).
    #[arg(short = 's', long, value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token (overrides the kubeconfig's user).
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate file (PEM) the server's certificate must chain to (overrides the
    /// kubeconfig's).
    #[arg(long, visible_alias = "ca-cert", value_name = "PATH")]
    pub certificate_authority: Option<PathBuf>,
    /// Do not verify the server's certificate.
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// Namespace [default: the kubeconfig context's, else default].
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

impl ConnFlags {
    /// These flags (given after the subcommand) with `outer` (given before it) filling in what
    /// they leave unset.
    pub fn or(self, outer: ConnFlags) -> ConnFlags {
        ConnFlags {
            kubeconfig: self.kubeconfig.or(outer.kubeconfig),
            data_dir: self.data_dir.or(outer.data_dir),
            server: self.server.or(outer.server),
            token: self.token.or(outer.token),
            certificate_authority: self.certificate_authority.or(outer.certificate_authority),
            insecure_skip_tls_verify: self.insecure_skip_tls_verify
                || outer.insecure_skip_tls_verify,
            namespace: self.namespace.or(outer.namespace),
        }
    }

    /// Whether any flag is given.
    pub fn is_empty(&self) -> bool {
        *self == ConnFlags::default()
    }
}

/// Why no kubeconfig was found.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocateError {
    /// The data directory named by `--data-dir` or `$CDI_HOME` has no kubeconfig.
    #[error(
        "no kubeconfig at {} (data directory from {origin}): start `cdi serve --data-dir {}` \
         first, or pass --kubeconfig",
        path.display(),
        dir.display()
    )]
    NotInDataDir {
        /// The data directory.
        dir: PathBuf,
        /// The kubeconfig looked for.
        path: PathBuf,
        /// `--data-dir` or `$CDI_HOME`.
        origin: &'static str,
    },
    /// Nothing anywhere.
    #[error(
        "no kubeconfig: pass --kubeconfig, --data-dir, or run `cdi serve` (looked for {}, \
         $KUBECONFIG and ~/.kube/config)",
        default.display()
    )]
    Nowhere {
        /// The kubeconfig of the default data directory.
        default: PathBuf,
    },
}

/// Where the kubeconfig comes from.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    /// A file: `--kubeconfig`, a data directory's kubeconfig.
    File(PathBuf),
    /// `$KUBECONFIG` (several files merge) or `~/.kube/config`, read as kube-rs reads them.
    Default,
    /// The service account of the pod this runs in.
    InCluster,
    /// No kubeconfig: `--server` and the other flags are all there is.
    FlagsOnly,
}

/// The process environment [`locate`] consults, passed in so tests can set it.
#[derive(Debug)]
struct Env {
    cdi_home: Option<PathBuf>,
    kubeconfig_var: Option<OsString>,
    home: Option<PathBuf>,
    in_cluster: bool,
    /// `./cdi-data`, relative to the working directory.
    default_data_dir: PathBuf,
}

impl Env {
    fn from_process() -> Env {
        Env {
            cdi_home: std::env::var_os(CDI_HOME).map(PathBuf::from),
            kubeconfig_var: std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()),
            home: std::env::home_dir(),
            in_cluster: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            default_data_dir: PathBuf::from(DEFAULT_DATA_DIR),
        }
    }
}

/// The kubeconfig to read, in the order of the module documentation.
fn locate(flags: &ConnFlags, env: &Env) -> Result<Source, LocateError> {
    if let Some(path) = &flags.kubeconfig {
        return Ok(Source::File(path.clone()));
    }
    let data_dir = match (&flags.data_dir, &env.cdi_home) {
        (Some(dir), _) => Some((dir, "--data-dir")),
        (None, Some(dir)) => Some((dir, "$CDI_HOME")),
        (None, None) => None,
    };
    if let Some((dir, origin)) = data_dir {
        let path = dir.join(KUBECONFIG_FILE);
        return if path.is_file() {
            Ok(Source::File(path))
        } else {
            Err(LocateError::NotInDataDir {
                dir: dir.clone(),
                path,
                origin,
            })
        };
    }
    let default = env.default_data_dir.join(KUBECONFIG_FILE);
    if default.is_file() {
        return Ok(Source::File(default));
    }
    let home_config = env.home.as_deref().map(|h| h.join(".kube").join("config"));
    if env.kubeconfig_var.is_some() || home_config.is_some_and(|p| p.is_file()) {
        return Ok(Source::Default);
    }
    if env.in_cluster {
        return Ok(Source::InCluster);
    }
    if flags.server.is_some() {
        return Ok(Source::FlagsOnly);
    }
    Err(LocateError::Nowhere { default })
}

/// A client of the API server the flags point at.
pub struct Connection {
    /// The client.
    pub client: kube::Client,
    /// The namespace commands act in.
    pub namespace: String,
    /// The API server's URL, without a trailing slash.
    pub server: String,
    /// CA certificates (DER) the server's certificate is checked against; `None`: the
    /// system's roots.
    pub root_certs: Option<Vec<Vec<u8>>>,
    /// Whether the server's certificate is not checked at all.
    pub insecure: bool,
}

/// Resolve the flags into a client (nothing is sent yet).
pub async fn connect(flags: &ConnFlags) -> anyhow::Result<Connection> {
    cdi_pki::install_default_provider();
    let options = KubeConfigOptions::default();
    let mut config = match locate(flags, &Env::from_process())? {
        Source::File(path) => {
            let loaded = match Kubeconfig::read_from(&path) {
                Ok(kubeconfig) => kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| one_line(&e)),
                Err(e) => Err(one_line(&e)),
            };
            loaded.map_err(|e| anyhow!("loading the kubeconfig {}: {e}", path.display()))?
        }
        Source::Default => kube::Config::from_kubeconfig(&options).await.map_err(|e| {
            anyhow!(
                "loading the kubeconfig ($KUBECONFIG or ~/.kube/config): {}",
                one_line(&e)
            )
        })?,
        Source::InCluster => kube::Config::incluster()
            .map_err(|e| anyhow!("loading the pod's service account: {}", one_line(&e)))?,
        Source::FlagsOnly => kube::Config::new(parse_server(flags.server.as_deref())?),
    };
    apply_overrides(&mut config, flags)?;
    let namespace = flags
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let root_certs = config.root_cert.clone();
    let insecure = config.accept_invalid_certs;
    let client = kube::Client::try_from(config).context("building the API client")?;
    Ok(Connection {
        client,
        namespace,
        server,
        root_certs,
        insecure,
    })
}

/// `--server`: an absolute URL (kube-rs cannot send requests to anything else).
fn parse_server(server: Option<&str>) -> anyhow::Result<http::Uri> {
    let server = server.unwrap_or_default();
    let uri: http::Uri = server
        .parse()
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    anyhow::ensure!(
        uri.scheme().is_some() && uri.authority().is_some(),
        "--server {server:?} is not a URL like https://HOST:PORT"
    );
    Ok(uri)
}

/// `--server`, `--token`, `--certificate-authority` and `--insecure-skip-tls-verify` over
/// what the kubeconfig says.
fn apply_overrides(config: &mut kube::Config, flags: &ConnFlags) -> anyhow::Result<()> {
    if flags.server.is_some() {
        config.cluster_url = parse_server(flags.server.as_deref())?;
    }
    if let Some(token) = &flags.token {
        // The token replaces the kubeconfig user's credentials, as `kubectl --token` does for
        // a bearer-token user; certificates or exec plugins of that user are not mixed in.
        config.auth_info = AuthInfo {
            token: Some(secrecy::SecretString::from(token.clone())),
            ..AuthInfo::default()
        };
    }
    if let Some(path) = &flags.certificate_authority {
        config.root_cert = Some(read_ca(path)?);
        config.root_cert_file = None;
    }
    if flags.insecure_skip_tls_verify {
        config.accept_invalid_certs = true;
    }
    Ok(())
}

/// The certificates of a PEM bundle, as DER.
fn read_ca(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading CA certificate {}", path.display()))?;
    let certs = cdi_pki::parse_certs(&pem)
        .with_context(|| format!("parsing CA certificate {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

impl Connection {
    /// An API failure as the one line a user reads: the message of the Kubernetes `Status`
    /// the server answered with, or why the server could not be reached.
    pub fn explain(&self, e: kube::Error) -> anyhow::Error {
        match e {
            kube::Error::Api(status) if !status.message.is_empty() => {
                anyhow::anyhow!("{}", status.message)
            }
            kube::Error::Api(status) => {
                anyhow::anyhow!("the server answered {} {}", status.code, status.reason)
            }
            other => anyhow!(
                "cannot reach the API server at {}: {}",
                self.server,
                one_line(&other)
            ),
        }
    }
}

/// An error and its causes on one line, leaving out causes the text already shows (kube's
/// and hyper's messages repeat their sources).
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The HTTP status of an API error, if the server answered.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(root: &Path) -> Env {
        Env {
            cdi_home: None,
            kubeconfig_var: None,
            home: Some(root.join("home")),
            in_cluster: false,
            default_data_dir: root.join("cdi-data"),
        }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
    }

    #[test]
    fn explicit_kubeconfig_wins_over_everything() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("cdi-data/kubeconfig"));
        let flags = ConnFlags {
            kubeconfig: Some("/k".into()),
            data_dir: Some(tmp.path().join("cdi-data")),
            ..Default::default()
        };
        assert_eq!(
            locate(&flags, &env(tmp.path())),
            Ok(Source::File("/k".into()))
        );
    }

    #[test]
    fn data_dir_flag_wins_over_cdi_home() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("a/kubeconfig"));
        touch(&tmp.path().join("b/kubeconfig"));
        let mut e = env(tmp.path());
        e.cdi_home = Some(tmp.path().join("b"));
        let flags = ConnFlags {
            data_dir: Some(tmp.path().join("a")),
            ..Default::default()
        };
        assert_eq!(
            locate(&flags, &e),
            Ok(Source::File(tmp.path().join("a/kubeconfig")))
        );
        assert_eq!(
            locate(&ConnFlags::default(), &e),
            Ok(Source::File(tmp.path().join("b/kubeconfig")))
        );
    }

    #[test]
    fn a_data_dir_without_kubeconfig_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut e = env(tmp.path());
        e.kubeconfig_var = Some("/elsewhere".into());
        e.cdi_home = Some(tmp.path().join("empty"));
        let err = locate(&ConnFlags::default(), &e).unwrap_err();
        assert_eq!(
            err,
            LocateError::NotInDataDir {
                dir: tmp.path().join("empty"),
                path: tmp.path().join("empty/kubeconfig"),
                origin: "$CDI_HOME",
            }
        );
        assert!(err.to_string().contains("empty/kubeconfig"), "{err}");
    }

    #[test]
    fn default_data_dir_is_preferred_over_kubeconfig_variable() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("cdi-data/kubeconfig"));
        let mut e = env(tmp.path());
        e.kubeconfig_var = Some("/elsewhere".into());
        assert_eq!(
            locate(&ConnFlags::default(), &e),
            Ok(Source::File(tmp.path().join("cdi-data/kubeconfig")))
        );
    }

    #[test]
    fn then_kubeconfig_variable_or_home_then_in_cluster_then_server_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let mut e = env(tmp.path());
        e.kubeconfig_var = Some("/elsewhere".into());
        assert_eq!(locate(&ConnFlags::default(), &e), Ok(Source::Default));
        e.kubeconfig_var = None;
        touch(&tmp.path().join("home/.kube/config"));
        assert_eq!(locate(&ConnFlags::default(), &e), Ok(Source::Default));
        std::fs::remove_file(tmp.path().join("home/.kube/config")).unwrap();
        e.in_cluster = true;
        assert_eq!(locate(&ConnFlags::default(), &e), Ok(Source::InCluster));
        e.in_cluster = false;
        let server = ConnFlags {
            server: Some("https://h:1".into()),
            ..Default::default()
        };
        assert_eq!(locate(&server, &e), Ok(Source::FlagsOnly));
        let err = locate(&ConnFlags::default(), &e).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no kubeconfig: pass --kubeconfig"),
            "{err}"
        );
    }

    #[test]
    fn flags_after_the_subcommand_win() {
        let inner = ConnFlags {
            namespace: Some("y".into()),
            ..Default::default()
        };
        let outer = ConnFlags {
            namespace: Some("x".into()),
            server: Some("https://h:1".into()),
            insecure_skip_tls_verify: true,
            ..Default::default()
        };
        let merged = inner.or(outer);
        assert_eq!(merged.namespace.as_deref(), Some("y"));
        assert_eq!(merged.server.as_deref(), Some("https://h:1"));
        assert!(merged.insecure_skip_tls_verify);
    }

    #[test]
    fn overrides_replace_server_token_ca_and_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = cdi_pki::Ca::generate("test-ca").unwrap();
        let ca_file = tmp.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let mut config = kube::Config::new("https://old:1".parse().unwrap());
        config.auth_info.username = Some("someone".into());
        let flags = ConnFlags {
            server: Some("https://new:2".into()),
            token: Some("t0k".into()),
            certificate_authority: Some(ca_file),
            insecure_skip_tls_verify: true,
            ..Default::default()
        };
        apply_overrides(&mut config, &flags).unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://new:2/");
        assert_eq!(
            config
                .auth_info
                .token
                .as_ref()
                .map(secrecy::ExposeSecret::expose_secret),
            Some("t0k")
        );
        assert_eq!(config.auth_info.username, None);
        assert_eq!(config.root_cert.map(|c| c.len()), Some(1));
        assert!(config.accept_invalid_certs);
    }

    #[test]
    fn server_urls_need_a_scheme_and_a_host() {
        assert!(parse_server(Some("https://127.0.0.1:8443")).is_ok());
        assert!(parse_server(Some("notaurl")).is_err());
        assert!(parse_server(Some("/path")).is_err());
        assert!(parse_server(None).is_err());
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("inner")]
        struct Inner(#[source] std::io::Error);
        let e = Outer(Inner(std::io::Error::other("refused")));
        assert_eq!(one_line(&e), "outer: inner: refused");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_file = tmp.path().join("ca.crt");
        std::fs::write(&ca_file, "not a certificate\n").unwrap();
        let mut config = kube::Config::new("https://h:1".parse().unwrap());
        let flags = ConnFlags {
            certificate_authority: Some(ca_file),
            ..Default::default()
        };
        assert!(apply_overrides(&mut config, &flags).is_err());
    }
}
