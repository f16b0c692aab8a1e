//! Pausing, resuming, cancelling and listing requests: against the scheduling rule on a real
//! PostgreSQL, and through the API on the local stack, with what the ESP received.

use std::collections::BTreeMap;
use std::time::Duration;

use haishin_local::stack::{BUCKET, LocalStack};
use haishin_shared::domain::{ChunkId, ChunkState, Class, DeliveryRequest, RequestId, RequestState};
use haishin_shared::esp::Shape;
use haishin_shared::store::{Claim, Step, Store};
use haishin_tests::dispatchable::{self, finish, new_chunks, ready};
use haishin_tests::{TestStack, eventually, finished, fresh_database, request_status};
use haishin_trigger::control::{self, Control};
use haishin_trigger::intake::records::{insert_rejected, insert_request};
use haishin_trigger::listing::{self, Cursor, Filter};
use haishin_trigger::prepare::AudienceSummary;
use haishin_trigger::prepare::records::{claim_prepare, insert_chunks};
use haishin_trigger::scheduling::{SlotLimits, dispatch_round};
use haishin_trigger::status::request_status as status_of;
use serde_json::{Value, json};

const LIMITS: SlotLimits = SlotLimits {
    shape: Shape::Lists,
    limit: 3,
    realtime_reserved: 0,
    prefetch: 0,
    min_part: 0,
    inline_max: 0,
    send_slots: 8,
};

fn rid(id: &str) -> RequestId {
    RequestId::from(id)
}

fn request(id: &str, class: Class, labels: &[(&str, &str)]) -> DeliveryRequest {
    let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    DeliveryRequest { labels, ..dispatchable::request(id, class, 0) }
}

async fn dispatched(store: &Store) -> Vec<String> {
    let round = dispatch_round(store, LIMITS).await.unwrap();
    round.dispatched.into_iter().map(|d| d.request_id.to_string()).collect()
}

async fn chunk_state(store: &Store, request: &str, seq: u32) -> ChunkState {
    store.chunk(&ChunkId::new(&rid(request), seq)).await.unwrap().unwrap().state
}

#[tokio::test]
async fn a_paused_request_is_skipped_by_the_scheduler_and_resumes_where_it_stopped() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("campaign", Class::Batch, &[]), 4).await;
    ready(&store, &request("other", Class::Batch, &[]), 4).await;

    assert_eq!(control::pause(&store, &rid("campaign"), Some("checking")).await.unwrap(), Control::Done);
    let again = control::pause(&store, &rid("campaign"), Some("again")).await.unwrap();
    assert_eq!(again, Control::Done, "a second pause changes nothing and succeeds");
    assert_eq!(dispatched(&store).await, ["other", "other", "other"]);

    let status = status_of(&store, &rid("campaign")).await.unwrap().unwrap();
    assert!(status.paused_at.is_some());
    assert_eq!(status.pause_reason.as_deref(), Some("checking"), "the first pause's reason is kept");
    let forecast = status.forecast.expect("chunks are left");
    assert!(forecast.paused && forecast.uploads_done_by.is_none() && !forecast.deadline_at_risk);
    let other = status_of(&store, &rid("other")).await.unwrap().unwrap().forecast.unwrap();
    assert_eq!(other.chunks_ahead, 0, "a paused request's chunks go before nobody");

    assert_eq!(control::resume(&store, &rid("campaign")).await.unwrap(), Control::Done);
    assert_eq!(control::resume(&store, &rid("campaign")).await.unwrap(), Control::Done);
    let status = status_of(&store, &rid("campaign")).await.unwrap().unwrap();
    assert!(status.paused_at.is_none() && status.pause_reason.is_none());
    // Three slots are taken; one freed goes to the resumed request, which waited longest.
    let chunk = ChunkId::new(&rid("other"), 0);
    let Claim::Claimed(_) = store.claim(&chunk, Step::Upload, Duration::from_secs(60)).await.unwrap() else {
        panic!("upload not claimed")
    };
    assert!(store.finish_step(&chunk, Step::Upload, "list").await.unwrap());
    assert_eq!(dispatched(&store).await, ["campaign"]);
    assert_eq!(chunk_state(&store, "campaign", 0).await, ChunkState::Queued, "from its first chunk");
}

#[tokio::test]
async fn a_paused_request_s_pending_chunks_still_expire_at_the_deadline() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("late", Class::Batch, &[]), 3).await;
    control::pause(&store, &rid("late"), None).await.unwrap();
    sqlx::query("UPDATE chunks SET deadline = now() - interval '1 second' WHERE request_id = 'late'")
        .execute(store.pool())
        .await
        .unwrap();

    let round = dispatch_round(&store, LIMITS).await.unwrap();

    assert_eq!((round.expired, round.dispatched.len()), (3, 0));
    assert_eq!(chunk_state(&store, "late", 0).await, ChunkState::Expired);
}

