//! Guided self-scheduling at the tail of the batch work, paced by the provider itself.
//!
//! Once every batch request is prepared and the pending work is down to a few chunks per slot,
//! the chunk about to be dispatched is cut so that its slot ends when the others do: the pending
//! recipients poured over the slots, each from the moment its chunk in flight should end, at the
//! pace the provider has shown on this run's chunks (a fixed cost per call and a cost per
//! recipient, fitted to the chunks done from the start of their upload; until a few are, a
//! chunk's time is its recipients and every chunk in flight has all its work ahead). A chunk
//! prefetched into the upload queue starts on the first slot to free. Pieces are at least `min_part`, and the rest of
//! the chunk's lines stay pending as a chunk of their own (own id, task name and ESP keys, same
//! object). Pieces shrink as the work runs out, so the slots run dry together instead of some
//! idling while a few full chunks finish. A chunk that was ever dispatched keeps its range: the
//! ESP may hold a list under its key.
//!
//! With a list-based ESP, each list's send follows its upload, and the campaign ends with the
//! last send. When more slots would end together than the ESP can start sends for (its send
//! slots less those realtime traffic holds), the last send would wait for one of them; so the
//! slots beyond that end a send's time earlier, their sends done before the others' start.

mod pace;

use haishin_shared::domain::{ChunkId, Class, RequestId};
use haishin_shared::esp::Shape;
use haishin_shared::store::Result;
use pace::Pace;
use sqlx::{Postgres, Transaction};

use super::{ELIGIBLE, NEXT_PENDING};

/// How the tail of the batch work is cut: over `slots` of `shape`'s bottleneck API, into pieces
/// of at least `min_part`; with a list-based ESP, whose `send_slots` send calls follow the uploads.
#[derive(Debug, Clone, Copy)]
pub(super) struct TailSplit {
    pub(super) slots: u32,
    pub(super) min_part: u32,
    pub(super) shape: Shape,
    pub(super) send_slots: u32,
}

/// Cuts the next chunk of `class` in two when the tail has been reached.
pub(super) async fn cut_next(
    tx: &mut Transaction<'_, Postgres>,
    class: Class,
    split: TailSplit,
) -> Result<()> {
    if split.min_part == 0 || split.slots < 2 {
        return Ok(());
    }
    // The next chunk first: most rounds (a realtime flood's) have no batch chunk pending at all.
    let next: Option<(ChunkId, RequestId, i32, i32, i32)> =
        sqlx::query_as(&NEXT_PENDING).bind(class).fetch_optional(&mut **tx).await?;
    let Some((id, request_id, first_line, recipients, generation)) = next else { return Ok(()) };
    let (preparing, pending): (bool, i64) = sqlx::query_as(&format!(
        "SELECT EXISTS (SELECT 1 FROM requests
                        WHERE class = $1 AND state IN ('received', 'preparing')
                          AND paused_at IS NULL AND cancel_requested_at IS NULL
                          AND (not_before IS NULL OR not_before <= now())),
                (SELECT coalesce(sum(c.recipients), 0) FROM chunks c JOIN requests r ON r.id = c.request_id
                 WHERE {ELIGIBLE})"
    ))
    .bind(class)
    .fetch_one(&mut **tx)
    .await?;
    if preparing || pending == 0 {
        return Ok(());
    }
    let (slots, min_part) = (u64::from(split.slots), u64::from(split.min_part));
    // A piece is never less than an even share of the slots: while that is the whole chunk,
    // nothing is cut, and nothing more is read.
    let even = (pending as u64).div_ceil(slots).max(min_part);
    if generation > 0 || (recipients as u64) < even + min_part {
        return Ok(());
    }
    let (pace, in_flight) = Pace::of_run(tx, class, split.shape).await?;
    let room = match split.shape {
        Shape::Lists => SendRoom::of_run(tx, class, split.send_slots).await?,
        Shape::Messages => None,
    };
    let piece = pace.piece(pending as u64, &in_flight, split.slots, split.min_part, room);
    tracing::debug!(?pace, ?room, in_flight = in_flight.len(), pending, piece, "Tail piece paced.");
    let head = piece.max(min_part);
    if (recipients as u64) < head + min_part {
        return Ok(());
    }
    let head = head as i32;
    sqlx::query("UPDATE chunks SET recipients = $2 WHERE id = $1")
        .bind(&id)
        .bind(head)
        .execute(&mut **tx)
        .await?;
    let seq: i32 = sqlx::query_scalar(
        "UPDATE requests SET chunk_count = chunk_count + 1 WHERE id = $1
         RETURNING (SELECT max(seq) + 1 FROM chunks WHERE request_id = $1)",
    )
    .bind(&request_id)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO chunks (id, request_id, seq, class, priority, deadline, state, object, lines, first_line, recipients)
         SELECT $2, request_id, $3, class, priority, deadline, 'pending', object, lines, $4, $5
         FROM chunks WHERE id = $1",
    )
    .bind(&id)
    .bind(ChunkId::new(&request_id, seq as u32))
    .bind(seq)
    .bind(first_line + head)
    .bind(recipients - head)
    .execute(&mut **tx)
    .await?;
    tracing::debug!(request_id = %request_id, chunk = %id, recipients = head, rest = recipients - head, "Tail chunk cut.");
    Ok(())
}

