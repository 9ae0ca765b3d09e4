//! Counters and latency histograms that can be merged across processes.
//!
//! A run records into one shared [`Stats`]; at the end it becomes a
//! [`Measurements`] snapshot, which children of a multi-process run send to
//! their parent as JSON, and which the parent merges losslessly (histograms
//! travel as their recorded buckets, not as precomputed percentiles).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest trackable latency: one hour, in microseconds.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// How many error messages a run keeps as examples.
const MAX_ERROR_SAMPLES: usize = 10;

/// A latency histogram in microseconds (3 significant digits).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "Buckets", try_from = "Buckets")]
pub struct Latency(Histogram<u64>);

/// Wire form of [`Latency`]: `[value_us, count]` per non-empty bucket.
#[derive(Serialize, Deserialize)]
struct Buckets(Vec<(u64, u64)>);

impl From<Latency> for Buckets {
    fn from(l: Latency) -> Self {
        Buckets(
            l.0.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }
}

impl TryFrom<Buckets> for Latency {
    type Error = String;

    fn try_from(b: Buckets) -> Result<Self, Self::Error> {
        let mut l = Latency::new();
        for (value, count) in b.0 {
            l.0.record_n(value.min(MAX_LATENCY_US), count)
                .map_err(|e| e.to_string())?;
        }
        Ok(l)
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts; failure would be a
        // programming error caught by the first test run.
        Latency(
            Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
        )
    }

    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros() as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &self.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            min_ms: ms(h.min()),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The percentiles every report shows, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// A snapshot of one run (or one process of it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measurements {
    /// Event counts; summed when merging.
    pub counts: BTreeMap<String, u64>,
    /// Latency distributions, in microseconds; added when merging.
    pub latencies: BTreeMap<String, Latency>,
    /// Phase durations in seconds (`ramp`, `run`, ...); the longest wins when
    /// merging, because processes run their phases side by side.
    pub phases_s: BTreeMap<String, f64>,
    /// The first few error messages, as examples for the human.
    pub error_samples: Vec<String>,
}

impl Measurements {
    pub fn count(&self, name: &str) -> u64 {
        self.counts.get(name).copied().unwrap_or(0)
    }

    pub fn phase(&self, name: &str) -> f64 {
        self.phases_s.get(name).copied().unwrap_or(0.0)
    }

    pub fn merge(&mut self, other: &Measurements) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.latencies {
            self.latencies.entry(k.clone()).or_default().merge(v);
        }
        for (k, v) in &other.phases_s {
            let e = self.phases_s.entry(k.clone()).or_default();
            *e = e.max(*v);
        }
        for e in &other.error_samples {
            if self.error_samples.len() < MAX_ERROR_SAMPLES {
                self.error_samples.push(e.clone());
            }
        }
    }

    /// Prefixes every name, so that soak can merge its parts side by side.
    pub fn prefixed(self, prefix: &str) -> Measurements {
        let p = |k: String| format!("{prefix}.{k}");
        Measurements {
            counts: self.counts.into_iter().map(|(k, v)| (p(k), v)).collect(),
            latencies: self.latencies.into_iter().map(|(k, v)| (p(k), v)).collect(),
            phases_s: self.phases_s.into_iter().map(|(k, v)| (p(k), v)).collect(),
            error_samples: self.error_samples,
        }
    }
}

/// The live, shared recorder of a run. One mutex is plenty here: the bench
/// records at most some 100k events per second on two cores, and every
/// critical section is a map lookup plus an add.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Measurements>,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Measurements) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub fn add(&self, name: &str, n: u64) {
        self.with(|m| match m.counts.get_mut(name) {
            Some(v) => *v += n,
            None => {
                m.counts.insert(name.to_string(), n);
            }
        });
    }

    pub fn incr(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn get(&self, name: &str) -> u64 {
        self.with(|m| m.count(name))
    }

    pub fn record(&self, name: &str, d: Duration) {
        self.record_us(name, d.as_micros() as u64);
    }

    pub fn record_us(&self, name: &str, us: u64) {
        self.with(|m| match m.latencies.get_mut(name) {
            Some(l) => l.record_us(us),
            None => {
                let mut l = Latency::new();
                l.record_us(us);
                m.latencies.insert(name.to_string(), l);
            }
        });
    }

    pub fn set_phase(&self, name: &str, d: Duration) {
        self.with(|m| {
            m.phases_s.insert(name.to_string(), d.as_secs_f64());
        });
    }

    /// Counts an error as `<what>.<kind>` and keeps its text as an example.
    pub fn error(&self, what: &str, e: &crate::Error) {
        let name = format!("{what}.{}", e.kind());
        self.with(|m| {
            *m.counts.entry(name).or_default() += 1;
            if m.error_samples.len() < MAX_ERROR_SAMPLES {
                m.error_samples.push(format!("{what}: {e}"));
            }
        });
    }

    pub fn snapshot(&self) -> Measurements {
        self.with(|m| m.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_json_and_merge() {
        let mut a = Measurements::default();
        let mut l = Latency::new();
        for us in [100, 200, 300, 10_000] {
            l.record_us(us);
        }
        a.latencies.insert("rtt".into(), l);
        a.counts.insert("sent".into(), 4);
        a.phases_s.insert("run".into(), 2.0);

        let json = serde_json::to_string(&a).expect("serialize");
        let b: Measurements = serde_json::from_str(&json).expect("deserialize");
        let mut merged = a.clone();
        merged.merge(&b);
        merged
            .phases_s
            .insert("run".into(), 1.0_f64.max(merged.phase("run")));

        let s = merged.latencies["rtt"].summary();
        assert_eq!(s.count, 8);
        assert!((s.p50_ms - 0.2).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.02, "{s:?}");
        assert_eq!(merged.count("sent"), 8);
        assert_eq!(merged.phase("run"), 2.0);
    }

    #[test]
    fn stats_count_and_record() {
        let s = Stats::new();
        s.incr("a");
        s.add("a", 2);
        s.record("lat", Duration::from_millis(3));
        s.error("connect", &crate::Error::Timeout("handshake"));
        let m = s.snapshot();
        assert_eq!(m.count("a"), 3);
        assert_eq!(m.count("connect.timeout"), 1);
        assert_eq!(m.latencies["lat"].count(), 1);
        assert_eq!(m.error_samples.len(), 1);
    }
}
