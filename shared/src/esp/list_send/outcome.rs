//! What a call of the list-send protocol came to, classified into [`EspError`]s.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde::de::DeserializeOwned;

use crate::esp::{EspError, error_chain};

/// Which call failed: it decides whether a lost answer leaves the outcome unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Upload,
    Send,
    Lookup,
    Status,
}

impl Op {
    pub(super) fn describe(self) -> &'static str {
        match self {
            Op::Upload => "list upload",
            Op::Send => "send",
            Op::Lookup => "delivery lookup",
            Op::Status => "delivery status",
        }
    }

    /// Calls that change something at the ESP: losing their answer leaves the outcome unknown.
    pub(super) fn changes_state(self) -> bool {
        matches!(self, Op::Upload | Op::Send)
    }
}

pub(super) fn encode<T: serde::Serialize>(op: Op, value: &T) -> Result<Vec<u8>, EspError> {
    serde_json::to_vec(value)
        .map_err(|e| EspError::Permanent(format!("{}: cannot encode the request: {e}", op.describe())))
}

/// Decodes a success's body. A 2xx to an upload or a send whose body makes no sense
/// still means the ESP accepted the call, so the outcome is unknown, not failed.
pub(super) fn decode<T: DeserializeOwned>(op: Op, status: StatusCode, body: &[u8]) -> Result<T, EspError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = format!("{}: unreadable {status} answer ({e}): {}", op.describe(), snippet(body));
        if op.changes_state() { EspError::Indeterminate(message) } else { EspError::Transient(message) }
    })
}

/// A call that produced no HTTP answer.
pub(super) fn transport_error(op: Op, error: &reqwest::Error) -> EspError {
    let cause = error_chain(error);
    if error.is_builder() {
        EspError::Permanent(format!("{}: cannot build the request: {cause}", op.describe()))
    } else if error.is_connect() {
        EspError::Transient(format!("{}: cannot connect to the esp: {cause}", op.describe()))
    } else if op.changes_state() {
        let what = if error.is_timeout() { "timed out" } else { "lost its connection" };
        EspError::Indeterminate(format!(
            "{} {what} after it was sent, the esp may have accepted it: {cause}",
            op.describe()
        ))
    } else {
        EspError::Transient(format!("{}: {cause}", op.describe()))
    }
}

/// A success whose body could not be read: accepted, but with no id to show for it.
pub(super) fn unread_answer(op: Op, status: StatusCode, error: &reqwest::Error) -> EspError {
    let message = format!(
        "{}: answered {status} but the answer could not be read: {}",
        op.describe(),
        error_chain(error)
    );
    if op.changes_state() { EspError::Indeterminate(message) } else { EspError::Transient(message) }
}

/// Classifies an HTTP answer that is not a success.
pub(super) fn classify_status(
    op: Op,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> EspError {
    let message = format!("{} answered {status}: {}", op.describe(), snippet(body));
    match status {
        StatusCode::TOO_MANY_REQUESTS => EspError::RateLimited {
            retry_after: headers.get(RETRY_AFTER).and_then(|v| parse_retry_after(v, now)),
        },
        // The gateway gave up waiting for the ESP, which may have gone on to accept the call.
        StatusCode::GATEWAY_TIMEOUT if op.changes_state() => EspError::Indeterminate(message),
        StatusCode::REQUEST_TIMEOUT => EspError::Transient(message),
        s if s.is_server_error() => EspError::Transient(message),
        _ => EspError::Permanent(message),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &HeaderValue, now: DateTime<Utc>) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = DateTime::parse_from_rfc2822(text).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// The start of an answer's body, for error messages.
pub(super) fn snippet(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    if body.len() > MAX { format!("{text}…") } else { text.into_owned() }
}

#[cfg(test)]
mod tests {
    use super::super::{SendAccepted, StatusBody};
    use super::*;

    fn classify(op: Op, status: u16, headers: &[(&'static str, &str)]) -> EspError {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let now = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z").unwrap().with_timezone(&Utc);
        classify_status(op, StatusCode::from_u16(status).unwrap(), &map, br#"{"error":"x"}"#, now)
    }

    #[test]
    fn a_429_is_rate_limited_with_the_delay_the_esp_asked_for() {
        assert_eq!(
            classify(Op::Send, 429, &[("retry-after", "3")]),
            EspError::RateLimited { retry_after: Some(Duration::from_secs(3)) }
        );
        assert_eq!(
            classify(Op::Upload, 429, &[("retry-after", "Sun, 01 Mar 2026 12:00:05 GMT")]),
            EspError::RateLimited { retry_after: Some(Duration::from_secs(5)) }
        );
        assert_eq!(classify(Op::Upload, 429, &[]), EspError::RateLimited { retry_after: None });
        assert_eq!(
            classify(Op::Upload, 429, &[("retry-after", "soon")]),
            EspError::RateLimited { retry_after: None }
        );
    }

    #[test]
    fn server_errors_are_transient_and_client_errors_permanent() {
        for op in [Op::Upload, Op::Send, Op::Lookup, Op::Status] {
            assert!(matches!(classify(op, 500, &[]), EspError::Transient(_)));
            assert!(matches!(classify(op, 503, &[]), EspError::Transient(_)));
            assert!(matches!(classify(op, 408, &[]), EspError::Transient(_)));
            for status in [400, 401, 403, 404, 409, 422] {
                assert!(matches!(classify(op, status, &[]), EspError::Permanent(_)), "{status}");
            }
        }
    }

    #[test]
    fn a_gateway_timeout_leaves_a_send_indeterminate_but_a_read_transient() {
        assert!(classify(Op::Send, 504, &[]).maybe_accepted());
        assert!(classify(Op::Upload, 504, &[]).maybe_accepted());
        assert!(matches!(classify(Op::Lookup, 504, &[]), EspError::Transient(_)));
    }

    #[test]
    fn an_unreadable_success_leaves_a_send_indeterminate() {
        let err = decode::<SendAccepted>(Op::Send, StatusCode::ACCEPTED, b"<html>").unwrap_err();
        assert!(err.maybe_accepted(), "{err}");
        let err = decode::<StatusBody>(Op::Status, StatusCode::OK, b"<html>").unwrap_err();
        assert!(matches!(err, EspError::Transient(_)), "{err}");
    }
}