#[tokio::test]
async fn cancel_ends_what_waits_and_leaves_what_is_being_uploaded_or_sent_to_finish() {
    let (store, _) = fresh_database().await;
    let limits = SlotLimits { limit: 4, ..LIMITS };
    ready(&store, &request("big", Class::Batch, &[]), 6).await;
    assert_eq!(dispatch_round(&store, limits).await.unwrap().dispatched.len(), 4);
    let lease = Duration::from_secs(60);
    let id = |seq| ChunkId::new(&rid("big"), seq);
    // Chunk 0 is being uploaded, 1 uploaded and waiting for its send, 2 being sent, 3 queued.
    for seq in [0, 1, 2] {
        assert!(matches!(store.claim(&id(seq), Step::Upload, lease).await.unwrap(), Claim::Claimed(_)));
    }
    for seq in [1, 2] {
        assert!(store.finish_step(&id(seq), Step::Upload, "list").await.unwrap());
    }
    assert!(matches!(store.claim(&id(2), Step::Send, lease).await.unwrap(), Claim::Claimed(_)));

    assert_eq!(control::cancel(&store, &rid("big"), None).await.unwrap(), Control::Done);
    assert_eq!(control::cancel(&store, &rid("big"), None).await.unwrap(), Control::Done, "idempotent");

    let states: Vec<ChunkState> =
        futures::future::join_all((0..6).map(|s| chunk_state(&store, "big", s))).await;
    use ChunkState::{Cancelled, Sending, Uploading};
    assert_eq!(states, [Uploading, Cancelled, Sending, Cancelled, Cancelled, Cancelled]);
    assert!(dispatch_round(&store, limits).await.unwrap().dispatched.is_empty());
    // The upload under way ends; its chunk never reaches the send step.
    assert!(store.finish_step(&id(0), Step::Upload, "list").await.unwrap());
    let claim = store.claim(&id(0), Step::Send, lease).await.unwrap();
    assert!(matches!(claim, Claim::Done(Some(ChunkState::Cancelled))), "{claim:?}");
    // A queued chunk's upload task finds it cancelled and does nothing.
    let claim = store.claim(&id(3), Step::Upload, lease).await.unwrap();
    assert!(matches!(claim, Claim::Done(Some(ChunkState::Cancelled))), "{claim:?}");
    // The send under way is counted.
    assert!(store.finish_step(&id(2), Step::Send, "delivery").await.unwrap());

    let status = status_of(&store, &rid("big")).await.unwrap().unwrap();
    assert!(status.cancel_requested_at.is_some() && status.forecast.is_none());
    assert_eq!(status.reason.as_deref(), Some("cancelled on request"));
    assert_eq!(status.recipients.get(&ChunkState::Cancelled), Some(&50));
    assert_eq!(status.recipients.get(&ChunkState::Sent), Some(&10));

    for refused in [
        control::pause(&store, &rid("big"), None).await.unwrap(),
        control::resume(&store, &rid("big")).await.unwrap(),
    ] {
        let Control::Refused { state, reason } = refused else { panic!("{refused:?}") };
        assert_eq!(state, RequestState::Dispatching);
        assert!(reason.contains("being cancelled"), "{reason}");
    }
}

#[tokio::test]
async fn a_message_based_chunk_handed_back_mid_way_is_not_cancelled_as_a_whole() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("smtp", Class::Batch, &[]), 2).await;
    let limits = SlotLimits { shape: Shape::Messages, ..LIMITS };
    assert_eq!(dispatch_round(&store, limits).await.unwrap().dispatched.len(), 2);
    // Chunk 0 had 4 of its 10 messages delivered before it was handed back for a later attempt.
    sqlx::query("UPDATE chunks SET progress = 4, delivered = 4 WHERE id = $1")
        .bind(ChunkId::new(&rid("smtp"), 0))
        .execute(store.pool())
        .await
        .unwrap();

    assert_eq!(control::cancel(&store, &rid("smtp"), None).await.unwrap(), Control::Done);

    assert_eq!(chunk_state(&store, "smtp", 0).await, ChunkState::Uploaded, "it finishes its messages");
    assert_eq!(chunk_state(&store, "smtp", 1).await, ChunkState::Cancelled);
}

