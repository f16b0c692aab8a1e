//! The kill switch: a request that bounces or draws complaints too much is paused.
//!
//! After each poll, every request still open (not final, not paused, not being cancelled) is
//! judged on its `completed` chunks: once they hold at least `min_sample` recipients handed to
//! the provider with an outcome (delivered or bounced), it is paused when
//! - its bounce rate, the list-based ESP's bounces and the hard bounces the provider's webhooks
//!   reported over that sample, reaches `bounce_rate`, or
//! - its complaint rate, the spam complaints the webhooks reported over that sample, reaches
//!   `complaint_rate`,
//!
//! with the figures in `pause_reason`. The pause is one guarded `UPDATE` that never overwrites a
//! pause already there (an operator's), taken under the dispatch lock as the API's pause is, so no
//! dispatch round under way sends more of it.
//!
//! An operator resumes it with `:resume`, which records `resumed_at`: from then on only chunks
//! finished and reports received after the resume count, so the sample that paused it cannot
//! pause it again at once; a fresh `min_sample` recipients at the same rate would.

use haishin_shared::domain::RequestId;
use haishin_shared::store::{Result, Store};

use crate::PassReport;

/// The thresholds; a rate of 0 turns its half of the kill switch off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KillSwitch {
    /// The share of bounces (0 to 1) that pauses a request.
    pub bounce_rate: f64,
    /// The share of spam complaints (0 to 1) that pauses a request.
    pub complaint_rate: f64,
    /// Recipients with an outcome a request needs before its rates are judged.
    pub min_sample: u64,
}

/// The message of the warning logged for each pause; a log-based metric counts it.
pub const PAUSED_MESSAGE: &str = "Request paused by the kill switch.";

/// The open requests with enough of a sample since their last resume, with their counts: the
/// sample, bounces (the ESP's and the webhooks') and complaints. A rate of 0 never matches.
const OVER_THRESHOLD: &str = "WITH open AS (
         SELECT id, resumed_at FROM requests
          WHERE state IN ('received', 'preparing', 'dispatching')
            AND paused_at IS NULL AND cancel_requested_at IS NULL),
     sent AS (
         SELECT o.id, sum(c.delivered + c.bounced)::BIGINT AS sample, sum(c.bounced)::BIGINT AS bounced
           FROM open o JOIN chunks c ON c.request_id = o.id
          WHERE c.state = 'completed' AND c.delivered IS NOT NULL AND c.bounced IS NOT NULL
            AND (o.resumed_at IS NULL OR c.finished_at > o.resumed_at)
          GROUP BY o.id),
     reported AS (
         SELECT o.id, count(*) FILTER (WHERE f.kind = 'bounce') AS bounced,
                count(*) FILTER (WHERE f.kind = 'complaint') AS complained
           FROM open o JOIN feedback f ON f.request_id = o.id
          WHERE o.resumed_at IS NULL OR f.received_at > o.resumed_at
          GROUP BY o.id)
     SELECT s.id, s.sample, s.bounced + coalesce(r.bounced, 0), coalesce(r.complained, 0)
       FROM sent s LEFT JOIN reported r USING (id)
      WHERE s.sample >= $1
        AND (($2 > 0 AND (s.bounced + coalesce(r.bounced, 0))::FLOAT8 / s.sample >= $2)
          OR ($3 > 0 AND coalesce(r.complained, 0)::FLOAT8 / s.sample >= $3))";

/// Pauses every open request over a threshold, counting them in `report.killed_requests`.
pub(crate) async fn check(store: &Store, switch: KillSwitch, report: &mut PassReport) -> Result<()> {
    if switch.bounce_rate <= 0.0 && switch.complaint_rate <= 0.0 {
        return Ok(());
    }
    let over: Vec<(RequestId, i64, i64, i64)> = sqlx::query_as(OVER_THRESHOLD)
        .bind(switch.min_sample.max(1) as i64)
        .bind(switch.bounce_rate)
        .bind(switch.complaint_rate)
        .fetch_all(store.pool())
        .await?;
    for (id, sample, bounced, complained) in over {
        let sample = sample.max(1) as u64;
        let bounce_rate = bounced as f64 / sample as f64;
        let complaint_rate = complained as f64 / sample as f64;
        let reason = if switch.bounce_rate > 0.0 && bounce_rate >= switch.bounce_rate {
            reason("bounce", bounce_rate, switch.bounce_rate, sample)
        } else {
            reason("complaint", complaint_rate, switch.complaint_rate, sample)
        };
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
            tracing::warn!(request_id = %id, bounce_rate, complaint_rate, sample, %reason, "{PAUSED_MESSAGE}");
        }
    }
    Ok(())
}

/// `kill switch: bounce rate 9.8% over 5.0% after 2,000 recipients`.
fn reason(what: &str, rate: f64, threshold: f64, sample: u64) -> String {
    format!(
        "kill switch: {what} rate {:.1}% over {:.1}% after {} recipients",
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

/// A share between 0 and 1, as `KILL_SWITCH_BOUNCE_RATE` and `KILL_SWITCH_COMPLAINT_RATE` take it.
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
            reason("bounce", 0.098, 0.05, 2_000),
            "kill switch: bounce rate 9.8% over 5.0% after 2,000 recipients"
        );
        assert_eq!(
            reason("complaint", 0.004, 0.003, 1_000),
            "kill switch: complaint rate 0.4% over 0.3% after 1,000 recipients"
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
