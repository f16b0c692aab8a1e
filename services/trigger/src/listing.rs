//! Requests as `GET /v1/requests` lists them: newest first, filtered by state, class and labels,
//! a page at a time, each with its recipients by outcome.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use haishin_shared::domain::{Class, RequestId, RequestState};
use haishin_shared::store::{Outcomes, Result, Store};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder};

/// Requests one page holds when the caller does not say.
pub const DEFAULT_PAGE: i64 = 50;
/// Most requests one page holds.
pub const MAX_PAGE: i64 = 500;

/// Which requests to list. Empty lists filter nothing, except that rejected requests are listed
/// only when `states` names `rejected` (they never entered the pipeline; `GET /v1/rejections`
/// lists them with the rest of what was refused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Any of these states.
    pub states: Vec<RequestState>,
    /// Any of these classes.
    pub classes: Vec<Class>,
    /// All of these labels, each with this value.
    pub labels: BTreeMap<String, String>,
}

/// One request, in short: what it is, where it stands, and its recipients by outcome.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RequestSummary {
    pub id: RequestId,
    pub class: Class,
    pub priority: i32,
    pub state: RequestState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub labels: Value,
    pub deadline: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    #[sqlx(skip)]
    pub recipients: Recipients,
    #[serde(skip)]
    total: Option<i64>,
}

/// A request's recipients: `total = pending + in_flight + sent + failed + expired + cancelled +
/// unknown + suppressed` once it is prepared (`total` is null before), the request log's accounting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recipients {
    pub total: Option<i64>,
    #[serde(flatten)]
    pub outcomes: Outcomes,
}

/// A page of requests, and the token of the next one.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub requests: Vec<RequestSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Where a page starts: after this request, in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    received_at: DateTime<Utc>,
    id: RequestId,
}

impl Cursor {
    /// Reads a `next_page_token`; `None` for one this service never wrote.
    pub fn parse(token: &str) -> Option<Self> {
        let (micros, id) = token.split_once('.')?;
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c);
        if id.is_empty() || !id.chars().all(valid) {
            return None;
        }
        let received_at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
        Some(Self { received_at, id: RequestId::from(id) })
    }

    /// The token: the time in microseconds (the database's precision) and the id, both URL-safe.
    fn token(&self) -> String {
        format!("{}.{}", self.received_at.timestamp_micros(), self.id)
    }
}

/// Up to `page_size` requests that pass `filter`, after `after`, newest first.
pub async fn list(store: &Store, filter: &Filter, page_size: i64, after: Option<&Cursor>) -> Result<Page> {
    let page_size = page_size.clamp(1, MAX_PAGE);
    // Only the conditions asked for, so that each query is planned for what it filters.
    let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT id, class, priority, state, reason, labels, deadline, received_at, finished_at,
                paused_at, pause_reason, cancel_requested_at, recipients AS total
         FROM requests WHERE ",
    );
    if filter.states.is_empty() {
        query.push("state <> 'rejected'");
    } else {
        query.push("state = ANY(").push_bind(&filter.states).push(")");
    }
    if !filter.classes.is_empty() {
        query.push(" AND class = ANY(").push_bind(&filter.classes).push(")");
    }
    if !filter.labels.is_empty() {
        let labels = serde_json::to_value(&filter.labels).unwrap_or_default();
        query.push(" AND labels @> ").push_bind(labels);
    }
    if let Some(cursor) = after {
        query.push(" AND (received_at, id) < (").push_bind(cursor.received_at);
        query.push(", ").push_bind(&cursor.id).push(")");
    }
    query.push(" ORDER BY received_at DESC, id DESC LIMIT ").push_bind(page_size + 1);
    let mut requests: Vec<RequestSummary> = query.build_query_as().fetch_all(store.pool()).await?;
    let next_page_token = if requests.len() as i64 > page_size {
        requests.truncate(page_size as usize);
        requests.last().map(|last| Cursor { received_at: last.received_at, id: last.id.clone() }.token())
    } else {
        None
    };
    let ids: Vec<RequestId> = requests.iter().map(|r| r.id.clone()).collect();
    let totals = store.chunk_totals_of(&ids).await?;
    for request in &mut requests {
        let outcomes = totals.get(&request.id).map(Outcomes::of).unwrap_or_default();
        request.recipients = Recipients { total: request.total, outcomes };
    }
    Ok(Page { requests, next_page_token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_reads_back_and_a_forged_one_is_refused() {
        let cursor = Cursor {
            received_at: DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
            id: RequestId::from("order.1:b"),
        };
        assert_eq!(Cursor::parse(&cursor.token()), Some(cursor));
        for forged in ["not a token", "12.", "x.id", "12.a b", "12.a/b"] {
            assert_eq!(Cursor::parse(forged), None, "{forged}");
        }
    }
}
