//! The trigger's scheduling rule and the chunks' guarded state machine, against a real PostgreSQL.

use std::time::Duration;

use chrono::Utc;
use haishin_shared::domain::{ChunkId, ChunkState, Class, RequestId};
use haishin_shared::esp::Shape;
use haishin_shared::store::{Claim, Step, Store};
use haishin_tests::dispatchable::{ready, request};
use haishin_tests::fresh_database;
use haishin_trigger::intake::records::insert_request;
use haishin_trigger::prepare::records::{NewChunk, claim_prepare, insert_chunks};
use haishin_trigger::scheduling::{SlotLimits, dispatch_round, undo_dispatch};
use haishin_trigger::status::request_status;

fn rid(id: &str) -> RequestId {
    RequestId::from(id)
}

fn chunk_id(request: &str, seq: u32) -> ChunkId {
    ChunkId::new(&rid(request), seq)
}

const LIMITS: SlotLimits = SlotLimits {
    shape: Shape::Lists,
    limit: 3,
    realtime_reserved: 0,
    prefetch: 0,
    min_part: 0,
    inline_max: 0,
    send_slots: 8,
};

async fn dispatched_requests(store: &Store, limits: SlotLimits) -> Vec<String> {
    dispatch_round(store, limits)
        .await
        .unwrap()
        .dispatched
        .into_iter()
        .map(|d| d.request_id.to_string())
        .collect()
}

/// Moves a dispatched chunk through upload so that its slot frees.
async fn finish_upload(store: &Store, chunk: &ChunkId) {
    let Claim::Claimed(_) = store.claim(chunk, Step::Upload, Duration::from_secs(60)).await.unwrap() else {
        panic!("upload not claimed")
    };
    assert!(store.finish_step(chunk, Step::Upload, "list").await.unwrap());
}

#[tokio::test]
async fn the_same_request_id_twice_makes_one_request() {
    let (store, _) = fresh_database().await;
    let first = request("dup", Class::Batch, 1);
    let mut second = request("dup", Class::Realtime, 9);
    second.labels.insert("other".into(), "body".into());
    assert!(insert_request(&store, &first).await.unwrap());
    assert!(!insert_request(&store, &second).await.unwrap());
    let row = store.request(&rid("dup")).await.unwrap().unwrap();
    assert_eq!((row.class.as_str(), row.priority), ("batch", 1));
}

#[tokio::test]
async fn realtime_chunks_go_before_batch_and_higher_priority_before_lower() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("batch-low", Class::Batch, 1), 5).await;
    ready(&store, &request("batch-high", Class::Batch, 7), 5).await;
    ready(&store, &request("event", Class::Realtime, 0), 1).await;

    let order = dispatched_requests(&store, LIMITS).await;

    assert_eq!(order, ["event", "batch-high", "batch-high"]);
}

#[tokio::test]
async fn chunks_in_flight_never_exceed_the_limit() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("big", Class::Batch, 0), 10).await;

    assert_eq!(dispatched_requests(&store, LIMITS).await.len(), 3);
    assert_eq!(dispatched_requests(&store, LIMITS).await.len(), 0, "all slots are taken");

    finish_upload(&store, &chunk_id("big", 0)).await;
    let round = dispatch_round(&store, LIMITS).await.unwrap();
    assert_eq!(round.dispatched.len(), 1, "one slot freed, one chunk dispatched");
    assert_eq!(round.in_flight, 3);
}

#[tokio::test]
async fn small_realtime_chunks_wait_while_every_send_slot_is_out_then_go_together_in_one_message() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { inline_max: 20, send_slots: 1, ..LIMITS };
    ready(&store, &request("first", Class::Realtime, 0), 1).await;
    let round = dispatch_round(&store, limits).await.unwrap();
    assert_eq!(round.dispatched.len(), 1, "a free send slot: at once");
    ready(&store, &request("second", Class::Realtime, 0), 1).await;
    ready(&store, &request("third", Class::Realtime, 0), 1).await;

    let waiting = dispatch_round(&store, limits).await.unwrap();
    sqlx::query("UPDATE chunks SET state = 'sent' WHERE request_id = 'first'")
        .execute(store.pool())
        .await
        .unwrap();
    let together = dispatch_round(&store, limits).await.unwrap();

    assert!(waiting.dispatched.is_empty(), "the one send slot is out");
    let taken: Vec<(String, Option<u32>)> =
        together.dispatched.iter().map(|d| (d.request_id.to_string(), d.send_call)).collect();
    assert_eq!(taken.len(), 2);
    assert!(taken.iter().all(|(_, call)| *call == taken[0].1), "one message, one call: {taken:?}");
    let groups: Vec<Option<String>> =
        sqlx::query_scalar("SELECT DISTINCT send_group FROM chunks WHERE request_id IN ('second', 'third')")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(groups.len(), 1, "counted as one message out: {groups:?}");
}

