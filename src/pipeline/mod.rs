//! The runner: YAML spec → DAG → fingerprints → cache → execute, skip, resume.
//! It knows stage kinds only through the `StageKind` trait and knows nothing of models.

pub mod checkpoint;
pub mod dag;
pub mod diagnostic;
pub mod fingerprint;
pub mod gc;
pub mod kind;
pub mod params;
pub mod runner;
pub mod spec;
pub mod status;
pub mod store;
pub mod yaml_pos;

pub use kind::{CancelToken, Cancelled, OutputSpec, Project, Registry, Requirements, RunEnv, StageContext, StageKind};
pub use params::{typed, ParamError};
