//! What the provider's webhooks reported of a request's messages after they were handed over
//! (the `feedback` table; the trigger's feedback routes write it).

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
        Ok(sqlx::query_as(
            "SELECT count(*) FILTER (WHERE kind = 'bounce') AS bounced,
                    count(*) FILTER (WHERE kind = 'soft_bounce') AS soft_bounced,
                    count(*) FILTER (WHERE kind = 'complaint') AS complained
               FROM feedback WHERE request_id = $1",
        )
        .bind(request)
        .fetch_one(self.pool())
        .await?)
    }
}