#[tokio::test]
async fn a_small_realtime_chunk_goes_on_without_a_list_while_every_upload_slot_is_taken() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("big", Class::Batch, 0), 10).await;
    assert_eq!(dispatched_requests(&store, LIMITS).await.len(), 3, "the batch takes every slot");
    ready(&store, &request("event", Class::Realtime, 0), 1).await;

    // Its 10 recipients are more than one send may carry: it waits for an upload slot.
    let round = dispatch_round(&store, SlotLimits { inline_max: 9, ..LIMITS }).await.unwrap();
    assert!(round.dispatched.is_empty());
    let round = dispatch_round(&store, SlotLimits { inline_max: 10, ..LIMITS }).await.unwrap();

    let event: Vec<_> = round.dispatched.iter().map(|d| (d.request_id.to_string(), d.inline)).collect();
    assert_eq!(event, [("event".to_owned(), true)]);
    assert_eq!(round.in_flight, 3, "it holds no upload slot");
    let chunk = store.chunk(&chunk_id("event", 0)).await.unwrap().unwrap();
    assert_eq!((chunk.state, chunk.list_id), (ChunkState::Uploaded, None), "straight to the sender");
    assert!(undo_dispatch(&store, &round.dispatched[0], Shape::Lists).await.unwrap());
    let chunk = store.chunk(&chunk_id("event", 0)).await.unwrap().unwrap();
    assert_eq!(chunk.state, ChunkState::Pending, "not handed on: back in line");
}

#[tokio::test]
async fn a_message_based_providers_chunks_hold_their_slot_until_sent() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { shape: Shape::Messages, ..LIMITS };
    ready(&store, &request("big", Class::Batch, 0), 10).await;

    assert_eq!(dispatched_requests(&store, limits).await.len(), 3);
    let first = store.chunk(&chunk_id("big", 0)).await.unwrap().unwrap();
    assert_eq!(first.state, ChunkState::Uploaded, "nothing to upload: the chunk waits for the sender");

    let Claim::Claimed(_) = store.claim(&first.id, Step::Send, Duration::from_secs(60)).await.unwrap() else {
        panic!("send not claimed")
    };
    assert_eq!(dispatched_requests(&store, limits).await.len(), 0, "a chunk being sent keeps its slot");
    assert!(store.finish_chunk(&first.id, ChunkState::Sending, ChunkState::Completed, "sent").await.unwrap());
    assert_eq!(dispatched_requests(&store, limits).await.len(), 1, "the chunk sent freed its slot");
}

#[tokio::test]
async fn batch_work_never_takes_the_slots_reserved_for_realtime() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 3, realtime_reserved: 1, ..LIMITS };
    ready(&store, &request("campaign", Class::Batch, 9), 10).await;

    assert_eq!(dispatched_requests(&store, limits).await.len(), 2);
    ready(&store, &request("event", Class::Realtime, 0), 1).await;
    assert_eq!(dispatched_requests(&store, limits).await, ["event"]);
}

#[tokio::test]
async fn equal_requests_take_turns() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 4, ..LIMITS };
    ready(&store, &request("a", Class::Batch, 0), 10).await;
    ready(&store, &request("b", Class::Batch, 0), 10).await;

    let mut order = dispatched_requests(&store, limits).await;
    order.sort();
    assert_eq!(order, ["a", "a", "b", "b"]);
}

