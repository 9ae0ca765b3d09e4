//! OpenTelemetry traces, exported over OTLP/HTTP (protobuf).
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. The standard variables
//! configure the rest: `OTEL_SERVICE_NAME` (default `wsfleet`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_*` for the batch processor.
//!
//! Only spans with the target [`TARGET`] are exported, and the log layer
//! never records them: with the exporter off, every such span is disabled
//! at its call site, so the hot path pays one relaxed load per span and
//! carries no trace context (see `docs/tracing.md`).
//!
//! The W3C trace context crosses the Redis hop as a `tp` field of the
//! stream entries (log and pod inbox), as a `traceparent` string.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span meant for the trace exporter.
pub const TARGET: &str = "wsfleet_trace";

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP trace exporter: {0}")]
pub struct OtelError(String);

/// Whether the environment asks for traces.
pub fn requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
}

/// The tracer provider the environment asks for, or `None` when traces
/// are off. Its batch processor exports from a thread of its own.
pub fn provider() -> Result<Option<SdkTracerProvider>, OtelError> {
    if !requested() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| OtelError(e.to_string()))?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("wsfleet");
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// The `tracing` layer that turns spans of [`TARGET`] into OTel spans.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("wsfleet"))
}

/// The W3C `traceparent` of `span`, to carry across a hop; `None` when the
/// span records nothing (traces off, or filtered out).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let remote = context.span();
    let span_context = remote.span_context();
    if !span_context.is_valid() {
        return None;
    }
    Some(format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    ))
}

/// Whether `traceparent` has the W3C shape `vv-<32 hex>-<16 hex>-ff`
/// (lowercase hex, version not `ff`). The propagator alone is lenient
/// about lengths; a header that does not follow the format is ignored.
fn well_formed(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(parts.as_slice(), [v, t, s, f]
        if v.len() == 2 && t.len() == 32 && s.len() == 16 && f.len() == 2
            && parts.iter().all(|p| hex(p)) && *v != "ff")
}

/// The remote context a `traceparent` names; `None` if it is malformed.
fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
    if !well_formed(traceparent) {
        return None;
    }
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    let context = TraceContextPropagator::new().extract(&One(traceparent));
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` a child of the remote span `traceparent` names (an HTTP
/// caller's, or the pod that appended the message). Does nothing when the
/// span is disabled or the traceparent is absent or malformed.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    if let Some(context) = traceparent.and_then(remote_context) {
        let _ = span.set_parent(context);
    }
}

/// Links `span` to the remote span `traceparent` names, without making it
/// a child: a channel message fans out to many pods and subscribers, and
/// one parent with thousands of children reads as noise.
pub fn link(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    if let Some(context) = traceparent.and_then(remote_context) {
        span.add_link(context.span().span_context().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_parsed_or_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote_context(good).expect("a valid traceparent");
        let span = context.span();
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            span.span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
        assert!(span.span_context().is_remote());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(remote_context(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_disabled_span_carries_no_context() {
        // No subscriber in this test: every span is disabled, as with
        // traces off.
        let span = tracing::info_span!(target: "wsfleet_trace", "x");
        assert_eq!(traceparent(&span), None);
        follow(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
    }
}
