//! What was refused, newest first, as `GET /v1/rejections` lists it: requests rejected under their
//! id, and messages that could not become a request at all.

use chrono::{DateTime, Utc};
use haishin_shared::store::{Result, Store};
use serde::Serialize;

/// Most rejections one page holds.
pub const MAX_PAGE: i64 = 200;

/// One refused request or message.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Rejected {
    /// The request's id: a usable one (the request is readable at `GET /v1/requests/{id}`), or the
    /// one a message claimed when it was not usable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// True when `id` is a request's, readable through `GET /v1/requests/{id}`.
    pub request: bool,
    /// The Pub/Sub message it came in, when it came through the topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub reason: String,
    pub rejected_at: DateTime<Utc>,
    #[serde(skip)]
    key: String,
}

/// A page of rejections, and the token of the next one.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub rejections: Vec<Rejected>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Where a page starts: after this time and key, in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    at: DateTime<Utc>,
    key: String,
}

impl Cursor {
    /// Reads a `next_page_token`; `None` for one this service never wrote.
    pub fn parse(token: &str) -> Option<Self> {
        let (micros, key) = token.split_once('.')?;
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c);
        if !(key.starts_with("r:") || key.starts_with("m:")) || !key.chars().all(valid) {
            return None;
        }
        Some(Self { at: DateTime::from_timestamp_micros(micros.parse().ok()?)?, key: key.to_owned() })
    }

    /// The token: the time in microseconds and the key, both URL-safe (ids hold only
    /// `A-Za-z0-9-_.:`).
    fn token(&self) -> String {
        format!("{}.{}", self.at.timestamp_micros(), self.key)
    }
}

/// Up to `limit` rejections after `after`, newest first.
pub async fn list(store: &Store, limit: i64, after: Option<&Cursor>) -> Result<Page> {
    let limit = limit.clamp(1, MAX_PAGE);
    let (at, key) = match after {
        Some(cursor) => (Some(cursor.at), cursor.key.clone()),
        None => (None, String::new()),
    };
    let rows: Vec<Rejected> = sqlx::query_as(
        "SELECT * FROM (
             SELECT id, true AS request, NULL::text AS message_id, coalesce(reason, '') AS reason,
                    coalesce(finished_at, received_at) AS rejected_at, 'r:' || id AS key
             FROM requests WHERE state = 'rejected'
             UNION ALL
             SELECT claimed_id AS id, false AS request, message_id, reason, received_at AS rejected_at,
                    'm:' || lpad(id::text, 20, '0') AS key
             FROM rejected_messages
         ) AS rejected
         WHERE $1::timestamptz IS NULL OR (rejected_at, key) < ($1, $2)
         ORDER BY rejected_at DESC, key DESC
         LIMIT $3",
    )
    .bind(at)
    .bind(key)
    .bind(limit + 1)
    .fetch_all(store.pool())
    .await?;
    let mut rejections = rows;
    let next_page_token = if rejections.len() as i64 > limit {
        rejections.truncate(limit as usize);
        rejections.last().map(|last| Cursor { at: last.rejected_at, key: last.key.clone() }.token())
    } else {
        None
    };
    Ok(Page { rejections, next_page_token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_reads_back_and_a_forged_one_is_refused() {
        let cursor = Cursor {
            at: DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
            key: "r:order-1.b".into(),
        };
        assert_eq!(Cursor::parse(&cursor.token()), Some(cursor));
        assert_eq!(Cursor::parse("not a token"), None);
    }
}
