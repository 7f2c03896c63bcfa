//! The runner: YAML spec → DAG → fingerprints → cache → execute, skip, resume.
//! It knows stage kinds only through the `StageKind` trait and knows nothing of models.

pub mod bind;
pub mod dag;
pub mod executor;
pub mod fingerprint;
pub mod gc;
pub mod kind;
pub mod matrix;
pub mod resources;
pub mod runner;
pub mod spec;
pub mod status;
pub mod store;
pub mod sync;
pub mod workspace;

pub use kind::{Devices, KindInfo, OutputSpec, Project, Registry, Requirements, RunEnv, StageContext, StageKind};
pub use workspace::Workspace;
