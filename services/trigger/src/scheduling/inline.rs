//! Small realtime chunks sent without a list: which go to the sender now, and in which send
//! calls.

use haishin_shared::domain::{ChunkId, Class, RequestId};
use haishin_shared::store::Result;
use sqlx::{Postgres, Transaction};

use super::{Dispatched, ELIGIBLE, INLINE_PER_ROUND, rank};

/// Hands the eligible realtime chunks of at most `max` recipients (most urgent first) straight
/// to `uploaded`, for the sender to send with their recipients in the call: grouped into send
/// calls ([`SendCalls`]), in no more calls than the send slots left free by the messages still
/// out. Under a flood the chunks that wait meanwhile go together, many to a call, when a message
/// comes back.
pub(super) async fn take(
    tx: &mut Transaction<'_, Postgres>,
    max: u32,
    send_slots: u32,
) -> Result<Vec<Dispatched>> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let out: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT send_group) FROM chunks
         WHERE state IN ('uploaded', 'sending') AND send_group IS NOT NULL",
    )
    .fetch_one(&mut **tx)
    .await?;
    let free = i64::from(send_slots).saturating_sub(out);
    if free <= 0 {
        return Ok(Vec::new());
    }
    static ELIGIBLE_SMALL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT c.id, c.recipients, md5((r.body -> 'template')::text) AS template
             FROM chunks c JOIN requests r ON r.id = c.request_id
             WHERE {ELIGIBLE} AND c.recipients <= $2
             ORDER BY {}, r.received_at ASC, c.seq ASC
             LIMIT $3 FOR UPDATE OF c SKIP LOCKED",
            rank("c")
        )
    });
    let candidates: Vec<(ChunkId, i32, Option<String>)> = sqlx::query_as(&ELIGIBLE_SMALL)
        .bind(Class::Realtime)
        .bind(max as i32)
        .bind(INLINE_PER_ROUND)
        .fetch_all(&mut **tx)
        .await?;
    // Each chunk's call, and the call's first chunk, which names its message.
    let mut calls = SendCalls::new(max);
    let mut leads: Vec<ChunkId> = Vec::new();
    let (mut ids, mut groups, mut placed) = (Vec::new(), Vec::new(), Vec::new());
    for (id, recipients, template) in candidates {
        let call = calls.place(template, recipients);
        if i64::from(call) >= free {
            continue;
        }
        if call as usize == leads.len() {
            leads.push(id.clone());
        }
        groups.push(leads[call as usize].clone());
        placed.push(call);
        ids.push(id);
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(sqlx::FromRow)]
    struct Moved {
        id: ChunkId,
        request_id: RequestId,
        generation: i32,
        traceparent: Option<String>,
    }
    let rows: Vec<Moved> = sqlx::query_as(
        "WITH moved AS (
             UPDATE chunks SET state = 'uploaded', queued_at = now(), uploaded_at = now(),
                 generation = chunks.generation + 1, send_group = t.send_group
             FROM unnest($1::text[], $2::text[]) AS t(id, send_group)
             WHERE chunks.id = t.id
             RETURNING chunks.id, chunks.request_id, chunks.generation
         ), per_request AS (
             SELECT request_id, count(*) AS chunks FROM moved GROUP BY request_id
         ), counted AS (
             UPDATE requests SET dispatched_chunks = dispatched_chunks + per_request.chunks,
                 last_dispatched_at = clock_timestamp()
             FROM per_request WHERE requests.id = per_request.request_id
         )
         SELECT moved.id, moved.request_id, moved.generation, requests.traceparent
         FROM moved JOIN requests ON requests.id = moved.request_id",
    )
    .bind(&ids)
    .bind(&groups)
    .fetch_all(&mut **tx)
    .await?;
    let call_of: std::collections::HashMap<&ChunkId, u32> = ids.iter().zip(placed).collect();
    Ok(rows
        .into_iter()
        .map(|row| Dispatched {
            send_call: call_of.get(&row.id).copied(),
            chunk_id: row.id,
            request_id: row.request_id,
            generation: row.generation,
            class: Class::Realtime,
            traceparent: row.traceparent,
            inline: true,
        })
        .collect())
}

/// Puts the chunks a round sends without a list into send calls: chunks whose requests share a
/// template (by its fingerprint) share a call until it carries `max` recipients.
struct SendCalls {
    max: i64,
    calls: u32,
    /// The call still open for each template, and the recipients it carries so far.
    open: std::collections::HashMap<Option<String>, (u32, i64)>,
}

impl SendCalls {
    fn new(max: u32) -> Self {
        Self { max: i64::from(max), calls: 0, open: Default::default() }
    }

    /// The call a chunk of `recipients` with this template goes in.
    fn place(&mut self, template: Option<String>, recipients: i32) -> u32 {
        let recipients = i64::from(recipients);
        if let Some((call, carried)) = self.open.get_mut(&template)
            && *carried + recipients <= self.max
        {
            *carried += recipients;
            return *call;
        }
        let call = self.calls;
        self.calls += 1;
        self.open.insert(template, (call, recipients));
        call
    }
}

#[cfg(test)]
mod tests {
    use super::SendCalls;

    #[test]
    fn chunks_sharing_a_template_share_a_call_until_it_is_full() {
        let mut calls = SendCalls::new(5);
        let (a, b) = (Some("a".to_owned()), Some("b".to_owned()));
        let placed: Vec<u32> = [(&a, 2), (&b, 1), (&a, 3), (&a, 1), (&b, 4), (&b, 1)]
            .into_iter()
            .map(|(template, n)| calls.place(template.clone(), n))
            .collect();
        // a: 2 + 3 fill call 0, its next chunk opens call 2; b: 1 + 4 fill call 1, then call 3.
        assert_eq!(placed, [0, 1, 0, 2, 1, 3]);
    }
}