#[tokio::test]
async fn equal_requests_are_given_recipients_at_the_same_rate_whatever_their_chunks_sizes() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("a", Class::Batch, 0), 20).await;
    ready(&store, &request("b", Class::Batch, 0), 20).await;
    sqlx::query("UPDATE chunks SET recipients = 5 WHERE request_id = 'b'")
        .execute(store.pool())
        .await
        .unwrap();

    let order = dispatched_requests(&store, SlotLimits { limit: 12, ..LIMITS }).await;

    // Turn by turn, b's chunks of 5 would get half of a's recipients; by recipients, b takes two
    // turns for each of a's.
    assert_eq!(order, ["a", "b", "b", "a", "b", "b", "a", "b", "b", "a", "b", "b"]);
    let given = |id: &str| order.iter().filter(|o| *o == id).count() * if id == "a" { 10 } else { 5 };
    assert_eq!((given("a"), given("b")), (40, 40));
}

#[tokio::test]
async fn a_request_back_from_a_pause_does_not_take_over_to_make_up_for_lost_time() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("a", Class::Batch, 0), 20).await;
    ready(&store, &request("b", Class::Batch, 0), 20).await;
    assert_eq!(dispatched_requests(&store, SlotLimits { limit: 2, ..LIMITS }).await, ["a", "b"]);
    sqlx::query("UPDATE requests SET paused_at = now() WHERE id = 'b'").execute(store.pool()).await.unwrap();
    let alone = dispatched_requests(&store, SlotLimits { limit: 6, ..LIMITS }).await;
    assert_eq!(alone, ["a"; 4]);
    sqlx::query("UPDATE requests SET paused_at = NULL WHERE id = 'b'").execute(store.pool()).await.unwrap();

    let order = dispatched_requests(&store, SlotLimits { limit: 10, ..LIMITS }).await;

    assert_eq!(order, ["b", "a", "b", "a"], "b rejoins at a's tag: turns, not a catch-up");
}

#[tokio::test]
async fn overdue_chunks_expire_instead_of_being_dispatched() {
    let (store, _) = fresh_database().await;
    let mut late = request("late", Class::Batch, 0);
    late.deadline = Some(Utc::now() + chrono::Duration::milliseconds(300));
    ready(&store, &late, 2).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let round = dispatch_round(&store, LIMITS).await.unwrap();

    assert!(round.dispatched.is_empty());
    assert_eq!(round.expired, 2);
    assert_eq!(store.chunk(&chunk_id("late", 0)).await.unwrap().unwrap().state, ChunkState::Expired);
}

#[tokio::test]
async fn concurrent_rounds_from_two_pools_never_over_commit() {
    let (store, url) = fresh_database().await;
    let other = Store::connect(&url, 10).await.unwrap();
    ready(&store, &request("big", Class::Batch, 0), 50).await;
    let limits = SlotLimits { limit: 5, ..LIMITS };

    let rounds = (0..20).map(|i| {
        let store = if i % 2 == 0 { store.clone() } else { other.clone() };
        async move { dispatch_round(&store, limits).await.unwrap().dispatched }
    });
    let dispatched: Vec<_> = futures::future::join_all(rounds).await.into_iter().flatten().collect();

    assert_eq!(dispatched.len(), 5);
    let mut ids: Vec<_> = dispatched.iter().map(|d| d.chunk_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "no chunk dispatched twice");
}

#[tokio::test]
async fn a_claimed_chunk_is_busy_until_its_lease_runs_out_then_taken_over() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("r", Class::Batch, 0), 1).await;
    dispatch_round(&store, LIMITS).await.unwrap();
    let chunk = chunk_id("r", 0);
    finish_upload(&store, &chunk).await;

    let Claim::Claimed(first) = store.claim(&chunk, Step::Send, Duration::from_millis(200)).await.unwrap()
    else {
        panic!()
    };
    assert!(!first.takeover);
    assert!(matches!(store.claim(&chunk, Step::Send, Duration::from_secs(60)).await.unwrap(), Claim::Busy));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let Claim::Claimed(second) = store.claim(&chunk, Step::Send, Duration::from_secs(60)).await.unwrap()
    else {
        panic!()
    };
    assert!(second.takeover, "the earlier attempt's outcome is unknown");

    assert!(store.finish_step(&chunk, Step::Send, "d-1").await.unwrap());
    assert!(matches!(
        store.claim(&chunk, Step::Send, Duration::from_secs(60)).await.unwrap(),
        Claim::Done(Some(ChunkState::Sent))
    ));
}

