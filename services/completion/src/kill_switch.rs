//! The kill switch: a request whose bounce rate crosses the threshold is paused.
//!
//! After each poll, every request still open (not final, not paused, not being cancelled) is
//! judged on its `completed` chunks: once they hold at least `min_sample` recipients with an
//! outcome (delivered or bounced), a bounce rate `bounced / (delivered + bounced)` at or over
//! `bounce_rate` pauses it, with the figures in `pause_reason`. The pause is one guarded
//! `UPDATE` that never overwrites a pause already there (an operator's), taken under the dispatch
//! lock as the API's pause is, so no dispatch round under way sends more of it.
//!
//! An operator resumes it with `:resume`, which records `resumed_at`: from then on only chunks
//! finished after the resume count, so the sample that paused it cannot pause it again at once;
//! a fresh `min_sample` recipients at the same rate would.
//!
//! Complaints are not reported by any provider yet, so there is no complaint threshold.

use haishin_shared::domain::RequestId;
use haishin_shared::store::{Result, Store};

use crate::PassReport;

/// The thresholds; a `bounce_rate` of 0 turns the kill switch off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KillSwitch {
    /// The share of bounces (0 to 1) that pauses a request.
    pub bounce_rate: f64,
    /// Recipients with an outcome a request needs before its rate is judged.
    pub min_sample: u64,
}

/// The message of the warning logged for each pause; a log-based metric counts it.
pub const PAUSED_MESSAGE: &str = "Request paused by the kill switch.";

/// The open requests over the threshold, with their counts since the last resume.
const OVER_THRESHOLD: &str = "SELECT r.id, sum(c.delivered)::BIGINT, sum(c.bounced)::BIGINT
     FROM requests r JOIN chunks c ON c.request_id = r.id
     WHERE r.state IN ('received', 'preparing', 'dispatching')
       AND r.paused_at IS NULL AND r.cancel_requested_at IS NULL
       AND c.state = 'completed' AND c.delivered IS NOT NULL AND c.bounced IS NOT NULL
       AND (r.resumed_at IS NULL OR c.finished_at > r.resumed_at)
     GROUP BY r.id
     HAVING sum(c.delivered + c.bounced) >= $1
        AND sum(c.bounced)::FLOAT8 / sum(c.delivered + c.bounced) >= $2";

/// Pauses every open request over the threshold, counting them in `report.killed_requests`.
pub(crate) async fn check(store: &Store, switch: KillSwitch, report: &mut PassReport) -> Result<()> {
    if switch.bounce_rate <= 0.0 {
        return Ok(());
    }
    let over: Vec<(RequestId, i64, i64)> = sqlx::query_as(OVER_THRESHOLD)
        .bind(switch.min_sample.max(1) as i64)
        .bind(switch.bounce_rate)
        .fetch_all(store.pool())
        .await?;
    for (id, delivered, bounced) in over {
        let sample = (delivered + bounced) as u64;
        let rate = bounced as f64 / sample as f64;
        let reason = reason(rate, switch.bounce_rate, sample);
        let mut tx = store.pool().begin().await?;
        // The dispatch lock, as the API's pause takes it (see the trigger's `control.rs`).
        sqlx::query("SELECT api FROM dispatch_slots WHERE api = 'upload' FOR UPDATE")
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(
            "UPDATE requests SET paused_at = now(), pause_reason = $2
             WHERE id = $1 AND paused_at IS NULL AND cancel_requested_at IS NULL
               AND state IN ('received', 'preparing', 'dispatching')",
        )
        .bind(&id)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if done.rows_affected() == 1 {
            report.killed_requests += 1;
            tracing::warn!(request_id = %id, rate, threshold = switch.bounce_rate, sample, "{PAUSED_MESSAGE}");
        }
    }
    Ok(())
}

/// `kill switch: bounce rate 9.8% over 5.0% after 2,000 recipients`.
fn reason(rate: f64, threshold: f64, sample: u64) -> String {
    format!(
        "kill switch: bounce rate {:.1}% over {:.1}% after {} recipients",
        rate * 100.0,
        threshold * 100.0,
        thousands(sample)
    )
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// A share between 0 and 1, as `KILL_SWITCH_BOUNCE_RATE` takes it.
pub(crate) fn parse_rate(text: &str) -> std::result::Result<f64, String> {
    let rate: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&rate) { Ok(rate) } else { Err(format!("{rate} is not between 0 and 1")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_gives_the_figures() {
        assert_eq!(
            reason(0.098, 0.05, 2_000),
            "kill switch: bounce rate 9.8% over 5.0% after 2,000 recipients"
        );
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn a_rate_is_a_share() {
        assert_eq!(parse_rate("0.05"), Ok(0.05));
        assert_eq!(parse_rate("0"), Ok(0.0));
        assert!(parse_rate("5").is_err() && parse_rate("-0.1").is_err() && parse_rate("x").is_err());
    }
}
