//! A stage's `resources:`: what its job asks of the machine or cluster that
//! runs it. Here, `gpus` is what the GPU pool of `run --jobs` gives the stage;
//! an executor that runs jobs elsewhere turns all of it into its own request
//! (Slurm's `--gres`/`--cpus-per-task`/`--mem`/`--time`, Ray's entrypoint
//! CPUs, GPUs and memory). Not part of the stage's fingerprint: where a stage
//! runs does not change what it makes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
    /// `32G`, `500M`, or a number of megabytes (Slurm's way of writing it).
    pub mem: Option<String>,
    /// A time limit: `90` (minutes), `4:00:00`, `1-00:00:00` (Slurm's way of writing it).
    pub time: Option<String>,
    /// A Slurm partition for this stage alone.
    pub partition: Option<String>,
}

impl Resources {
    /// Values no executor could give (or a local GPU pool could never give), as (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.cpus.is_some_and(|c| c == 0 || c > 65_536) {
            out.push(("cpus", format!("{} is not between 1 and 65536", self.cpus.unwrap_or(0))));
        }
        if self.gpus.is_some_and(|g| g > 1024) {
            out.push(("gpus", format!("{} is more than 1024", self.gpus.unwrap_or(0))));
        }
        if let Some(m) = self.mem.as_deref().filter(|m| mem_bytes(m).is_none()) {
            out.push(("mem", format!("`{m}` is not a size (`32G`, `500M`, or megabytes: `4096`)")));
        }
        if let Some(t) = self.time.as_deref().filter(|t| !time_ok(t)) {
            out.push(("time", format!("`{t}` is not a time limit (`90` minutes, `4:00:00`, `1-00:00:00`)")));
        }
        out
    }

    /// `mem` in bytes (`None` when unset).
    pub fn mem_bytes(&self) -> Option<u64> {
        self.mem.as_deref().and_then(mem_bytes)
    }
}

/// `32G`, `500M`, `64K`, `1T`, or megabytes without a unit; at most 12 digits.
fn mem_bytes(m: &str) -> Option<u64> {
    let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
    if digits.is_empty()
        || digits.len() > 12
        || !digits.chars().all(|c| c.is_ascii_digit())
        || m.len() - digits.len() > 1
    {
        return None;
    }
    let unit: u64 = match &m[digits.len()..] {
        "K" => 1 << 10,
        "" | "M" => 1 << 20,
        "G" => 1 << 30,
        _ => 1 << 40,
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
fn time_ok(t: &str) -> bool {
    let (days, rest) = t.split_once('-').map_or((None, t), |(d, r)| (Some(d), r));
    let parts: Vec<&str> = rest.split(':').collect();
    let numeric = |s: &str| !s.is_empty() && s.len() <= 6 && s.chars().all(|c| c.is_ascii_digit());
    days.is_none_or(numeric) && !parts.is_empty() && parts.len() <= 3 && parts.iter().all(|p| numeric(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_the_usual_units() {
        assert_eq!(mem_bytes("32G"), Some(32 << 30));
        assert_eq!(mem_bytes("500M"), Some(500 << 20));
        assert_eq!(mem_bytes("4096"), Some(4096 << 20));
        assert_eq!(mem_bytes("2T"), Some(2 << 40));
        for bad in ["", "G", "1.5G", "12GB", "-1G", "9999999999999"] {
            assert_eq!(mem_bytes(bad), None, "{bad}");
        }
        // No overflow on the largest size the digit cap allows.
        assert_eq!(mem_bytes("999999999999T"), None);
    }

    #[test]
    fn time_limits_read_in_the_usual_forms() {
        for ok in ["90", "4:00:00", "1-00:00:00", "2-12", "10:30"] {
            assert!(time_ok(ok), "{ok}");
        }
        for bad in ["", "1h", "1:2:3:4", "-1", "a-1"] {
            assert!(!time_ok(bad), "{bad}");
        }
    }
}
