//! The provider's pace on a run, fitted to the chunks done, and the piece that makes a slot end
//! with the others (see the module above).

use haishin_shared::domain::Class;
use haishin_shared::esp::Shape;
use haishin_shared::store::Result;
use sqlx::{Postgres, Transaction};

use super::SendRoom;
use crate::scheduling::holding_states;

/// How long a chunk holds a slot, from its dispatch to the end of its call: `per_call` seconds
/// plus `per_recipient` seconds for each of its recipients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Pace {
    pub(super) per_call: f64,
    pub(super) per_recipient: f64,
}

/// A chunk in flight: its recipients, and the seconds since its slot's work on it began; `None`
/// for one dispatched beyond the free slots (prefetched) and still waiting in the queue.
pub(super) type InFlight = (f64, Option<f64>);

impl Pace {
    /// Chunks of requests still dispatching that the pace is fitted to: the latest this many.
    const SAMPLE: i64 = 64;

    /// The pace taken until a few chunks are done: a chunk's time is its recipients.
    const UNKNOWN: Self = Self { per_call: 0.0, per_recipient: 1.0 };

    /// The pace of the provider on the chunks of `class` done lately (fitted: a line through
    /// their times against their sizes, or, while their sizes are all alike, a time per
    /// recipient; [`Pace::UNKNOWN`] until a few chunks are done), and the chunks of `class` in
    /// flight now.
    pub(super) async fn of_run(
        tx: &mut Transaction<'_, Postgres>,
        class: Class,
        shape: Shape,
    ) -> Result<(Self, Vec<InFlight>)> {
        // Where a chunk's slot work begins and ends: its upload attempt (which a prefetched chunk
        // starts only once a slot frees), or from its dispatch to its last message handed over.
        let (began, ended, waiting) = match shape {
            Shape::Lists => {
                ("coalesce(c.upload_started_at, c.queued_at)", "uploaded_at", "c.state = 'queued'")
            }
            Shape::Messages => ("c.queued_at", "sent_at", "false"),
        };
        let (per_call, per_recipient, done, per_recipient_alone): (
            Option<f64>,
            Option<f64>,
            i64,
            Option<f64>,
        ) = sqlx::query_as(&format!(
            "SELECT regr_intercept(y, x), regr_slope(y, x), count(*), sum(y) / nullif(sum(x), 0)
                 FROM (SELECT c.recipients::float8 AS x,
                              extract(epoch FROM c.{ended} - {began})::float8 AS y
                       FROM chunks c JOIN requests r ON r.id = c.request_id
                       WHERE r.state = 'dispatching' AND c.class = $1
                         AND c.{ended} IS NOT NULL AND c.queued_at IS NOT NULL
                       ORDER BY c.{ended} DESC LIMIT {}) AS done",
            Self::SAMPLE
        ))
        .bind(class)
        .fetch_one(&mut **tx)
        .await?;
        let pace = match (per_call, per_recipient, per_recipient_alone) {
            _ if done < 3 => None,
            (Some(per_call), Some(per_recipient), _) if per_call >= 0.0 && per_recipient > 0.0 => {
                Some(Self { per_call, per_recipient })
            }
            (_, _, Some(per_recipient)) if per_recipient > 0.0 => Some(Self { per_call: 0.0, per_recipient }),
            _ => None,
        };
        let mut in_flight: Vec<InFlight> = sqlx::query_as(&format!(
            "SELECT c.recipients::float8,
                    CASE WHEN NOT ({waiting}) THEN extract(epoch FROM now() - {began})::float8 END
             FROM chunks c WHERE c.state IN ({}) AND c.class = $1 AND c.queued_at IS NOT NULL
             ORDER BY c.queued_at",
            holding_states(shape)
        ))
        .bind(class)
        .fetch_all(&mut **tx)
        .await?;
        let Some(pace) = pace else {
            // Not known yet: each chunk started is taken to have all its work ahead.
            in_flight.iter_mut().filter_map(|chunk| chunk.1.as_mut()).for_each(|since| *since = 0.0);
            return Ok((Self::UNKNOWN, in_flight));
        };
        Ok((pace, in_flight))
    }

    /// Seconds a chunk of `recipients` holds its slot.
    fn seconds(self, recipients: f64) -> f64 {
        self.per_call + self.per_recipient * recipients
    }

