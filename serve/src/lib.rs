//! The embedded control plane (`cdi serve`).
//!
//! A person with one machine applies the same DataVolume YAML they would give a cluster and
//! gets filled volumes. `cdi serve` is a single-host Kubernetes: this crate is its API server
//! over SQLite; the DataVolume controller ([`cdi_controller`]) and the node — the agent that
//! runs pods as child processes and the local provisioner ([`cdi_node`]) — run in the same
//! process as clients of that API through `kube::Client`, as they would on a cluster
//! ([`serve`] wires them). What stays here besides the API: the objects a first start lays
//! out ([`config`]: classes, CDIConfig, namespaces, upload PKI) and the upload proxy's mount.
//!
//! The API is a Kubernetes API server for the kinds of [`store::Kind`], so kubectl (through
//! `<data-dir>/kubeconfig`) and kube-rs clients work against it unchanged: [`api`] (verbs,
//! subresources, Status errors), [`discovery`] (API and OpenAPI documents), [`watch`],
//! [`selector`], [`patch`], [`table`] (kubectl's columns), [`convert`] (served versions),
//! [`protobuf`] (typed-client bodies), [`gc`] (owner references, namespace deletion) and
//! [`kubeconfig`]; object lifecycle rules live in [`store`].

pub mod api;
pub mod cli;
pub mod config;
pub mod convert;
pub mod discovery;
pub mod gc;
pub mod kubeconfig;
pub mod patch;
pub mod protobuf;
pub mod selector;
pub mod serve;
pub mod storage;
pub mod store;
pub mod table;
pub mod util;
pub mod watch;
