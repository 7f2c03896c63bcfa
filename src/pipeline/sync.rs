//! The runner and a remote cache: a stage whose fingerprint the remote knows
//! is pulled instead of run, a stage that finishes is pushed, and `r1pipe
//! push` / `pull` move a pipeline's results by hand.

use std::collections::BTreeMap;

use anyhow::Result;

use super::runner::{Decision, Runner};
use super::store::remote::{transfer_bar, Remote, RemoteSpec};
use super::store::{ObjectRef, StageRecord};

impl Runner<'_> {
    /// The remote a command uses: `--remote URL` (with the file's endpoint when it
    /// names the same URL), else the pipeline's `remote:`.
    pub fn open_remote(&self, flag: Option<&str>) -> Result<Option<Remote>> {
        let spec = match (flag, &self.pipeline.remote) {
            (Some(url), Some(own)) if own.url == url => Some(own.clone()),
            (Some(url), _) => Some(RemoteSpec { url: url.to_string(), endpoint: None }),
            (None, own) => own.clone(),
        };
        spec.map(|s| Remote::open(&s, &self.pipeline.project.root)).transpose()
    }

    /// Pull the remote's result of `fingerprint` into the cache, if it has one.
    /// Call while holding the cache's lock.
    pub(super) fn pull_stage(
        &self,
        remote: &Remote,
        fingerprint: &str,
        tag: &str,
        quiet: bool,
    ) -> Result<Option<StageRecord>> {
        let Some(rec) = remote.record(fingerprint)? else { return Ok(None) };
        let db = self.cache.db()?;
        let bar = transfer_bar("pull", quiet);
        let moved = remote.pull(&self.cache, &db, &rec, &bar)?;
        bar.finish_and_clear();
        println!(
            "{tag}: pulled from {} ({} in {} files, {} already here)  {}",
            remote.name,
            indicatif::HumanBytes(moved.bytes),
            moved.files_sent,
            moved.files_there,
            &fingerprint[..12]
        );
        tracing::info!(target: "r1pipe::runlog", fingerprint, bytes = moved.bytes, remote = %remote.name, "stage pulled");
        Ok(Some(rec))
    }

    /// Push a finished stage's record and artifacts.
    pub(super) fn push_record(&self, remote: &Remote, rec: &StageRecord, tag: &str, quiet: bool) -> Result<()> {
        let db = self.cache.db()?;
        let bar = transfer_bar("push", quiet);
        let moved = remote.push(&self.cache, &db, rec, &bar)?;
        bar.finish_and_clear();
        println!(
            "{tag}: pushed to {} ({} in {} files, {} already there)  {}",
            remote.name,
            indicatif::HumanBytes(moved.bytes),
            moved.files_sent,
            moved.files_there,
            &rec.fingerprint[..12]
        );
        tracing::info!(target: "r1pipe::runlog", fingerprint = %rec.fingerprint, bytes = moved.bytes, remote = %remote.name, "stage pushed");
        Ok(())
    }

    /// Push the artifacts a job will read (a stage run where no filesystem is
    /// shared with this head): those the remote has are not sent again.
    pub(super) fn push_inputs(&self, remote: &Remote, orefs: &[&ObjectRef], tag: &str, quiet: bool) -> Result<()> {
        if orefs.is_empty() {
            return Ok(());
        }
        let db = self.cache.db()?;
        let bar = transfer_bar("push inputs", quiet);
        let mut moved = super::store::remote::Transfer::default();
        remote.push_objects(&self.cache, &db, orefs, &bar, &mut moved)?;
        bar.finish_and_clear();
        println!(
            "{tag}: its {} inputs are in {} ({} sent in {} files)",
            orefs.len(),
            remote.name,
            indicatif::HumanBytes(moved.bytes),
            moved.files_sent
        );
        Ok(())
    }

    /// Every stage's decision, as `decide_all`, where a stage the remote has
    /// counts as done (flagged `true`): the stages after it are decided on its
    /// remote outputs, so `status` can say the whole chain is in the remote.
    pub fn decide_all_with_remote(&self, remote: &Remote) -> Result<Vec<(String, Decision, bool)>> {
        let mut available = BTreeMap::new();
        let mut out = Vec::new();
        for name in self.dag.order(self.pipeline) {
            let stage = self.pipeline.stage(&name).expect("dag names are stages");
            let d = self.decide(stage, &available, false)?;
            let outputs = match &d {
                Decision::Cached { record } => Some(record.outputs.clone()),
                Decision::Run { fingerprint, .. } => remote.record(fingerprint)?.map(|r| r.outputs),
                Decision::Pending { .. } => None,
            };
            let in_remote = outputs.is_some() && matches!(d, Decision::Run { .. });
            for (o, r) in outputs.unwrap_or_default() {
                available.insert(format!("{name}.{o}"), r);
            }
            out.push((name, d, in_remote));
        }
        Ok(out)
    }

    /// `r1pipe pull`: the selected stages' results, in order, from the remote
    /// (a stage's fingerprint is known once those it reads are here). Returns
    /// the stages the remote does not have.
    pub fn pull(&self, remote: &Remote, selected: &[String], quiet: bool) -> Result<Vec<String>> {
        let _lock = self.cache.lock(false)?;
        self.cache.create_dirs()?;
        let mut available: BTreeMap<String, ObjectRef> = BTreeMap::new();
        let mut missing = Vec::new();
        for name in self.dag.order(self.pipeline) {
            let stage = self.pipeline.stage(&name).expect("dag names are stages");
            let tag = name.clone();
            let record = match self.decide(stage, &available, false)? {
                Decision::Cached { record } => {
                    if selected.contains(&name) {
                        println!("{tag}: already here  {}", &record.fingerprint[..12]);
                    }
                    Some(*record)
                }
                Decision::Run { fingerprint, .. } => match self.pull_stage(remote, &fingerprint, &tag, quiet)? {
                    Some(rec) => Some(rec),
                    None => {
                        println!("{tag}: not in {}  {}", remote.name, &fingerprint[..12]);
                        None
                    }
                },
                Decision::Pending { upstream } => {
                    println!("{tag}: not pulled: needs {} first", upstream.join(", "));
                    None
                }
            };
            match record {
                Some(rec) => available.extend(rec.outputs.iter().map(|(o, r)| (format!("{name}.{o}"), r.clone()))),
                None if selected.contains(&name) => missing.push(name),
                None => {}
            }
        }
        Ok(missing)
    }

    /// `r1pipe push`: the selected stages' current results. Returns the stages
    /// that have none to push.
    pub fn push(&self, remote: &Remote, selected: &[String], quiet: bool) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        let decisions = self.decide_all()?;
        for (name, decision) in decisions.into_iter().filter(|(n, _)| selected.contains(n)) {
            match decision {
                Decision::Cached { record } => self.push_record(remote, &record, &name, quiet)?,
                _ => {
                    println!("{name}: nothing to push (not up to date in this cache)");
                    missing.push(name);
                }
            }
        }
        Ok(missing)
    }
}
