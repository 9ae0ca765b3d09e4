//! Structured logs through `tracing`: human-readable text by default, one
//! JSON object per line with `--log-format json` for log pipelines. When the
//! environment asks for it, the same subscriber exports trace spans over
//! OTLP (see [`super::otel`]).

use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::prelude::*;

use super::otel;
use crate::config::LogFormat;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what it
/// still holds.
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn traces_on(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports the spans still queued (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(e) = tracer.shutdown()
        {
            tracing::warn!(error = %e, "trace exporter did not flush cleanly");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`). Safe to call more than once (later calls do nothing). A broken
/// OTLP configuration is reported and leaves traces off; logs still work.
pub fn init(format: LogFormat) -> Telemetry {
    let (tracer, otel_error) = match otel::provider() {
        Ok(tracer) => (tracer, None),
        Err(e) => (None, Some(e)),
    };
    let installed = match (tracer.as_ref(), format) {
        // Traces off: one global filter that refuses trace spans, exactly
        // the subscriber there was before traces existed. Their call sites
        // are disabled for good (interest "never"); a per-layer filter
        // would make every disabled call site ask again each time.
        (None, LogFormat::Text) => tracing_subscriber::fmt()
            .with_env_filter(env_filter("off"))
            .try_init()
            .is_ok(),
        (None, LogFormat::Json) => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_env_filter(env_filter("off"))
            .try_init()
            .is_ok(),
        // Traces on: the global filter lets trace spans through, the log
        // layer leaves them out, the exporter takes only them (and events).
        (Some(provider), LogFormat::Text) => tracing_subscriber::registry()
            .with(env_filter("trace"))
            .with(tracing_subscriber::fmt::layer().with_filter(logs_only()))
            .with(exporter(provider))
            .try_init()
            .is_ok(),
        (Some(provider), LogFormat::Json) => tracing_subscriber::registry()
            .with(env_filter("trace"))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_filter(logs_only()),
            )
            .with(exporter(provider))
            .try_init()
            .is_ok(),
    };
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "traces stay off");
    }
    if !installed {
        // Another subscriber was first (a test harness): it keeps its own.
        return Telemetry::default();
    }
    if tracer.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Telemetry { tracer }
}

/// `RUST_LOG` (default `info`), with trace spans at `trace_level`
/// whatever `RUST_LOG` says.
fn env_filter(trace_level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{}={trace_level}", otel::TARGET)
                .parse()
                .expect("a static directive"),
        )
}

/// The log layer's filter when traces are on: everything but trace spans.
fn logs_only() -> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::filter_fn(|meta| meta.target() != otel::TARGET)
}

/// The exporting layer, for trace spans only.
fn exporter<S>(
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    otel::layer(provider)
        // Trace spans, plus wsfleet's own events at info and above, which
        // become span events of the span they happen in (the controller's
        // decisions inside `reconcile`).
        .with_filter(
            Targets::new()
                .with_target(otel::TARGET, tracing::Level::TRACE)
                .with_target("wsfleet", tracing::Level::INFO),
        )
}