    /// The recipients of the piece that makes the slot about to take it end when the others
    /// do. The pending recipients are poured over the slots (the free ones, this one among them,
    /// and each chunk in flight from the moment it should end) so that every slot that gets
    /// some ends at the same moment, each new piece paying a call's fixed cost and taking at
    /// least `min_part`; a slot whose chunk ends too late for that gets none. Chunks waiting in
    /// the queue (prefetched), and then this piece, each start on the first slot to free.
    ///
    /// With `room` for the sends that follow, the slot this piece takes ends a send's time before the
    /// others when more would end together than the ESP can start sends for ([`SendRoom`]).
    pub(super) fn piece(
        self,
        pending: u64,
        in_flight: &[InFlight],
        slots: u32,
        min_part: u32,
        room: Option<SendRoom>,
    ) -> u64 {
        let free_at = self.free_at(in_flight, (slots as usize).max(1));
        let pour =
            Pour { work: self.per_recipient * pending as f64, least: self.seconds(f64::from(min_part)) };
        let (end, n) = pour.over(self, &free_at, 0.0);
        let lead = match room {
            Some(room) if n > 1 && room.crowded(end, &free_at[n..], n) => room.seconds,
            _ => 0.0,
        };
        let end = if lead > 0.0 { pour.over(self, &free_at, lead).0 } else { end };
        ((end - lead - free_at[0] - self.per_call) / self.per_recipient).ceil().clamp(1.0, pending as f64)
            as u64
    }

    /// When each of the `slots` is free for this piece, the one it takes first: now for a slot
    /// with nothing in flight, else when its chunk should end; each chunk waiting in the queue
    /// takes the first slot to free before this piece does. With more chunks started than
    /// slots (the slots granted were lowered), the first to end free no slot.
    fn free_at(self, in_flight: &[InFlight], slots: usize) -> Vec<f64> {
        let mut free_at: Vec<f64> =
            in_flight.iter().filter_map(|&(r, since)| Some((self.seconds(r) - since?).max(0.0))).collect();
        free_at.sort_by(f64::total_cmp);
        let surplus = free_at.len().saturating_sub(slots);
        free_at.drain(..surplus);
        free_at.splice(0..0, std::iter::repeat_n(0.0, slots - free_at.len()));
        for &(r, _) in in_flight.iter().filter(|chunk| chunk.1.is_none()) {
            free_at[0] += self.seconds(r);
            free_at.sort_by(f64::total_cmp);
        }
        free_at
    }
}

/// Work poured over slots: its seconds at the provider's pace, and the least a slot takes.
#[derive(Debug, Clone, Copy)]
struct Pour {
    work: f64,
    least: f64,
}