#[tokio::test]
async fn a_later_campaign_takes_turns_with_a_running_one_instead_of_waiting_or_catching_up() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 3, ..LIMITS };
    ready(&store, &request("first", Class::Batch, 0), 20).await;
    assert_eq!(dispatched_requests(&store, limits).await, ["first"; 3]);
    ready(&store, &request("second", Class::Batch, 0), 20).await;

    let mut order = Vec::new();
    for seq in 0..4 {
        finish_upload(&store, &chunk_id("first", seq)).await;
        let next = dispatched_requests(&store, limits).await;
        assert_eq!(next.len(), 1);
        order.extend(next);
    }

    assert_eq!(order, ["second", "first", "second", "first"]);
}

#[tokio::test]
async fn chunks_of_a_request_still_being_prepared_are_dispatched() {
    let (store, _) = fresh_database().await;
    let campaign = request("streaming", Class::Batch, 0);
    insert_request(&store, &campaign).await.unwrap();
    let Claim::Claimed(_) = claim_prepare(&store, &rid("streaming"), Duration::from_secs(60)).await.unwrap()
    else {
        panic!()
    };
    let first =
        NewChunk { id: chunk_id("streaming", 0), seq: 0, object: "o/0".into(), recipients: 10, lines: None };
    insert_chunks(&store, &campaign, &[first]).await.unwrap();

    assert_eq!(dispatched_requests(&store, LIMITS).await, ["streaming"]);
}

#[tokio::test]
async fn a_request_that_cannot_meet_its_deadline_at_the_current_pace_is_flagged() {
    let (store, _) = fresh_database().await;
    // Pace: one chunk uploaded in the last minute.
    ready(&store, &request("earlier", Class::Batch, 5), 1).await;
    dispatch_round(&store, LIMITS).await.unwrap();
    finish_upload(&store, &chunk_id("earlier", 0)).await;
    let mut tight = request("tight", Class::Batch, 0);
    tight.deadline = Some(Utc::now() + chrono::Duration::minutes(5));
    ready(&store, &tight, 10).await;
    let mut roomy = request("roomy", Class::Batch, 0);
    roomy.deadline = Some(Utc::now() + chrono::Duration::days(1));
    ready(&store, &roomy, 2).await;

    let tight = request_status(&store, &rid("tight")).await.unwrap().unwrap().forecast.unwrap();
    let roomy = request_status(&store, &rid("roomy")).await.unwrap().unwrap().forecast.unwrap();

    assert_eq!((tight.chunks_left, tight.uploads_last_minute), (10, 1));
    assert!(tight.deadline_at_risk, "10 chunks at one a minute take longer than 5 minutes");
    assert_eq!(roomy.chunks_ahead, 10, "the earlier deadline goes first");
    assert!(!roomy.deadline_at_risk);
}

/// The chunks of `request` as (object, first line, recipients), by object and line.
async fn line_ranges(store: &Store, request: &str) -> Vec<(String, i32, i32)> {
    let mut ranges: Vec<_> = store
        .chunks_of(&rid(request))
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.object, c.first_line, c.recipients))
        .collect();
    ranges.sort();
    ranges
}

/// Checks that each of `objects` (10 lines each) is covered once, without gap or overlap.
fn assert_covered_once(ranges: &[(String, i32, i32)], objects: u32) {
    for seq in 0..objects {
        let object = format!("o/{seq}");
        let mut next = 0;
        for (_, first, recipients) in ranges.iter().filter(|r| r.0 == object) {
            assert_eq!(*first, next, "{object}: {ranges:?}");
            next += recipients;
        }
        assert_eq!(next, 10, "{object}: {ranges:?}");
    }
}

#[tokio::test]
async fn the_tail_of_the_batch_work_is_cut_smaller_as_it_is_dispatched() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 8, realtime_reserved: 1, min_part: 2, ..LIMITS };
    // 3 chunks of 10 for 7 batch slots: whole, they would leave 4 slots idle.
    ready(&store, &request("tail", Class::Batch, 0), 3).await;

    let round = dispatch_round(&store, limits).await.unwrap();

    assert_eq!(round.dispatched.len(), 7, "every batch slot gets a piece");
    let chunks = store.chunks_of(&rid("tail")).await.unwrap();
    let queued: Vec<i32> = round
        .dispatched
        .iter()
        .map(|d| chunks.iter().find(|c| c.id == d.chunk_id).expect("dispatched chunk").recipients)
        .collect();
    // The pending recipients poured over the slots (30 / 7 → 5 first), every piece at most that
    // and never under the minimum: the 30 recipients spread over all seven slots.
    assert_eq!(queued[0], 5);
    assert!(queued.iter().all(|&n| (2..=5).contains(&n)), "{queued:?}");
    assert_eq!(queued.iter().sum::<i32>(), 30);
    let mut ids: Vec<_> = chunks.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), chunks.len(), "each piece has an id of its own");
    assert_covered_once(&line_ranges(&store, "tail").await, 3);
    let request = store.request(&rid("tail")).await.unwrap().unwrap();
    assert_eq!(request.chunk_count, Some(chunks.len() as i32));
    let status = request_status(&store, &rid("tail")).await.unwrap().unwrap();
    assert_eq!(status.recipients.values().sum::<i64>(), 30, "no recipient gained or lost");
}

