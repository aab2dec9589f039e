//! Environment-variable names of the worker contracts (upstream's names, so a Kubernetes pod
//! spec written for upstream CDI drives our workers unchanged), plus our own path overrides
//! that the embedded control plane uses to run workers as child processes.

/// Source kind: `http`, `s3`, `gcs`, `registry`, `imageio`, `vddk`, `none` (blank).
pub const IMPORTER_SOURCE: &str = "IMPORTER_SOURCE";
/// Source URL.
pub const IMPORTER_ENDPOINT: &str = "IMPORTER_ENDPOINT";
/// `kubevirt` (default) or `archive`.
pub const IMPORTER_CONTENTTYPE: &str = "IMPORTER_CONTENTTYPE";
/// Requested size as a Kubernetes quantity.
pub const IMPORTER_IMAGE_SIZE: &str = "IMPORTER_IMAGE_SIZE";
/// Label value of the progress metric.
pub const OWNER_UID: &str = "OWNER_UID";
/// Filesystem overhead fraction ("0.06"); "0" for block.
pub const FILESYSTEM_OVERHEAD: &str = "FILESYSTEM_OVERHEAD";
/// `true` to skip TLS verification.
pub const INSECURE_TLS: &str = "INSECURE_TLS";
/// Basic-auth user or S3 access key.
pub const IMPORTER_ACCESS_KEY_ID: &str = "IMPORTER_ACCESS_KEY_ID";
/// Basic-auth password or S3 secret key.
pub const IMPORTER_SECRET_KEY: &str = "IMPORTER_SECRET_KEY";
/// Directory of CA certificates for the source.
pub const IMPORTER_CERT_DIR: &str = "IMPORTER_CERT_DIR";
/// Directory of CA certificates for the proxy.
pub const IMPORTER_PROXY_CERT_DIR: &str = "IMPORTER_PROXY_CERT_DIR";
/// Prefix of extra header variables (`IMPORTER_EXTRA_HEADER_0` …), values `Name: value`.
pub const IMPORTER_EXTRA_HEADER_PREFIX: &str = "IMPORTER_EXTRA_HEADER_";
/// `true` to preallocate the target.
pub const PREALLOCATION: &str = "PREALLOCATION";
/// `algo:hex` checksum of the downloaded bytes.
pub const IMPORTER_CHECKSUM: &str = "IMPORTER_CHECKSUM";
/// Architecture to select from a multi-arch registry index.
pub const IMPORTER_REGISTRY_IMAGE_ARCHITECTURE: &str = "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE";

/// Upload server: TLS key file.
pub const TLS_KEY_FILE: &str = "TLS_KEY_FILE";
/// Upload server: TLS certificate file.
pub const TLS_CERT_FILE: &str = "TLS_CERT_FILE";
/// Upload server: CA bundle client certificates must chain to.
pub const CLIENT_CERT_FILE: &str = "CLIENT_CERT_FILE";
/// Upload server: required client-certificate common name.
pub const CLIENT_NAME: &str = "CLIENT_NAME";
/// Upload server: target path (`/data/disk.img` or `/dev/cdi-block-volume`).
pub const DESTINATION: &str = "DESTINATION";
/// Upload server: requested size.
pub const UPLOAD_IMAGE_SIZE: &str = "UPLOAD_IMAGE_SIZE";
/// Upload server: RFC 3339 deadline.
pub const DEADLINE: &str = "DEADLINE";
/// Upload server: listen address.
pub const LISTEN_ADDRESS: &str = "LISTEN_ADDRESS";
/// Upload server: listen port.
pub const LISTEN_PORT: &str = "LISTEN_PORT";

/// Our override: the filesystem-volume directory (upstream `/data`).
pub const CDI_DATA_DIR: &str = "CDI_DATA_DIR";
/// Our override: the block-volume device path (upstream `/dev/cdi-block-volume`).
pub const CDI_BLOCK_DEVICE: &str = "CDI_BLOCK_DEVICE";
/// Our override: the scratch directory (upstream `/scratch`).
pub const CDI_SCRATCH_DIR: &str = "CDI_SCRATCH_DIR";
/// Our override: where the termination message goes (upstream `/dev/termination-log`).
pub const CDI_TERMINATION_LOG: &str = "CDI_TERMINATION_LOG";
/// Our override: the metrics listen address (upstream `0.0.0.0:8443`).
pub const CDI_METRICS_ADDR: &str = "CDI_METRICS_ADDR";

/// Upstream defaults of the paths above.
pub mod defaults {
    /// Filesystem volume mount.
    pub const DATA_DIR: &str = "/data";
    /// Image file inside the filesystem volume.
    pub const DISK_IMAGE_NAME: &str = "disk.img";
    /// Block volume device.
    pub const BLOCK_DEVICE: &str = "/dev/cdi-block-volume";
    /// Scratch mount.
    pub const SCRATCH_DIR: &str = "/scratch";
    /// Kubernetes termination log.
    pub const TERMINATION_LOG: &str = "/dev/termination-log";
    /// Metrics port of workers.
    pub const METRICS_ADDR: &str = "0.0.0.0:8443";
}
