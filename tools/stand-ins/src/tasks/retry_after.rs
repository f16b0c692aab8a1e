//! The `Retry-After` header of a throttling answer (RFC 9110, section 10.2.3).

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

/// The longest `Retry-After` honoured: Cloud Tasks' default `max_backoff`, an hour.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The wait a `Retry-After` value asks for, counted from `now`, at most [`MAX_RETRY_AFTER`];
/// `None` when the value is neither delay-seconds nor an HTTP date.
///
/// A date in the past asks for no wait. All three date forms HTTP recipients must accept are
/// read: IMF-fixdate, RFC 850 and asctime.
pub(super) fn parse(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a long time".
        let seconds = value.parse().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at = http_date(value)?;
    Some((at - now).to_std().unwrap_or_default().min(MAX_RETRY_AFTER))
}

/// An HTTP date in any of its three forms.
fn http_date(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc2822(value) {
        return Some(at.to_utc());
    }
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(value, format).ok())
        .map(|naive| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("1994-11-06T08:49:00Z").unwrap().to_utc()
    }

    #[test]
    fn delay_seconds_are_read_and_capped() {
        assert_eq!(parse("120", now()), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 ", now()), Some(Duration::ZERO));
        assert_eq!(parse("86400", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("99999999999999999999999", now()), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn http_dates_in_all_three_forms_count_from_now() {
        let expected = Some(Duration::from_secs(37));
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT", now()), expected);
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT", now()), expected);
        assert_eq!(parse("Sun Nov  6 08:49:37 1994", now()), expected);
    }

    #[test]
    fn a_past_date_asks_for_no_wait_and_garbage_for_nothing() {
        assert_eq!(parse("Sun, 06 Nov 1994 08:00:00 GMT", now()), Some(Duration::ZERO));
        assert_eq!(parse("soon", now()), None);
        assert_eq!(parse("-5", now()), None);
        assert_eq!(parse("1.5", now()), None);
        assert_eq!(parse("", now()), None);
    }
}
