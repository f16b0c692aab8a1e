//! W3C trace context across hops: the `traceparent` that a message or a task carries out, and the
//! parent that a request's span takes from the one it came with.
//!
//! Spans at `info` and above are OpenTelemetry spans (the `tracing-opentelemetry` layer that
//! [`init`](super::init) installs, whatever `RUST_LOG` says). A span started under a remote parent
//! keeps the parent's trace id and gets a span id of its own; the spans inside it belong to the
//! same trace. The ids travel in `traceparent` (a Pub/Sub attribute, a
//! task header) and in the log fields that Cloud Logging links to traces; [`super::export`] sends
//! the spans themselves when an endpoint is configured.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::Registry;
use tracing_subscriber::filter::{FilterFn, LevelFilter, filter_fn};
use tracing_subscriber::registry::LookupSpan;

/// The W3C header, and the Pub/Sub attribute, that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The layer that makes the spans [`traced_spans`] picks OpenTelemetry spans of `provider`'s
/// (which exports them when it has an exporter). Their ids come from the SDK's random generator;
/// the sampling decision follows the parent's.
pub(super) fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + use<S>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let tracer = provider.tracer("haishin");
    // A span's parent is the traced span around it in `tracing`'s own context, never a
    // thread-local OpenTelemetry context: tasks that share a worker thread would leak theirs.
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_filter(traced_spans())
}