#[tokio::test]
async fn a_slot_freed_while_the_others_have_a_whole_chunk_to_go_takes_a_whole_chunk() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("paced", Class::Batch, 0), 7).await;
    // Six chunks out; three of them uploaded, each in 1.15 s: the provider's pace is known.
    let out = dispatch_round(&store, SlotLimits { limit: 6, ..LIMITS }).await.unwrap().dispatched;
    assert_eq!(out.len(), 6);
    let done: Vec<&ChunkId> = out.iter().take(3).map(|d| &d.chunk_id).collect();
    sqlx::query(
        "UPDATE chunks SET state = 'uploaded', queued_at = now() - interval '2.3 s',
             uploaded_at = now() - interval '1.15 s'
         WHERE id = ANY($1)",
    )
    .bind(&done)
    .execute(store.pool())
    .await
    .unwrap();

    // One slot of four frees while the three others have just started a chunk of 10 each:
    // the last 10 pending, whole, end with them (cut into an even share, 3, they would not).
    let limits = SlotLimits { limit: 4, min_part: 1, ..LIMITS };
    let round = dispatch_round(&store, limits).await.unwrap();

    assert_eq!(round.dispatched.len(), 1);
    let ranges: Vec<_> = line_ranges(&store, "paced").await.into_iter().map(|r| (r.1, r.2)).collect();
    assert_eq!(ranges, [(0, 10); 7], "no chunk was cut");
}

#[tokio::test]
async fn the_tail_is_not_cut_while_more_batch_work_may_come() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 8, min_part: 2, ..LIMITS };
    ready(&store, &request("prepared", Class::Batch, 0), 2).await;
    let preparing = request("preparing", Class::Batch, 0);
    assert!(insert_request(&store, &preparing).await.unwrap());

    let round = dispatch_round(&store, limits).await.unwrap();

    assert_eq!(round.dispatched.len(), 2);
    let ranges: Vec<_> = line_ranges(&store, "prepared").await.into_iter().map(|r| (r.1, r.2)).collect();
    assert_eq!(ranges, [(0, 10), (0, 10)]);
}

#[tokio::test]
async fn a_chunk_dispatched_before_is_never_cut_and_pieces_stay_above_the_minimum() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("r", Class::Batch, 0), 2).await;
    // Chunk 0 goes out and comes back to pending, as after a lost task: the ESP may hold a list
    // under its key, so its range must stay whole.
    let one = SlotLimits { limit: 1, ..LIMITS };
    let first = dispatch_round(&store, one).await.unwrap().dispatched.remove(0);
    assert!(undo_dispatch(&store, &first, Shape::Lists).await.unwrap());

    // 20 pending over 8 slots would make pieces of 3; the minimum is 4, and a rest of 6 is not
    // cut again (it would leave a piece under 4).
    let limits = SlotLimits { limit: 8, min_part: 4, ..LIMITS };
    dispatch_round(&store, limits).await.unwrap();

    let ranges = line_ranges(&store, "r").await;
    let ranges: Vec<_> = ranges.iter().map(|(o, f, n)| (o.as_str(), *f, *n)).collect();
    assert_eq!(ranges, [("o/0", 0, 10), ("o/1", 0, 4), ("o/1", 4, 6)]);
}

#[tokio::test]
async fn realtime_chunks_are_never_cut() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 8, min_part: 1, ..LIMITS };
    ready(&store, &request("event", Class::Realtime, 0), 1).await;

    dispatch_round(&store, limits).await.unwrap();

    assert_eq!(line_ranges(&store, "event").await, [("o/0".to_owned(), 0, 10)]);
}
