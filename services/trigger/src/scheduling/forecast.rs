//! When a request's uploads should end, from the pipeline's pace over the last minute and the
//! chunks that go before or alongside this request's: higher rank first (the scheduling rule's
//! own [`rank`](super::rank)), equals taking turns. Paused and cancelled requests' chunks go
//! before nobody; a paused request itself has no end to forecast until it is resumed.

use chrono::{DateTime, Utc};
use haishin_shared::store::{RequestRow, Result, Store, request_columns};
use serde::Serialize;

use super::rank;

/// A request's expected end of uploads.
#[derive(Debug, Clone, Serialize)]
pub struct Forecast {
    /// This request's chunks not yet uploaded.
    pub chunks_left: i64,
    /// Other requests' chunks that will be uploaded before this request's last one.
    pub chunks_ahead: i64,
    /// Chunks uploaded in the last minute, all requests together.
    pub uploads_last_minute: i64,
    /// `None` while the pace is unknown (nothing uploaded in the last minute).
    pub uploads_done_by: Option<DateTime<Utc>>,
    /// True when `uploads_done_by` is later than the deadline: the request will partly expire
    /// unless throughput rises.
    pub deadline_at_risk: bool,
    /// True while the request is paused: none of its chunks is dispatched, so no end is forecast
    /// (`uploads_done_by` is null, `deadline_at_risk` false) until it is resumed. Its pending
    /// chunks still expire at the deadline.
    pub paused: bool,
}

/// The forecast of a request still being uploaded; `None` once nothing of it is left to upload,
/// and for a cancelled one.
pub async fn forecast(store: &Store, request: &RequestRow) -> Result<Option<Forecast>> {
    if request.cancel_requested_at.is_some() {
        return Ok(None);
    }
    let sql = format!(
        "WITH me AS (
             SELECT {me} AS rank FROM requests r WHERE r.id = $1
         ), own AS (
             SELECT count(*) AS n FROM chunks
             WHERE request_id = $1 AND state IN ('pending', 'queued', 'uploading')
         ), others AS (
             SELECT c.request_id, count(*) AS n,
                    bool_or({chunk} < me.rank) AS higher, bool_or({chunk} = me.rank) AS equal
             FROM chunks c JOIN requests o ON o.id = c.request_id, me
             WHERE c.state = 'pending' AND c.request_id <> $1
               AND o.paused_at IS NULL AND o.cancel_requested_at IS NULL
             GROUP BY c.request_id
         )
         SELECT own.n,
                coalesce(sum(CASE WHEN others.higher THEN others.n
                                  WHEN others.equal THEN least(others.n, own.n) ELSE 0 END), 0)::bigint,
                (SELECT count(*) FROM chunks WHERE uploaded_at > now() - interval '60 seconds')
         FROM own LEFT JOIN others ON true GROUP BY own.n",
        me = rank("r"),
        chunk = rank("c"),
    );
    let (left, ahead, pace): (i64, i64, i64) =
        sqlx::query_as(&sql).bind(&request.id).fetch_one(store.pool()).await?;
    if left == 0 {
        return Ok(None);
    }
    let paused = request.paused_at.is_some();
    let done_by = (pace > 0 && !paused).then(|| {
        let seconds = (left + ahead) as f64 * 60.0 / pace as f64;
        Utc::now() + chrono::Duration::milliseconds((seconds * 1000.0) as i64)
    });
    let at_risk = matches!((done_by, request.deadline), (Some(done), Some(deadline)) if done > deadline);
    Ok(Some(Forecast {
        chunks_left: left,
        chunks_ahead: ahead,
        uploads_last_minute: pace,
        uploads_done_by: done_by,
        deadline_at_risk: at_risk,
        paused,
    }))
}

/// Requests still being dispatched that will miss their deadline at the current pace (at most
/// `limit`, earliest deadline first), with their forecasts. Paused requests are not among them:
/// someone paused them on purpose.
pub async fn at_risk(store: &Store, limit: i64) -> Result<Vec<(RequestRow, Forecast)>> {
    let sql = format!(
        "SELECT {} FROM requests WHERE state IN ('preparing', 'dispatching') AND deadline IS NOT NULL
           AND paused_at IS NULL AND cancel_requested_at IS NULL
         ORDER BY deadline LIMIT $1",
        request_columns(None)
    );
    let open: Vec<RequestRow> = sqlx::query_as(&sql).bind(limit).fetch_all(store.pool()).await?;
    let mut risky = Vec::new();
    for request in open {
        if let Some(forecast) = forecast(store, &request).await?
            && forecast.deadline_at_risk
        {
            risky.push((request, forecast));
        }
    }
    Ok(risky)
}