impl Pour {
    /// The first `n` slots to be free (at `free_at`, sorted) share the work, each piece paying
    /// a call's fixed cost, and all ending together but the first, `lead` seconds before the
    /// others: `n` is where the next slot would not be free in time for the least piece
    /// anyway. Returns the common end and `n`.
    fn over(self, pace: Pace, free_at: &[f64], lead: f64) -> (f64, usize) {
        let (mut end, mut before, mut n) = (f64::INFINITY, 0.0, 0);
        while n < free_at.len() {
            before += free_at[n] + pace.per_call;
            n += 1;
            end = (self.work + before + lead) / n as f64;
            if free_at.get(n).is_none_or(|&next| end <= next + self.least) {
                break;
            }
        }
        (end, n)
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;
    use crate::scheduling::tail::SendRoom;

    const PACE: Pace = Pace { per_call: 0.15, per_recipient: 0.000_15 };

    #[test]
    fn with_every_other_slot_idle_the_piece_is_an_even_share() {
        assert_eq!(PACE.piece(80_000, &[], 8, 0, None), 10_000);
    }

    #[test]
    fn a_slot_freed_while_the_others_are_busy_ends_with_them() {
        // Seven uploads of 10,000 dispatched 0.8 s ago still have 0.85 s each to go.
        let busy = [(10_000.0, Some(0.8)); 7];
        let piece = PACE.piece(40_000, &busy, 8, 0, None);
        assert!(piece > 40_000 / 8, "{piece}");
        let ends = PACE.seconds(piece as f64);
        let others = 0.85 + PACE.seconds((40_000 - piece) as f64 / 7.0);
        assert!((ends - others).abs() < 0.01, "{ends} vs {others}");
    }

    #[test]
    fn slots_busy_past_the_end_get_no_share() {
        // Four slots end in 0.1 s, three only in 1.6 s: the 4,000 pending go to this slot and
        // the four (1,334 here, 667 each there, all ending 0.35 s from now), none to the three.
        let (soon, late) = ((10_000.0, Some(1.55)), (10_000.0, Some(0.05)));
        let busy = [soon, soon, soon, soon, late, late, late];
        let piece = PACE.piece(4_000, &busy, 8, 0, None);
        assert_eq!(piece, 1_334);
    }

    #[test]
    fn the_piece_never_exceeds_what_is_pending() {
        assert_eq!(PACE.piece(500, &[(10_000.0, Some(0.0)); 7], 8, 0, None), 500);
    }

    #[test]
    fn a_piece_queued_beyond_the_free_slots_starts_when_a_slot_frees() {
        // Every slot busy, one free in 0.2 s and seven in 1 s: prefetched, the piece starts in
        // 0.2 s and ends with the others, 20,000 poured over all eight.
        let soon = (10_000.0, Some(PACE.seconds(10_000.0) - 0.2));
        let late = (10_000.0, Some(PACE.seconds(10_000.0) - 1.0));
        let mut busy = vec![late; 7];
        busy.push(soon);
        let piece = PACE.piece(20_000, &busy, 8, 0, None);
        let ends = 0.2 + PACE.seconds(piece as f64);
        let others = 1.0 + PACE.seconds((20_000 - piece) as f64 / 7.0);
        assert!((ends - others).abs() < 0.01, "{piece}: {ends} vs {others}");
        // The next one, queued behind it, starts when the second slot frees, in 1 s, and ends
        // with it: the seven slots that free then share the rest.
        let mut queued = busy.clone();
        queued.push((piece as f64, None));
        let rest = 20_000 - piece;
        let next = PACE.piece(rest, &queued, 8, 0, None);
        assert_eq!(next, rest.div_ceil(7), "it starts in 1 s, not now");
        assert!((1.0 + PACE.seconds(next as f64) - ends).abs() < 0.01, "{next}");
    }

    #[test]
    fn a_chunk_waiting_in_the_queue_starts_on_the_first_slot_to_free() {
        // One slot frees in 0.2 s and seven in 1 s; a chunk of 5,000 waits in the queue for the
        // first (its 0.9 s of work, none done yet), so it ends in 1.1 s, and this piece starts
        // in 1 s: as if that slot were busy until 1.1 s.
        let soon = (10_000.0, Some(PACE.seconds(10_000.0) - 0.2));
        let late = (10_000.0, Some(PACE.seconds(10_000.0) - 1.0));
        let mut busy = vec![late; 7];
        busy.extend([soon, (5_000.0, None)]);
        let mut until = vec![late; 7];
        until.push((5_000.0, Some(PACE.seconds(5_000.0) - 1.1)));
        for pending in [2_000, 20_000, 60_000] {
            assert_eq!(PACE.piece(pending, &busy, 8, 0, None), PACE.piece(pending, &until, 8, 0, None));
        }
    }

    /// The least piece: a sixty-fourth of a chunk of 10,000.
    const LEAST: u32 = 156;

    /// The final round, slot by slot: eight slots busy until 0, 0.05, ... 0.35 s, each given
    /// its piece of `pending` when it frees, as the trigger would. Returns when each slot ends.
    fn final_round(pending: u64, room: Option<SendRoom>) -> Vec<f64> {
        let free: Vec<f64> = (0..8).map(|i| f64::from(i) * 0.05).collect();
        // Each slot: (recipients, dispatched at) of its chunk in flight.
        let mut slots: Vec<(f64, f64)> =
            free.iter().map(|&f| (10_000.0, f - PACE.seconds(10_000.0))).collect();
        let mut left = pending;
        for (i, &now) in free.iter().enumerate() {
            let in_flight: Vec<(f64, Option<f64>)> = slots
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &(r, at))| (r, Some(now - at)))
                .collect();
            // As the cut does: at least the least piece, and no rest smaller than one.
            let piece = match PACE.piece(left, &in_flight, 8, LEAST, room).max(LEAST.into()) {
                _ if left == 0 => 0,
                piece if piece + u64::from(LEAST) > left => left,
                piece => piece,
            };
            left -= piece;
            slots[i] = (piece as f64, now);
        }
        assert_eq!(left, 0, "the round takes every pending recipient");
        let mut ends: Vec<f64> = slots.iter().map(|&(r, at)| at + PACE.seconds(r)).collect();
        ends.sort_by(f64::total_cmp);
        ends
    }

    #[test]
    fn with_room_for_every_send_the_slots_end_together() {
        let ends = final_round(16_000, None);
        assert!(ends[7] - ends[0] < 0.01, "{ends:?}");
        let roomy = SendRoom { calls: 8, seconds: 0.16 };
        assert_eq!(final_round(16_000, Some(roomy)), ends, "eight sends start at once");
    }

    #[test]
    fn a_slot_beyond_the_sends_that_can_start_ends_a_send_earlier() {
        // One of the eight send slots is held by realtime traffic: seven end together, and the
        // eighth a send's time before them, so that its send is done when theirs start.
        let ends = final_round(16_000, Some(SendRoom { calls: 7, seconds: 0.16 }));
        assert!(ends[7] - ends[1] < 0.01, "{ends:?}");
        assert!(ends[1] - ends[0] >= 0.155, "{ends:?}");
        // The others take its share: they end about a send's time over eight later.
        let together = final_round(16_000, None)[7];
        assert!((ends[7] - together - 0.02).abs() < 0.005, "{ends:?} against {together}");
    }
}