#[tokio::test]
async fn chunks_prepared_after_a_cancel_are_stored_cancelled_and_a_request_not_yet_prepared_ends_at_once() {
    let (store, _) = fresh_database().await;
    let preparing = request("preparing", Class::Batch, &[]);
    assert!(insert_request(&store, &preparing).await.unwrap());
    assert!(matches!(
        claim_prepare(&store, &preparing.id, Duration::from_secs(60)).await.unwrap(),
        Claim::Claimed(_)
    ));
    assert_eq!(
        insert_chunks(&store, &preparing, &new_chunks(&preparing, 0..2)).await.unwrap(),
        ChunkState::Pending
    );

    assert_eq!(control::cancel(&store, &preparing.id, None).await.unwrap(), Control::Done);

    assert_eq!(
        insert_chunks(&store, &preparing, &new_chunks(&preparing, 2..4)).await.unwrap(),
        ChunkState::Cancelled
    );
    finish(&store, &preparing.id, &AudienceSummary { chunks: 4, recipients: 40, ..Default::default() }).await;
    assert!(dispatch_round(&store, LIMITS).await.unwrap().dispatched.is_empty());
    let status = status_of(&store, &preparing.id).await.unwrap().unwrap();
    assert_eq!(status.state, RequestState::Dispatching, "the completion job closes it");
    assert_eq!(status.recipients.get(&ChunkState::Cancelled), Some(&40));
    assert_eq!(status.recipients.len(), 1);

    let waiting = request("waiting", Class::Realtime, &[]);
    assert!(insert_request(&store, &waiting).await.unwrap());
    assert_eq!(control::cancel(&store, &waiting.id, Some("changed my mind")).await.unwrap(), Control::Done);
    let row = store.request(&waiting.id).await.unwrap().unwrap();
    assert_eq!((row.state, row.reason.as_deref()), (RequestState::Cancelled, Some("changed my mind")));
    assert!(row.finished_at.is_some());
    let claim = claim_prepare(&store, &waiting.id, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(claim, Claim::Done(Some(RequestState::Cancelled))), "{claim:?}");
    assert_eq!(control::cancel(&store, &waiting.id, None).await.unwrap(), Control::Done, "cancelled twice");
    let Control::Refused { state, .. } = control::resume(&store, &waiting.id).await.unwrap() else {
        panic!("a cancelled request cannot be resumed")
    };
    assert_eq!(state, RequestState::Cancelled);
    assert_eq!(control::pause(&store, &rid("never-seen"), None).await.unwrap(), Control::NotFound);
}

#[tokio::test]
async fn the_list_filters_by_state_class_and_labels_newest_first_a_page_at_a_time() {
    let (store, _) = fresh_database().await;
    let spring_a = [("campaign", "spring"), ("team", "a")];
    let autumn_a = [("campaign", "autumn"), ("team", "a")];
    let spring_b = [("campaign", "spring"), ("team", "b")];
    ready(&store, &request("b-1", Class::Batch, &spring_a), 2).await;
    ready(&store, &request("r-1", Class::Realtime, &[("campaign", "spring")]), 2).await;
    ready(&store, &request("b-2", Class::Batch, &autumn_a), 2).await;
    ready(&store, &request("r-2", Class::Realtime, &[]), 2).await;
    ready(&store, &request("b-3", Class::Batch, &spring_b), 2).await;
    assert!(insert_rejected(&store, &rid("refused"), "bad").await.unwrap());
    sqlx::query("UPDATE requests SET state = 'completed', finished_at = now() WHERE id = 'b-2'")
        .execute(store.pool())
        .await
        .unwrap();
    control::pause(&store, &rid("b-3"), None).await.unwrap();
    let ids = |page: &listing::Page| page.requests.iter().map(|r| r.id.to_string()).collect::<Vec<_>>();
    let list = |filter: Filter, size: i64, after: Option<Cursor>| {
        let store = store.clone();
        async move { listing::list(&store, &filter, size, after.as_ref()).await.unwrap() }
    };
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };

    let all = list(Filter::default(), 50, None).await;
    assert_eq!(ids(&all), ["b-3", "r-2", "b-2", "r-1", "b-1"], "newest first, no rejected");
    assert!(all.next_page_token.is_none());
    let first = &all.requests[0];
    assert!(first.paused_at.is_some());
    let totals = serde_json::to_value(&first.recipients).unwrap();
    assert_eq!(
        totals,
        json!({"total": 20, "pending": 20, "in_flight": 0, "sent": 0, "failed": 0, "expired": 0,
               "cancelled": 0, "unknown": 0, "suppressed": 0})
    );

    let batch = Filter { classes: vec![Class::Batch], ..Filter::default() };
    assert_eq!(ids(&list(batch, 50, None).await), ["b-3", "b-2", "b-1"]);
    let spring = Filter { labels: labels(&[("campaign", "spring")]), ..Filter::default() };
    assert_eq!(ids(&list(spring, 50, None).await), ["b-3", "r-1", "b-1"]);
    let spring_a = Filter { labels: labels(&[("campaign", "spring"), ("team", "a")]), ..Filter::default() };
    assert_eq!(ids(&list(spring_a, 50, None).await), ["b-1"]);
    let open_batch =
        Filter { states: vec![RequestState::Dispatching], classes: vec![Class::Batch], ..Filter::default() };
    assert_eq!(ids(&list(open_batch, 50, None).await), ["b-3", "b-1"]);
    let ended = Filter { states: vec![RequestState::Completed, RequestState::Rejected], ..Filter::default() };
    assert_eq!(ids(&list(ended, 50, None).await), ["refused", "b-2"]);

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = list(Filter::default(), 2, after).await;
        assert!(page.requests.len() <= 2);
        seen.extend(ids(&page));
        match &page.next_page_token {
            Some(token) => after = Some(Cursor::parse(token).expect("a token this service gave")),
            None => break,
        }
    }
    assert_eq!(seen, ids(&all), "pages cover the list once, in order");
}

