//! The `rewards:` parameter of a stage: a built-in reward set's name
//! (`r1-gsm8k`), a reward-set file, or an inline list.

use serde_json::Value;

use crate::common::ParamError;
use crate::pipeline::fingerprint::canonical_json;
use crate::pipeline::Project;
use crate::rewards::RewardSet;

/// The reward set a parameter names and, for a name or a file, the hash of its
/// parsed content (what the stage's fingerprint covers: a comment in the file
/// does not rerun anything; an inline list is in the parameters already).
pub fn reward_set(v: &Value, project: &Project) -> Result<(RewardSet, Option<String>), Vec<ParamError>> {
    match v {
        Value::String(s) => {
            if s.contains("${") {
                return Err(vec![ParamError::new("", "a reward set cannot be an artifact")
                    .hint("give a built-in reward set's name (r1-gsm8k), a file, or an inline list")]);
            }
            let path = project.local_path(s).unwrap_or_default();
            if !crate::common::builtin::is_name(s) && !path.exists() {
                return Err(vec![ParamError::new("", format!("{} does not exist", path.display())).hint(
                    "give a built-in reward set's name (r1-gsm8k, building-r1, format-only; `r1pipe presets` lists \
                     them), a reward-set file, or an inline list",
                )]);
            }
            let (set, content) =
                RewardSet::named(s, &project.root).map_err(|d| vec![ParamError::new("", format!("\n{d}"))])?;
            let hash = blake3::hash(canonical_json(&content).as_bytes()).to_hex().to_string();
            Ok((set, Some(hash)))
        }
        other => RewardSet::from_value(other, &project.root).map(|s| (s, None)),
    }
}
