//! GRPO's rollouts on an inference server: which model name to sample the
//! current policy from, and handing the server each update's LoRA adapters.
//!
//! At step 0 the adapters are the identity (B = 0), so the served base model is
//! the policy. After an optimizer step the adapters are written in PEFT layout
//! to `adapter_dir/<name>` and loaded under `<name>` (vLLM's runtime LoRA API);
//! the next round asks for that name, and the adapter before it is unloaded and
//! its folder removed. Syncing happens when a round needs the weights, so
//! `num_iterations` > 1 does not hand over adapters no round samples from, and
//! a resumed run hands over its restored adapters before its first round.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::model::{peft, Transformer};
use crate::rollout::{Client, Sampler};

pub struct RolloutServer {
    pub client: Client,
    /// Where adapters are written; the server must read the same path.
    pub adapter_dir: PathBuf,
    /// Adapter names are `<prefix>-step<N>`: unique to the stage's run, so two
    /// runs on one server never share a name.
    pub name_prefix: String,
    /// The `model` parameter, recorded in each adapter's config as its base.
    pub base_model: String,
    /// The adapter the server holds now: (step, name).
    loaded: Option<(u64, String)>,
}

impl RolloutServer {
    pub fn new(client: Client, adapter_dir: PathBuf, name_prefix: String, base_model: String) -> RolloutServer {
        RolloutServer { client, adapter_dir, name_prefix, base_model, loaded: None }
    }

    /// A sampler of the policy as it is after `step` optimizer steps, handing
    /// the server the current adapters first when it does not hold them yet.
    pub fn sampler(&mut self, policy: &Transformer, step: u64) -> Result<Sampler<'_>> {
        let model = if step == 0 {
            self.client.model().to_string()
        } else if policy.lora.is_none() {
            // The stage refuses this at validation; a library caller gets the same answer.
            anyhow::bail!(
                "the rollout server cannot sample the updated policy: full fine-tuning has no way \
                 to send it new weights (use LoRA adapters)"
            );
        } else {
            if self.loaded.as_ref().map(|(s, _)| *s) != Some(step) {
                self.hand_over(policy, step)?;
            }
            self.loaded.as_ref().expect("just handed over").1.clone()
        };
        Ok(Sampler::Server { client: &self.client, model })
    }

    fn hand_over(&mut self, policy: &Transformer, step: u64) -> Result<()> {
        let name = format!("{}-step{step}", self.name_prefix);
        let dir = self.adapter_dir.join(&name);
        // A folder left by an interrupted attempt at this step holds the same weights (resume is
        // bitwise); writing it again keeps this simple and cheap (adapters are small).
        peft::save_adapter(policy, &self.base_model, &dir)
            .with_context(|| format!("writing the step-{step} adapter for the rollout server"))?;
        self.client.load_lora_adapter(&name, &dir)?;
        tracing::info!(adapter = %name, path = %dir.display(), "LoRA adapter handed to the rollout server");
        if let Some((_, old)) = self.loaded.replace((step, name.clone())) {
            if let Err(e) = self.client.unload_lora_adapter(&old) {
                // The server keeps a stale adapter in memory; training is not affected.
                tracing::warn!(adapter = %old, error = %format!("{e:#}"), "could not unload an old adapter");
            }
            let _ = std::fs::remove_dir_all(self.adapter_dir.join(&old));
        }
        Ok(())
    }
}
