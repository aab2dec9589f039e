//! The embedded control plane (`cdi serve`) and the client commands that talk to it.
//!
//! A person with one machine applies the same DataVolume YAML they would give a cluster and
//! gets filled volumes. The controller's decisions ([`decide`], [`validate`]) are pure; effects
//! go through three seams a Kubernetes backend can implement instead:
//!
//! * [`store::Store`] — objects, resource versions, change feed (the apiserver);
//! * [`storage::ClaimProvisioner`] — storage behind claims (a CSI driver);
//! * [`worker::WorkerRunner`] — importer / upload-server runs and their outcome (pods).
//!
//! The API is a Kubernetes API server for the kinds of [`store::Kind`], so kubectl (through
//! `<data-dir>/kubeconfig`) and kube-rs clients work against it unchanged: [`api`] (verbs,
//! subresources, Status errors), [`discovery`] (API and OpenAPI documents), [`watch`],
//! [`selector`], [`patch`], [`table`] (kubectl's columns), [`convert`] (served versions),
//! [`protobuf`] (typed-client bodies), [`gc`] (owner references, namespace deletion) and
//! [`kubeconfig`]; object lifecycle rules live in [`store`].
//!
//! Clone and DataImportCron are not implemented yet: validation refuses clone sources and
//! `sourceRef` with a clear message; a clone strategy would slot in as another
//! [`decide::Operation`] variant driven by the StorageProfile's `cloneStrategy`, and schedules
//! as a second loop beside [`reconcile::Controller::run`] creating DataVolumes.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod convert;
pub mod decide;
pub mod describe;
pub mod discovery;
pub mod gc;
pub mod kubeconfig;
pub mod patch;
pub mod protobuf;
pub mod reconcile;
pub mod selector;
pub mod serve;
pub mod storage;
pub mod store;
pub mod table;
pub mod upload;
pub mod util;
pub mod validate;
pub mod watch;
pub mod worker;
