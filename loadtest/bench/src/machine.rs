//! Facts about this machine and its processes, read from `/proc`.

use serde::{Deserialize, Serialize};

/// Resident set size of `pid` (or of this process) in KiB, from `VmRSS`.
/// `None` when the process is gone or `/proc` is unavailable.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status_field_kib(&status, "VmRSS:")
}

/// Reads a `Name:   1234 kB` line from a `/proc` status-like file.
fn status_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The soft limit on open files of this process, which bounds how many
/// sockets one bench process can hold.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
}

/// What a result is worth depends on the machine it ran on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineInfo {
    pub nproc: usize,
    pub mem_total_kib: Option<u64>,
    /// `uname -r`, read from `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    pub open_files_limit: Option<u64>,
}

impl MachineInfo {
    pub fn current() -> Self {
        MachineInfo {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_kib: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| status_field_kib(&m, "MemTotal:")),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            open_files_limit: open_files_limit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss_and_machine() {
        assert!(rss_kib(None).is_some_and(|k| k > 0));
        assert!(rss_kib(Some(std::process::id())).is_some());
        let m = MachineInfo::current();
        assert!(m.nproc >= 1);
        assert!(m.mem_total_kib.is_some_and(|k| k > 0));
        assert_eq!(
            status_field_kib("VmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
    }
}