/// Spans at `info` and above, and no events: what carries the trace context, independent of the
/// log filter, so that a quiet `RUST_LOG` does not break a trace.
pub(super) fn traced_spans() -> FilterFn<fn(&Metadata<'_>) -> bool> {
    let traced: fn(&Metadata<'_>) -> bool = |meta| meta.is_span() && *meta.level() <= Level::INFO;
    filter_fn(traced).with_max_level_hint(LevelFilter::INFO)
}

/// The `traceparent` of the innermost traced span around the caller, to send with a message or a
/// task; `None` outside any traced span.
pub fn current_traceparent() -> Option<String> {
    let context = current_context()?;
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The OpenTelemetry context of the current span, or of its nearest traced ancestor (a `debug`
/// span has none of its own).
fn current_context() -> Option<Context> {
    Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<Registry>()?;
            let mut span = registry.span(id)?;
            loop {
                if let Some(context) = tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
                    && context.span().span_context().is_valid()
                {
                    return Some(context);
                }
                span = span.parent()?;
            }
        })
        .flatten()
}

/// A W3C `traceparent` (`VERSION-TRACE-SPAN-FLAGS`, lowercase hex), as the remote span it names;
/// `None` when it is malformed or names no span (an all-zero trace or span id).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    // The propagator takes shorter ids as if zero-padded; W3C fixes their lengths.
    let lowercase_hex = |part: &str, len: usize| {
        part.len() == len && part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = value.trim().split('-');
    let fields = [parts.next(), parts.next(), parts.next(), parts.next()];
    if !fields.into_iter().zip([2, 32, 16, 2]).all(|(part, len)| part.is_some_and(|p| lowercase_hex(p, len)))
    {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let remote = context.span().span_context().clone();
    remote.is_valid().then_some(remote)
}

/// Google's `X-Cloud-Trace-Context` (`TRACE/SPAN;o=1`, the span id in decimal), as the remote
/// span it names; `None` when it is malformed or names no span.
pub fn parse_cloud_trace(value: &str) -> Option<SpanContext> {
    let (trace, rest) = value.trim().split_once('/')?;
    let (span, options) = rest.split_once(';').unwrap_or((rest, ""));
    if trace.len() != 32 || !trace.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from(span.parse::<u64>().ok()?);
    let flags = if options == "o=1" { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let remote = SpanContext::new(trace, span, flags, true, TraceState::default());
    remote.is_valid().then_some(remote)
}

/// The share of new traces kept, as the exporter's sampler keeps them (1 until it is set).
static NEW_TRACE_RATIO: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Sets the share of new traces kept; the first call wins.
pub(super) fn set_new_trace_ratio(ratio: f64) {
    let _ = NEW_TRACE_RATIO.set(ratio);
}

/// The remote parent that every delivery of a message published without a `traceparent` shares:
/// its trace and span ids are derived from the message id, so that a redelivered message joins
/// the trace of its first delivery. Kept or dropped by the trace id, as a new trace is.
pub fn message_trace_root(message_id: &str) -> SpanContext {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("haishin-message:{message_id}").as_bytes());
    let mut trace = [0u8; 16];
    trace.copy_from_slice(&digest[..16]);
    let mut span = [0u8; 8];
    span.copy_from_slice(&digest[16..24]);
    // The ratio rule of OpenTelemetry's `TraceIdRatioBased`: the trace id's low 63 bits below
    // ratio × 2⁶³.
    let ratio = NEW_TRACE_RATIO.get().copied().unwrap_or(1.0);
    let low = u64::from_be_bytes(trace[8..].try_into().expect("eight bytes")) >> 1;
    let kept = ratio >= 1.0 || (low as f64) < ratio * (1u64 << 63) as f64;
    let flags = if kept { TraceFlags::SAMPLED } else { TraceFlags::default() };
    SpanContext::new(TraceId::from_bytes(trace), SpanId::from_bytes(span), flags, true, TraceState::default())
}

/// Starts `span` as a child of `parent` (the publisher's or the caller's span), or as the root of
/// a new trace without one, and records its ids in its `trace_id` and `span_id` fields, which
/// every log line inside it carries. Call it before the span is first entered; the span declares
/// both fields (`trace_id = tracing::field::Empty`).
pub fn join_trace(span: &Span, parent: Option<&SpanContext>) {
    if let Some(parent) = parent {
        // Refused only without the OpenTelemetry layer, or once the span has started.
        let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
    }
    let own = span.context().span().span_context().clone();
    // Without the OpenTelemetry layer, the logs still name the caller's trace and span.
    let ids = if own.is_valid() { Some(&own) } else { parent };
    if let Some(ids) = ids {
        span.record("trace_id", ids.trace_id().to_string().as_str());
        span.record("span_id", ids.span_id().to_string().as_str());
    }
}

#[cfg(test)]
mod tests {
    use tracing::field::Empty;

    use super::*;
    use crate::telemetry::testing::{PARENT_SPAN, TRACE, traced, traceparent};

    fn request_span() -> Span {
        tracing::info_span!("request", trace_id = Empty, span_id = Empty)
    }

    #[test]
    fn a_span_joins_its_parent_s_trace_with_a_span_id_of_its_own() {
        tracing::subscriber::with_default(traced(), || {
            let parent = parse_traceparent(&traceparent()).expect("a valid traceparent");
            let span = request_span();
            join_trace(&span, Some(&parent));

            let sent = span.in_scope(current_traceparent).expect("a traceparent inside the span");

            let sent = parse_traceparent(&sent).expect("a valid traceparent is sent");
            assert_eq!(sent.trace_id().to_string(), TRACE);
            assert_ne!(sent.span_id().to_string(), PARENT_SPAN);
            assert!(sent.is_sampled(), "the parent's sampling decision is kept");
        });
    }

    #[test]
    fn spans_inside_a_request_send_its_trace_with_their_own_span_ids() {
        tracing::subscriber::with_default(traced(), || {
            let span = request_span();
            join_trace(&span, None);
            let _request = span.enter();
            let outer = parse_traceparent(&current_traceparent().unwrap()).unwrap();

            let inner = tracing::info_span!("chunk")
                .in_scope(current_traceparent)
                .and_then(|sent| parse_traceparent(&sent))
                .expect("a traceparent inside the child span");

            assert_eq!(inner.trace_id(), outer.trace_id());
            assert_ne!(inner.span_id(), outer.span_id());
        });
    }

    #[test]
    fn without_a_parent_a_span_starts_a_trace_of_its_own() {
        tracing::subscriber::with_default(traced(), || {
            let first = request_span();
            join_trace(&first, None);
            let second = request_span();
            join_trace(&second, None);

            let first = first.in_scope(current_traceparent).and_then(|s| parse_traceparent(&s)).unwrap();
            let second = second.in_scope(current_traceparent).and_then(|s| parse_traceparent(&s)).unwrap();

            assert_ne!(first.trace_id(), second.trace_id());
        });
    }

    #[test]
    fn nothing_is_sent_outside_a_traced_span() {
        assert_eq!(current_traceparent(), None, "no subscriber");
        tracing::subscriber::with_default(traced(), || {
            assert_eq!(current_traceparent(), None, "no span");
        });
    }

    #[test]
    fn malformed_traceparents_name_no_parent() {
        let zeros = "0".repeat(32);
        for bad in [
            String::new(),
            "garbage".to_owned(),
            format!("00-{zeros}-{PARENT_SPAN}-01"),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("00-{}-{PARENT_SPAN}-01", TRACE.to_ascii_uppercase()),
            format!("00-{TRACE}-{PARENT_SPAN}-01-extra"),
            format!("ff-{TRACE}-{PARENT_SPAN}-01"),
            format!("00-{}-{PARENT_SPAN}-01", &TRACE[..31]),
            format!("00-{TRACE}-{}-01", &PARENT_SPAN[..15]),
            format!("00-{TRACE}-{PARENT_SPAN}-1"),
            format!("0-{TRACE}-{PARENT_SPAN}-01"),
            format!("00-{TRACE}-{PARENT_SPAN}"),
            format!("00-{TRACE}-{PARENT_SPAN}-zz"),
        ] {
            assert_eq!(parse_traceparent(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_malformed_parent_leaves_the_span_a_trace_of_its_own() {
        tracing::subscriber::with_default(traced(), || {
            let span = request_span();
            join_trace(&span, parse_traceparent("00-not-a-trace-01").as_ref());

            let sent = span.in_scope(current_traceparent).and_then(|s| parse_traceparent(&s)).unwrap();
            assert_ne!(sent.trace_id().to_string(), TRACE);
        });
    }

    #[test]
    fn every_delivery_of_a_message_shares_one_trace() {
        let first = message_trace_root("1234567890");
        let again = message_trace_root("1234567890");
        let other = message_trace_root("1234567891");
        assert_eq!(first, again);
        assert_ne!(first.trace_id(), other.trace_id());
        assert!(first.is_valid() && first.is_remote() && first.is_sampled());
    }

    #[test]
    fn cloud_run_s_header_names_its_span_in_decimal() {
        let remote = parse_cloud_trace(&format!("{TRACE}/1;o=1")).expect("a valid header");
        assert_eq!(remote.trace_id().to_string(), TRACE);
        assert_eq!(remote.span_id().to_string(), "0000000000000001");
        assert!(remote.is_sampled() && remote.is_remote());

        let unsampled = parse_cloud_trace(&format!("{TRACE}/18446744073709551615")).unwrap();
        assert_eq!(unsampled.span_id().to_string(), "ffffffffffffffff");
        assert!(!unsampled.is_sampled());

        for bad in [TRACE.to_owned(), format!("{TRACE}/x;o=1"), format!("{TRACE}/0;o=1"), "abc/1".to_owned()]
        {
            assert_eq!(parse_cloud_trace(&bad), None, "{bad:?}");
        }
    }
}
