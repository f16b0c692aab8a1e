//! What the provider's webhooks reported of a request's messages after they were handed over
//! (the `feedback` table; the trigger's feedback routes write it).

use std::collections::HashMap;

use crate::domain::RequestId;

use super::{Result, Store};

/// A request's bounces and complaints as the provider's webhooks reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct FeedbackCounts {
    /// Hard bounces: the address does not exist (it is suppressed).
    pub bounced: i64,
    /// Soft bounces: the mailbox refused the message for now (full, blocked); not suppressed.
    pub soft_bounced: i64,
    /// Recipients who marked the message as spam (they are suppressed).
    pub complained: i64,
}

impl Store {
    /// The feedback the provider reported for `request`'s messages.
    pub async fn feedback_counts(&self, request: &RequestId) -> Result<FeedbackCounts> {
        let mut of = self.feedback_counts_of(std::slice::from_ref(request)).await?;
        Ok(of.remove(request).unwrap_or_default())
    }

    /// [`Store::feedback_counts`] of several requests, with one query (a request without
    /// feedback is absent).
    pub async fn feedback_counts_of(
        &self,
        requests: &[RequestId],
    ) -> Result<HashMap<RequestId, FeedbackCounts>> {
        let ids: Vec<&str> = requests.iter().map(RequestId::as_str).collect();
        let rows: Vec<(RequestId, i64, i64, i64)> = sqlx::query_as(
            "SELECT request_id, count(*) FILTER (WHERE kind = 'bounce'),
                    count(*) FILTER (WHERE kind = 'soft_bounce'), count(*) FILTER (WHERE kind = 'complaint')
               FROM feedback WHERE request_id = ANY($1) GROUP BY request_id",
        )
        .bind(&ids)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, bounced, soft_bounced, complained)| {
                (id, FeedbackCounts { bounced, soft_bounced, complained })
            })
            .collect())
    }
}
