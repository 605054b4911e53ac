//! Per-phase wall time and peak memory, printed at the end of long commands.

use std::time::{Duration, Instant};

/// Peak resident set size of this process so far (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Accumulates wall time per named phase (phases may be entered many times, e.g. per layer)
/// and the peak RSS seen at the end of each.
#[derive(Debug, Default, Clone)]
pub struct PhaseReport {
    phases: Vec<(String, Duration, u64)>,
}

impl PhaseReport {
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `f`, adding its wall time to `phase`.
    pub fn time<T>(&mut self, phase: &str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(phase, start.elapsed());
        out
    }

    /// Add `elapsed` to `phase`.
    pub fn add(&mut self, phase: &str, elapsed: Duration) {
        let rss = peak_rss_bytes();
        match self.phases.iter_mut().find(|(n, _, _)| n == phase) {
            Some(entry) => {
                entry.1 += elapsed;
                entry.2 = entry.2.max(rss);
            }
            None => self.phases.push((phase.to_string(), elapsed, rss)),
        }
    }

    /// Seconds spent in `phase` so far.
    pub fn seconds(&self, phase: &str) -> f64 {
        self.phases
            .iter()
            .find(|(n, _, _)| n == phase)
            .map(|(_, d, _)| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// (phase, seconds, peak RSS bytes at the end of the phase) in first-seen order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, f64, u64)> {
        self.phases
            .iter()
            .map(|(n, d, r)| (n.as_str(), d.as_secs_f64(), *r))
    }

    /// A small table for the end of a run.
    pub fn render(&self) -> String {
        let total: f64 = self.phases.iter().map(|(_, d, _)| d.as_secs_f64()).sum();
        let mut s = format!(
            "{:<40} {:>10} {:>14}\n",
            "phase", "time (s)", "peak RSS (MiB)"
        );
        for (name, secs, rss) in self.entries() {
            s.push_str(&format!(
                "{:<40} {:>10.2} {:>14.1}\n",
                name,
                secs,
                rss as f64 / 1048576.0
            ));
        }
        s.push_str(&format!(
            "{:<40} {:>10.2} {:>14.1}\n",
            "total",
            total,
            peak_rss_bytes() as f64 / 1048576.0
        ));
        s
    }

    /// JSON form for benchmark harnesses.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "phases": self.entries().map(|(n, s, r)| serde_json::json!({"phase": n, "seconds": s, "peak_rss_bytes": r})).collect::<Vec<_>>(),
            "peak_rss_bytes": peak_rss_bytes(),
        })
    }
}

/// A progress bar with the project's style (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, msg: &str) -> indicatif::ProgressBar {
    styled_progress_bar(
        len,
        msg,
        "{msg:>14} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
    )
}

/// [`progress_bar`] with another indicatif template (e.g. one showing `{per_sec}`); the
/// template is a constant of the caller, so a bad one is a programming error.
pub fn styled_progress_bar(len: u64, msg: &str, template: &'static str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}