// The whole pipeline: what the ESP receives while a campaign is paused, resumed or cancelled.

fn template() -> Value {
    json!({ "subject": "Hi {{name}}", "text": "Hello {{name}}" })
}

/// A campaign of `n` recipients in a CSV file, published.
async fn campaign(stack: &LocalStack, id: &str, n: usize) {
    let mut csv = String::from("email,name\n");
    for i in 0..n {
        csv.push_str(&format!("{id}-{i}@example.com,User {i}\n"));
    }
    let object = format!("audiences/{id}.csv");
    stack.blobs.write(BUCKET, &object, csv.into_bytes().into()).await.unwrap();
    let body = json!({"id": id, "class": "batch", "template": template(), "labels": {"campaign": id},
        "audience": {"gcs": {"uris": [format!("gs://{BUCKET}/{object}")]}}});
    stack.requests_topic.publish(&body, &[]).await.unwrap();
}

/// `POST /v1/requests/{id}:verb`: the status code and the body.
async fn call(stack: &LocalStack, id: &str, verb: &str, body: Option<Value>) -> (u16, Value) {
    let mut post =
        reqwest::Client::new().post(format!("{}/v1/requests/{id}:{verb}", stack.endpoints.trigger));
    if let Some(body) = body {
        post = post.json(&body);
    }
    let answer = post.send().await.unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

/// A slow ESP and small chunks: a 600-recipient campaign takes 30 uploads over 2 slots.
fn slow_stack() -> TestStack {
    TestStack { call_latency: Duration::from_millis(60), chunk_size: 20, ..TestStack::default() }
}

async fn uploads_started(stack: &LocalStack, at_least: u64) {
    eventually("uploads under way", Duration::from_secs(30), || async {
        (stack.esp.report().upload.calls_accepted >= at_least).then_some(())
    })
    .await;
}

fn count(status: &Value, map: &str, state: &str) -> i64 {
    status[map][state].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn a_paused_campaign_stops_calling_the_esp_and_resumed_delivers_everyone_exactly_once() {
    let stack = slow_stack().start().await;
    campaign(&stack, "spring", 600).await;
    uploads_started(&stack, 3).await;

    let (code, paused) = call(&stack, "spring", "pause", Some(json!({"reason": "wrong coupon"}))).await;
    assert_eq!(code, 200, "{paused}");
    assert_eq!(paused["pause_reason"], "wrong coupon");
    let (code, again) = call(&stack, "spring", "pause", None).await;
    assert_eq!((code, &again["paused_at"]), (200, &paused["paused_at"]), "pausing twice changes nothing");

    // What was handed on before the pause finishes; then nothing more is uploaded.
    let status = eventually("the chunks handed on to finish", Duration::from_secs(30), || async {
        let status = request_status(&stack, "spring").await?;
        let moving = ["queued", "uploading"].iter().map(|s| count(&status, "chunks", s)).sum::<i64>();
        (moving == 0).then_some(status)
    })
    .await;
    let uploads = stack.esp.report().upload.calls_accepted;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(stack.esp.report().upload.calls_accepted, uploads, "no upload while paused");
    let status = request_status(&stack, "spring").await.unwrap_or(status);
    assert!(count(&status, "recipients", "pending") > 0, "{status}");
    assert_eq!(status["forecast"]["paused"], true, "{status}");
    assert!(status["forecast"]["uploads_done_by"].is_null());

    let (code, resumed) = call(&stack, "spring", "resume", None).await;
    assert_eq!(code, 200, "{resumed}");
    assert!(resumed.get("paused_at").is_none(), "{resumed}");
    let done = finished(&stack, "spring").await;
    assert_eq!(done["state"], "completed");
    assert_eq!(done["delivered"], 600);
    let sim = stack.esp.report();
    assert_eq!(sim.requests["spring"].counts.unique, 600, "every recipient");
    assert_eq!((sim.requests["spring"].counts.total, sim.deliveries.duplicates), (600, 0), "once");

    let (code, refused) = call(&stack, "spring", "resume", None).await;
    assert_eq!((code, &refused["state"]), (409, &json!("completed")), "{refused}");
    let (code, refused) = call(&stack, "spring", "cancel", None).await;
    assert_eq!(code, 409, "{refused}");
    stack.stop().await;
}

#[tokio::test]
async fn a_cancelled_campaign_ends_cancelled_with_every_recipient_delivered_once_or_cancelled() {
    let stack = slow_stack().start().await;
    campaign(&stack, "autumn", 600).await;
    eventually("sends under way", Duration::from_secs(30), || async {
        (stack.esp.report().send.calls_accepted >= 2).then_some(())
    })
    .await;

    let (code, cancelled) = call(&stack, "autumn", "cancel", None).await;
    assert_eq!(code, 200, "{cancelled}");
    assert!(cancelled["cancel_requested_at"].is_string(), "{cancelled}");
    let (code, again) = call(&stack, "autumn", "cancel", None).await;
    assert_eq!((code, &again["cancel_requested_at"]), (200, &cancelled["cancel_requested_at"]));
    let (code, refused) = call(&stack, "autumn", "pause", None).await;
    assert_eq!(code, 409, "{refused}");

    let done = finished(&stack, "autumn").await;
    assert_eq!(done["state"], "cancelled", "{done}");
    let delivered = done["delivered"].as_i64().unwrap();
    let cancelled = count(&done, "recipients", "cancelled");
    assert!(delivered > 0 && cancelled > 0, "{done}");
    assert_eq!(delivered + cancelled, 600, "{done}");
    let sim = stack.esp.report();
    assert_eq!(sim.requests["autumn"].counts.unique as i64, delivered);
    assert_eq!((sim.requests["autumn"].counts.total as i64, sim.deliveries.duplicates), (delivered, 0));
    let (code, still) = call(&stack, "autumn", "cancel", None).await;
    assert_eq!((code, &still["state"]), (200, &json!("cancelled")), "cancelling a cancelled request");

    // The list shows it with its outcome, by its label.
    let url = format!("{}/v1/requests?label=campaign:autumn&state=cancelled", stack.endpoints.trigger);
    let page: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let listed = &page["requests"][0];
    assert_eq!((listed["id"].as_str(), page["requests"].as_array().unwrap().len()), (Some("autumn"), 1));
    assert_eq!(listed["recipients"]["cancelled"].as_i64(), Some(cancelled));
    assert_eq!(listed["recipients"]["sent"].as_i64(), Some(delivered));
    stack.stop().await;
}

#[tokio::test]
async fn the_api_answers_unknown_ids_and_methods_with_404_and_bad_filters_with_400() {
    let stack = TestStack::default().start().await;
    let trigger = &stack.endpoints.trigger;

    let (code, body) = call(&stack, "nobody", "pause", None).await;
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("nobody"), "{body}");
    let (code, body) = call(&stack, "nobody", "explode", None).await;
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("no such method"), "{body}");
    let no_verb = reqwest::Client::new().post(format!("{trigger}/v1/requests/nobody")).send().await.unwrap();
    assert_eq!(no_verb.status(), 404);
    let (code, body) = call(&stack, "nobody", "pause", Some(json!({"why": "x"}))).await;
    assert_eq!(code, 400, "{body}");

    for query in [
        "state=lost",
        "class=urgent",
        "label=nokey",
        "page_size=0",
        "page_size=501",
        "page_token=x",
        "limit=3",
    ] {
        let answer = reqwest::get(format!("{trigger}/v1/requests?{query}")).await.unwrap();
        assert_eq!(answer.status(), 400, "{query}");
        let body: Value = answer.json().await.unwrap();
        assert!(body["error"].is_string(), "{query}: {body}");
    }
    let empty: Value = reqwest::get(format!("{trigger}/v1/requests")).await.unwrap().json().await.unwrap();
    assert_eq!(empty, json!({"requests": []}));
    stack.stop().await;
}
