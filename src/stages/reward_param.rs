//! The `rewards:` parameter of a stage: a reward-set file (which then enters
//! the fingerprint) or an inline list.

use std::path::PathBuf;

use serde_json::Value;

use crate::common::ParamError;
use crate::pipeline::Project;
use crate::rewards::RewardSet;

/// The reward set a parameter names, with the file it was read from (for the fingerprint).
pub fn reward_set(v: &Value, project: &Project) -> Result<(RewardSet, Option<PathBuf>), Vec<ParamError>> {
    match v {
        Value::String(s) => {
            let path =
                project.local_path(s).ok_or_else(|| vec![ParamError::new("", "a reward set cannot be an artifact")])?;
            if !path.exists() {
                return Err(vec![ParamError::new("", format!("{} does not exist", path.display()))
                    .hint("give a reward-set file such as stages/rewards/r1-gsm8k.yaml, or an inline list")]);
            }
            RewardSet::from_file(&path, &project.root)
                .map(|s| (s, Some(path)))
                .map_err(|d| vec![ParamError::new("", format!("\n{d}"))])
        }
        other => RewardSet::from_value(other, &project.root).map(|s| (s, None)),
    }
}
