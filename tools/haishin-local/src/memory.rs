//! Each service's peak resident memory over a run, read from the kernel: `VmHWM` in
//! `/proc/PID/status` is the most a process has ever had resident, so sampling it every
//! [`EVERY`] misses only what a process gained in its last moments before it exited (a
//! completion pass, a service killed by chaos). Processes mode only: services running inside this
//! process have no memory of their own.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;

use crate::stack::LocalStack;

/// How often the processes are read.
pub const EVERY: Duration = Duration::from_millis(250);

/// The most each service's instances had resident, in kibibytes.
#[derive(Debug, Clone, Default)]
pub struct PeakRss(BTreeMap<&'static str, u64>);

impl PeakRss {
    /// Reads every service process of `stack` once.
    pub async fn sample(&mut self, stack: &LocalStack) {
        for (service, pid) in stack.service_pids().await {
            if let Some(kib) = high_water_mark_kib(pid) {
                let peak = self.0.entry(service.name()).or_default();
                *peak = (*peak).max(kib);
            }
        }
    }

    /// Reads `stack`'s processes every [`EVERY`] until `stop` turns true, then once more.
    pub async fn watch(stack: &LocalStack, mut stop: watch::Receiver<bool>) -> Self {
        let mut peak = Self::default();
        loop {
            peak.sample(stack).await;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                () = tokio::time::sleep(EVERY) => {}
            }
        }
        peak.sample(stack).await;
        peak
    }

    /// Megabytes (10^6 bytes) per service, one decimal.
    pub fn megabytes(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(name, kib)| ((*name).to_owned(), (*kib as f64 * 1024.0 / 1e5).round() / 10.0))
            .collect()
    }
}

/// `VmHWM` of a process, in kibibytes; `None` once it has exited.
fn high_water_mark_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_high_water_mark() {
        let kib = high_water_mark_kib(std::process::id()).expect("VmHWM of a live process");
        assert!(kib > 0);
        let peak = PeakRss(BTreeMap::from([("trigger", 2_000)]));
        assert_eq!(peak.megabytes()["trigger"], 2.0);
    }
}