/// The sends that follow the last uploads: how many calls the ESP can start at once for them,
/// and how long each holds its send slot, from the end of its list's upload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct SendRoom {
    pub(super) calls: usize,
    pub(super) seconds: f64,
}

impl SendRoom {
    /// The room for the sends of `class` on this run: a send's time, the shortest from upload
    /// to send among the latest chunks sent; the calls, the ESP's `send_slots` less those that
    /// realtime traffic holds on average (its requests of the last two seconds, each a call of
    /// about that time), and never less than one. `None` until a chunk has been sent.
    async fn of_run(
        tx: &mut Transaction<'_, Postgres>,
        class: Class,
        send_slots: u32,
    ) -> Result<Option<Self>> {
        let (seconds, realtime): (Option<f64>, i64) = sqlx::query_as(
            "SELECT (SELECT min(extract(epoch FROM sent_at - uploaded_at))::float8
                     FROM (SELECT c.sent_at, c.uploaded_at FROM chunks c JOIN requests r ON r.id = c.request_id
                           WHERE r.state = 'dispatching' AND c.class = $1
                             AND c.sent_at IS NOT NULL AND c.uploaded_at IS NOT NULL
                           ORDER BY c.sent_at DESC LIMIT 64) AS sent),
                    (SELECT count(*) FROM requests
                     WHERE class = 'realtime' AND received_at > now() - interval '2 seconds')",
        )
        .bind(class)
        .fetch_one(&mut **tx)
        .await?;
        Ok(seconds.filter(|&s| s > 0.0).map(|seconds| Self::of(send_slots, realtime as f64 / 2.0, seconds)))
    }

    /// Whether more slots would end together at `end` than sends can start: the `sharing`
    /// slots that share the pending work, and those `after` them whose chunk ends while the
    /// last sends would run (more than half a send before `end`, a chunk's send is mostly done;
    /// those are the slots that ended early already, and no more than the calls do).
    fn crowded(self, end: f64, after: &[f64], sharing: usize) -> bool {
        let half = self.seconds / 2.0;
        let ending = after.iter().filter(|&&free| free > end - half && free < end + self.seconds).count();
        let early = after.iter().filter(|&&free| free > end - 3.0 * half && free <= end - half).count();
        sharing + ending > self.calls && early < self.calls
    }

    /// The room left by realtime traffic of `rate` requests a second, with sends of `seconds`.
    fn of(send_slots: u32, rate: f64, seconds: f64) -> Self {
        let held = (rate * seconds).ceil() as usize;
        Self { calls: (send_slots as usize).saturating_sub(held).max(1), seconds }
    }
}

#[cfg(test)]
mod tests {
    use super::SendRoom;

    #[test]
    fn realtime_traffic_holds_its_rate_times_a_send_of_the_send_slots() {
        assert_eq!(SendRoom::of(8, 0.0, 0.16).calls, 8);
        assert_eq!(SendRoom::of(8, 5.0, 0.16).calls, 7, "a call of 0.16 s every 0.2 s");
        assert_eq!(SendRoom::of(8, 20.0, 0.16).calls, 4);
        assert_eq!(SendRoom::of(8, 1_000.0, 0.16).calls, 1, "a flood leaves the batch one");
    }
}
