//! What `haishin watch` shows of a request: how many recipients have their outcome, at what rate,
//! and when it should end (the trigger's forecast, or the observed rate when it has none).

use chrono::{DateTime, Utc};
use serde_json::Value;

/// Chunk states whose recipients have been handed to the provider or have their outcome.
const DONE: [&str; 6] = ["sent", "completed", "failed", "expired", "cancelled", "unknown"];

/// One reading of a request's status.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub at: DateTime<Utc>,
    pub class: String,
    pub state: String,
    /// Recipients kept after validation (0 until the audience is prepared).
    pub total: u64,
    /// Of those, recipients handed over or finished.
    pub done: u64,
    pub paused: bool,
    /// When the trigger forecasts the request's last upload, if it does.
    pub forecast_end: Option<DateTime<Utc>>,
    pub deadline_at_risk: bool,
}

impl Reading {
    /// Reads a status as `GET /v1/requests/{id}` answers it.
    pub fn of(status: &Value, at: DateTime<Utc>) -> Self {
        let number = |v: &Value| v.as_u64().unwrap_or(0);
        let by_state = status["recipients"].as_object();
        let done = by_state.map_or(0, |m| DONE.iter().map(|s| m.get(*s).map_or(0, number)).sum());
        let time = |v: &Value| v.as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok());
        Self {
            at,
            class: status["class"].as_str().unwrap_or("?").to_owned(),
            state: status["state"].as_str().unwrap_or("?").to_owned(),
            total: number(&status["audience"]["recipients"]),
            done,
            paused: !status["paused_at"].is_null() || status["forecast"]["paused"] == true,
            forecast_end: time(&status["forecast"]["uploads_done_by"]),
            deadline_at_risk: status["forecast"]["deadline_at_risk"] == true,
        }
    }

    /// True once the request is in a final state.
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "expired" | "cancelled" | "rejected")
    }

    /// Recipients a second between two readings.
    pub fn rate_since(&self, earlier: &Reading) -> Option<f64> {
        let seconds = (self.at - earlier.at).as_seconds_f64();
        (seconds > 0.0).then(|| self.done.saturating_sub(earlier.done) as f64 / seconds)
    }

    /// When the request should end: the trigger's forecast, or what is left at `rate`.
    pub fn eta(&self, rate: Option<f64>) -> Option<DateTime<Utc>> {
        if self.paused || self.finished() {
            return None;
        }
        self.forecast_end.or_else(|| {
            let rate = rate.filter(|r| *r > 0.0)?;
            let left = self.total.saturating_sub(self.done) as f64;
            Some(self.at + chrono::Duration::milliseconds((left / rate * 1000.0) as i64))
        })
    }

    /// One line beside the bar: state, rate and ETA.
    pub fn message(&self, rate: Option<f64>) -> String {
        let mut parts = vec![self.state.clone()];
        if self.paused {
            parts.push("paused".into());
        }
        if let Some(rate) = rate {
            parts.push(format!("{rate:.0}/s"));
        }
        if let Some(eta) = self.eta(rate) {
            let left = (eta - self.at).num_seconds().max(0);
            parts.push(format!("ETA {}m{:02}s", left / 60, left % 60));
        }
        if self.deadline_at_risk {
            parts.push("deadline at risk".into());
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn a_reading_counts_what_is_handed_over_and_estimates_the_rest() {
        let status = |done: u64| {
            json!({"class": "batch", "state": "dispatching", "audience": {"recipients": 1000},
                   "recipients": {"pending": 1000 - done, "completed": done}, "forecast": {"paused": false}})
        };
        let first = Reading::of(&status(100), at(0));
        let second = Reading::of(&status(300), at(10));
        let rate = second.rate_since(&first);
        assert_eq!(rate, Some(20.0));
        assert_eq!(second.eta(rate), Some(at(45)), "700 left at 20/s");
        assert_eq!(second.message(rate), "dispatching, 20/s, ETA 0m35s");
    }

    #[test]
    fn a_forecast_wins_and_a_paused_request_has_no_eta() {
        let status = json!({"class": "batch", "state": "dispatching", "audience": {"recipients": 10},
            "recipients": {"pending": 10}, "forecast": {"uploads_done_by": "2027-01-15T08:00:00Z", "paused": false}});
        let reading = Reading::of(&status, at(0));
        assert_eq!(reading.eta(Some(1.0)), "2027-01-15T08:00:00Z".parse().ok());
        let paused = json!({"class": "batch", "state": "dispatching", "paused_at": "2027-01-15T07:00:00Z",
            "audience": {"recipients": 10}, "recipients": {"pending": 10}});
        let reading = Reading::of(&paused, at(0));
        assert!(reading.paused && reading.eta(Some(1.0)).is_none());
        assert_eq!(reading.message(None), "dispatching, paused");
    }
}
