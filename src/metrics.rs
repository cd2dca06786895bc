//! Prometheus metric primitives: counters, gauges, labelled counters and histograms updated
//! with atomic adds, and the text exposition format (version 0.0.4) they render to. Each process
//! renders its own metrics with these (`engine::metrics` for the daemon, `relay::metrics` for the
//! relay).
//!
//! Written by hand rather than with `prometheus-client`: that crate encodes OpenMetrics (a
//! counter's `# TYPE` line names it without `_total`, and the text ends in `# EOF`), while
//! scrapers and parsers of the 0.0.4 format expect every line to name the sample it describes.
//! Updates on hot paths are single relaxed atomic adds; labelled counters take a short lock.
//!
//! Must not touch: anything it counts. Depends on nothing in the crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of a rendered exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters told apart by the value of one label. The values come from small closed sets
/// (error kinds, outcomes), so the map stays small.
#[derive(Debug, Default)]
pub struct CounterVec(Mutex<BTreeMap<String, u64>>);

impl CounterVec {
    pub fn inc(&self, label: &str) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(label) {
            Some(n) => *n += 1,
            None => {
                counts.insert(label.to_owned(), 1);
            }
        }
    }

    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Durations in fixed buckets. The sum is kept in whole microseconds so that observing stays
/// one atomic add per field.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the `+Inf` bucket; not cumulative (rendering adds them up).
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        if let Some(bucket) = self.buckets.get(slot) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }
}

/// A text exposition being written: each family's `# HELP` and `# TYPE` lines, then its samples.
#[derive(Default)]
pub struct Exposition(String);

impl Exposition {
    /// The text written so far.
    pub fn finish(self) -> String {
        self.0
    }

    pub fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let value = value
                    .replace('\\', r"\\")
                    .replace('"', "\\\"")
                    .replace('\n', r"\n");
                let _ = write!(self.0, "{key}=\"{value}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        self.sample(name, &[], value);
    }

    /// A counter family by one label; `always` values are shown (as 0) even before they count.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        always: &[&str],
        values: &[(String, u64)],
    ) {
        self.header(name, help, "counter");
        let mut all: BTreeMap<&str, u64> = always.iter().map(|v| (*v, 0)).collect();
        for (value, n) in values {
            *all.entry(value.as_str()).or_insert(0) += n;
        }
        for (value, n) in all {
            self.sample(name, &[(label, value)], n);
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    pub fn histograms(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, &Histogram)],
    ) {
        self.header(name, help, "histogram");
        for (value, histogram) in series {
            self.histogram_samples(name, &[(label, value)], histogram);
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.header(name, help, "histogram");
        self.histogram_samples(name, &[], histogram);
    }

    fn histogram_samples(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        let bounds = histogram
            .bounds
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()]);
        for (le, count) in bounds.zip(histogram.buckets.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let sum = histogram.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let histogram = Histogram::new(&[0.01, 0.1]);
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_secs(3));
        let mut out = Exposition::default();
        out.histogram("x_seconds", "help", &histogram);
        assert_eq!(
            out.0,
            "# HELP x_seconds help\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.01\"} 1\nx_seconds_bucket{le=\"0.1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 3.055\nx_seconds_count 3\n"
        );
    }

    #[test]
    fn label_values_are_escaped_and_always_values_show_as_zero() {
        let counts = CounterVec::default();
        counts.inc("a\"b\\c\nd");
        counts.inc("a\"b\\c\nd");
        let mut out = Exposition::default();
        out.counters("y_total", "h", "l", &["ok"], &counts.snapshot());
        assert_eq!(
            out.0,
            "# HELP y_total h\n# TYPE y_total counter\ny_total{l=\"a\\\"b\\\\c\\nd\"} 2\n\
             y_total{l=\"ok\"} 0\n"
        );
    }
}
