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
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // Trace spans are for the exporter only: the log layer never
        // stores them, so they cost nothing when the exporter is off.
        .add_directive(
            format!("{}=off", otel::TARGET)
                .parse()
                .expect("a static directive"),
        );
    let (tracer, otel_error) = match otel::provider() {
        Ok(tracer) => (tracer, None),
        Err(e) => (None, Some(e)),
    };
    let fmt = tracing_subscriber::fmt::layer();
    let installed = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(exporter(tracer.as_ref()))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_filter(filter),
            )
            .with(exporter(tracer.as_ref()))
            .try_init(),
    };
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "traces stay off");
    }
    if installed.is_err() {
        // Another subscriber was first (a test harness): it keeps its own.
        return Telemetry::default();
    }
    if tracer.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Telemetry { tracer }
}

/// The exporting layer, for trace spans only.
fn exporter<S>(
    tracer: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracer.map(|provider| {
        otel::layer(provider)
            // Trace spans, plus wsfleet's own events at info and above, which
            // become span events of the span they happen in (the
            // controller's decisions inside `reconcile`).
            .with_filter(
                Targets::new()
                    .with_target(otel::TARGET, tracing::Level::TRACE)
                    .with_target("wsfleet", tracing::Level::INFO),
            )
    })
}
