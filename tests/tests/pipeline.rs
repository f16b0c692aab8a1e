//! The whole pipeline on the local stack (services in this process, stand-ins, ESP simulator,
//! real PostgreSQL): what a caller sees and what the ESP received.

use std::time::Duration;

use haishin_esp_sim::{Api, FaultRates, Faults};
use haishin_local::stack::{BUCKET, LocalStack};
use haishin_tests::{TestStack, eventually, finished, request_status};
use serde_json::{Value, json};

fn template() -> Value {
    json!({ "subject": "Hi {{name}}", "text": "Hello {{name}}" })
}

async fn publish(stack: &LocalStack, body: &Value) {
    stack.requests_topic.publish(body, &[]).await.expect("published");
}

/// A CSV audience of `n` good rows plus the bad rows given, written to the local Cloud Storage.
async fn csv_audience(stack: &LocalStack, name: &str, n: usize, extra: &str) -> String {
    let mut csv = String::from("email,name\n");
    for i in 0..n {
        csv.push_str(&format!("{name}-{i}@example.com,User {i}\n"));
    }
    csv.push_str(extra);
    let object = format!("audiences/{name}.csv");
    stack.blobs.write(BUCKET, &object, csv.into_bytes().into()).await.expect("audience written");
    format!("gs://{BUCKET}/{object}")
}

#[tokio::test]
async fn a_batch_and_realtime_events_are_delivered_exactly_once_with_counts_that_add_up() {
    let stack = TestStack::default().start().await;
    let bad_rows = "not-an-address,Bad\nbatch-1@example.com,Repeated\nshort-row@example.com\n";
    let uri = csv_audience(&stack, "batch", 450, bad_rows).await;

    publish(
        &stack,
        &json!({"id": "batch", "class": "batch", "template": template(),
        "audience": {"gcs": {"uris": [uri]}}, "labels": {"campaign": "c1"}}),
    )
    .await;
    for i in 0..3 {
        publish(
            &stack,
            &json!({"id": format!("event-{i}"), "class": "realtime", "priority": 5, "template": template(),
            "audience": {"inline": [{"email": format!("rt-{i}@example.com"), "params": {"name": "R"}}]}}),
        )
        .await;
    }

    let batch = finished(&stack, "batch").await;
    for i in 0..3 {
        assert_eq!(finished(&stack, &format!("event-{i}")).await["state"], "completed");
    }
    assert_eq!(batch["state"], "completed");
    assert_eq!(batch["audience"]["rows"], 453);
    assert_eq!(batch["audience"]["recipients"], 450);
    assert_eq!(
        batch["audience"]["skipped"],
        json!({"invalid_email": 1, "duplicate": 1, "missing_column": 1})
    );
    // 5 chunks of 100 prepared; the tail may have been cut into smaller pieces.
    let chunks = batch["audience"]["chunks"].as_i64().unwrap();
    assert!(chunks >= 5, "{chunks} chunks");
    assert_eq!(batch["delivered"], 450);

    let sim = stack.esp.report();
    assert_eq!(sim.requests["batch"].counts.unique, 450);
    assert_eq!(sim.deliveries.duplicates, 0);
    assert_eq!(sim.upload.over_limit_attempts + sim.send.over_limit_attempts, 0);
    assert!(sim.upload.peak_concurrency <= 2 && sim.send.peak_concurrency <= 2);

    // The completion job's summary row adds up: rows = recipients + skipped, recipients = sent.
    let logs = stack.config.run_dir.join("logs");
    let summary = eventually("the batch's summary row", Duration::from_secs(30), || async {
        let text = tokio::fs::read_to_string(logs.join("requests.ndjson")).await.ok()?;
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).find(|r| r["request_id"] == "batch")
    })
    .await;
    let skipped: i64 = summary["skipped"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(summary["audience_rows"].as_i64().unwrap(), summary["recipients"].as_i64().unwrap() + skipped);
    assert_eq!(summary["sent"], 450);
    assert_eq!(summary["labels"]["campaign"], "c1");
    let deliveries = tokio::fs::read_to_string(logs.join("deliveries.ndjson")).await.unwrap();
    let batch_rows: Vec<Value> = deliveries
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["request_id"] == "batch")
        .collect();
    assert_eq!(batch_rows.len() as i64, chunks, "one row per chunk");
    assert_eq!(batch_rows.iter().map(|r| r["delivered"].as_i64().unwrap()).sum::<i64>(), 450);

    stack.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_acknowledged_recorded_and_never_block_others() {
    let stack = TestStack::default().start().await;

    stack.requests_topic.publish(&"{not json", &[]).await.unwrap();
    publish(
        &stack,
        &json!({"id": "bad-class", "class": "urgent", "template": template(),
        "audience": {"inline": [{"email": "a@example.com", "params": {"name": "N"}}]}}),
    )
    .await;
    publish(&stack, &json!({"id": "no-audience", "class": "batch", "template": template()})).await;
    publish(
        &stack,
        &json!({"id": "fine", "class": "realtime", "template": template(),
        "audience": {"inline": [{"email": "a@example.com", "params": {"name": "N"}}]}}),
    )
    .await;

    let bad_class = finished(&stack, "bad-class").await;
    assert_eq!(bad_class["state"], "rejected");
    assert!(bad_class["reason"].as_str().unwrap().contains("urgent"), "{bad_class}");
    let no_audience = finished(&stack, "no-audience").await;
    assert_eq!(no_audience["state"], "rejected");
    assert!(no_audience["reason"].as_str().unwrap().contains("audience"), "{no_audience}");
    assert_eq!(finished(&stack, "fine").await["state"], "completed");

    let sub = stack
        .stand_ins
        .pubsub
        .subscription_stats("projects/haishin-local/subscriptions/trigger-requests")
        .unwrap();
    assert_eq!(sub.acked, 4, "every message acknowledged once: {sub:?}");
    assert_eq!((sub.nacked, sub.dead_lettered), (0, 0));
    let kept: i64 = sqlx_count(&stack, "SELECT count(*) FROM rejected_messages").await;
    assert_eq!(kept, 1, "the message without an id is kept with its reason");

    stack.stop().await;
}

async fn sqlx_count(stack: &LocalStack, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(stack.store.pool()).await.unwrap()
}

#[tokio::test]
async fn the_api_accepts_a_request_once_and_explains_a_refusal() {
    let stack = TestStack::default().start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/requests", stack.endpoints.trigger);
    let body = json!({"id": "direct", "class": "realtime", "template": template(),
        "audience": {"inline": [{"email": "d@example.com", "params": {"name": "N"}}]}});

    let first = client.post(&url).json(&body).send().await.unwrap();
    let again = client.post(&url).json(&body).send().await.unwrap();
    let bad = client.post(&url).json(&json!({"id": "x", "class": "batch"})).send().await.unwrap();

    assert_eq!(first.status(), 202);
    assert_eq!(again.status(), 200);
    assert_eq!(bad.status(), 400);
    let reason: Value = bad.json().await.unwrap();
    assert!(reason["error"].as_str().unwrap().contains("missing field"), "{reason}");
    assert_eq!(finished(&stack, "direct").await["state"], "completed");
    assert_eq!(stack.esp.report().requests["direct"].counts.total, 1);
    assert!(request_status(&stack, "never-sent").await.is_none());

    stack.stop().await;
}

#[tokio::test]
async fn push_and_task_routes_refuse_missing_or_wrong_tokens_and_change_nothing() {
    let stack = TestStack::default().start().await;
    let signer = &stack.stand_ins.signer;
    let impostor = haishin_stand_ins::TokenSigner::impostor();
    let request = json!({"id": "sneaky", "class": "realtime", "template": template(),
        "audience": {"inline": [{"email": "s@example.com", "params": {"name": "N"}}]}});
    let data = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        serde_json::to_vec(&request).unwrap(),
    );
    let envelope =
        json!({"message": {"data": data, "messageId": "1", "attributes": {}}, "subscription": "s"});
    let routes = [
        (format!("{}/push/requests", stack.endpoints.trigger), envelope.clone(), &stack.endpoints.trigger),
        (format!("{}/push/events", stack.endpoints.trigger), envelope.clone(), &stack.endpoints.trigger),
        (
            format!("{}/push/dead-letters", stack.endpoints.trigger),
            envelope.clone(),
            &stack.endpoints.trigger,
        ),
        (
            format!("{}/tasks/prepare", stack.endpoints.trigger),
            json!({"request_id": "sneaky"}),
            &stack.endpoints.trigger,
        ),
        (
            format!("{}/tasks/upload", stack.endpoints.list_uploader),
            json!({"chunk_id": "sneaky~000000", "request_id": "sneaky", "generation": 1}),
            &stack.endpoints.list_uploader,
        ),
        (format!("{}/push/deliveries", stack.endpoints.sender), envelope.clone(), &stack.endpoints.sender),
    ];
    let client = reqwest::Client::new();
    for (url, body, audience) in &routes {
        let tokens = [
            None,
            Some(impostor.sign(audience, haishin_local::stack::PUSH_ACCOUNT)),
            Some(signer.sign("https://somewhere-else.example", haishin_local::stack::PUSH_ACCOUNT)),
            Some(signer.sign(audience, "intruder@elsewhere.iam.gserviceaccount.com")),
        ];
        for token in tokens {
            let mut call = client.post(url).json(body);
            if let Some(token) = &token {
                call = call.bearer_auth(token);
            }
            let status = call.send().await.unwrap().status();
            // Cloud Run's front end answers 401 for a missing or invalid token, 403 for a valid one
            // of an account without the invoker binding.
            assert!(
                [401, 403].contains(&status.as_u16()),
                "{url} with token {:?}: {status}",
                token.map(|t| t.len())
            );
        }
    }
    assert!(request_status(&stack, "sneaky").await.is_none(), "nothing was stored");
    assert_eq!(stack.esp.report().upload.calls_accepted, 0);

    stack.stop().await;
}

#[tokio::test]
async fn behind_its_front_door_a_service_accepts_forwarded_tokens_and_still_checks_their_claims() {
    let stack = TestStack::default().start().await;
    let backend = &stack.endpoints.backends["trigger-0"];
    let door = &stack.endpoints.trigger;
    let forwarded = |audience: &str, account: &str| {
        let token = stack.stand_ins.signer.sign(audience, account);
        let (signed, _) = token.rsplit_once('.').unwrap();
        format!("{signed}.SIGNATURE_REMOVED_BY_GOOGLE")
    };
    let tick = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, br#"{"kind":"tick"}"#);
    let envelope =
        json!({"message": {"data": tick, "messageId": "t", "attributes": {}}, "subscription": "s"});
    let call = |url: String, token: Option<String>| {
        let mut call = reqwest::Client::new().post(url).json(&envelope);
        if let Some(token) = token {
            call = call.bearer_auth(token);
        }
        async move { call.send().await.unwrap().status().as_u16() }
    };

    let through_the_door = call(
        format!("{door}/push/events"),
        Some(stack.stand_ins.signer.sign(door, haishin_local::stack::PUSH_ACCOUNT)),
    )
    .await;
    let as_forwarded =
        call(format!("{backend}/push/events"), Some(forwarded(door, haishin_local::stack::PUSH_ACCOUNT)))
            .await;
    let no_token = call(format!("{backend}/push/events"), None).await;
    let other_audience = call(
        format!("{backend}/push/events"),
        Some(forwarded("https://elsewhere.example", haishin_local::stack::PUSH_ACCOUNT)),
    )
    .await;
    let stranger = call(
        format!("{backend}/push/events"),
        Some(forwarded(door, "intruder@elsewhere.iam.gserviceaccount.com")),
    )
    .await;

    assert_eq!((through_the_door, as_forwarded), (200, 200));
    assert_eq!((no_token, other_audience, stranger), (401, 401, 401));
    stack.stop().await;
}

#[tokio::test]
async fn small_realtime_events_are_sent_with_their_recipients_and_never_wait_for_a_list_upload() {
    let stack = TestStack { inline_recipients_max: 5, ..TestStack::default() }.start().await;
    let uri = csv_audience(&stack, "campaign", 400, "").await;
    publish(
        &stack,
        &json!({"id": "campaign", "class": "batch", "template": template(),
        "audience": {"gcs": {"uris": [uri]}}}),
    )
    .await;
    let event = |id: &str, n: usize| {
        let recipients: Vec<Value> = (0..n)
            .map(|i| json!({"email": format!("{id}-{i}@example.com"), "params": {"name": format!("{id} {i}")}}))
            .collect();
        json!({"id": id, "class": "realtime", "template": template(), "audience": {"inline": recipients}})
    };
    for i in 0..3 {
        publish(&stack, &event(&format!("restock-{i}"), 2)).await;
    }
    // More recipients than one send may carry: uploaded as a list, as a batch chunk is.
    publish(&stack, &event("fan-out", 8)).await;

    assert_eq!(finished(&stack, "campaign").await["delivered"], 400);
    for (id, n) in [("restock-0", 2), ("restock-1", 2), ("restock-2", 2), ("fan-out", 8)] {
        let status = finished(&stack, id).await;
        assert_eq!((&status["state"], &status["delivered"]), (&json!("completed"), &json!(n)), "{status}");
        assert_eq!(stack.esp.report().requests[id].counts.unique, n, "{id}");
    }
    let sent: Vec<String> =
        stack.esp.deliveries("restock-1").unwrap().recipients.into_iter().map(|r| r.email).collect();
    assert_eq!(sent, ["restock-1-0@example.com", "restock-1-1@example.com"]);
    let sim = stack.esp.report();
    assert_eq!(sim.deliveries.duplicates, 0);
    assert_eq!(sim.upload.over_limit_attempts + sim.send.over_limit_attempts, 0);
    let listed = sqlx_count(
        &stack,
        "SELECT count(*) FROM chunks WHERE list_id IS NOT NULL AND request_id IN ('campaign', 'fan-out')",
    )
    .await;
    assert_eq!(sim.upload.calls_accepted as i64, listed, "only the campaign and the fan-out were uploaded");
    let inline = sqlx_count(
        &stack,
        "SELECT count(*) FROM chunks WHERE request_id LIKE 'restock-%' AND list_id IS NULL AND state = 'completed'",
    )
    .await;
    assert_eq!(inline, 3, "each small event sent without a list");
    // An inline audience's small chunks hold their lines in their rows: no object is written or
    // read for them (the fan-out's list was uploaded from its rows too).
    let in_rows = sqlx_count(
        &stack,
        "SELECT count(*) FROM chunks WHERE (request_id LIKE 'restock-%' OR request_id = 'fan-out')
           AND lines IS NOT NULL",
    )
    .await;
    assert_eq!(in_rows, 4);
    for id in ["restock-0", "restock-1", "restock-2", "fan-out"] {
        let objects =
            stack.blobs.list(haishin_local::stack::BUCKET, &format!("requests/{id}/")).await.unwrap();
        assert_eq!(objects, Vec::<String>::new(), "{id}");
    }
    assert!(
        !stack
            .blobs
            .list(haishin_local::stack::BUCKET, "requests/campaign/chunks/")
            .await
            .unwrap()
            .is_empty(),
        "a file audience's chunks are objects"
    );
    stack.stop().await;
}

/// Publishes realtime events held back an hour, waits until each is prepared, then lets them
/// all start at once: the next dispatch round finds them together.
async fn release_together(stack: &LocalStack, events: &[Value]) {
    let held = chrono::Utc::now() + chrono::Duration::hours(1);
    for event in events {
        let mut event = event.clone();
        event["not_before"] = json!(held);
        publish(stack, &event).await;
    }
    for event in events {
        let id = event["id"].as_str().unwrap();
        eventually(&format!("{id} to be prepared"), Duration::from_secs(20), || async {
            request_status(stack, id).await.filter(|s| s["chunks"]["pending"] == 1)
        })
        .await;
    }
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    sqlx::query("UPDATE requests SET not_before = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(stack.store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn realtime_events_sharing_a_template_go_out_in_one_call_each_recipient_with_its_own_parameters() {
    let stack = TestStack { inline_recipients_max: 5, ..TestStack::default() }.start().await;
    let restock = template();
    let price_drop = json!({ "subject": "Cheaper now, {{name}}", "text": "{{name}}, it costs less" });
    let event = |id: &str, n: usize, template: &Value| {
        let recipients: Vec<Value> = (0..n)
            .map(|i| json!({"email": format!("{id}-{i}@example.com"), "params": {"name": format!("{id} {i}")}}))
            .collect();
        json!({"id": id, "class": "realtime", "template": template, "audience": {"inline": recipients}})
    };
    // Five recipients of the restock template fill one send; the price drops share another.
    let events = [
        event("restock-a", 1, &restock),
        event("restock-b", 2, &restock),
        event("drop-a", 1, &price_drop),
        event("restock-c", 1, &restock),
        event("drop-b", 2, &price_drop),
        event("restock-d", 1, &restock),
    ];
    release_together(&stack, &events).await;

    for event in &events {
        let id = event["id"].as_str().unwrap();
        let n = event["audience"]["inline"].as_array().unwrap().len();
        let status = finished(&stack, id).await;
        assert_eq!((&status["state"], &status["delivered"]), (&json!("completed"), &json!(n)), "{status}");
        let sent: Vec<(String, Value)> = stack
            .esp
            .deliveries(id)
            .unwrap()
            .recipients
            .into_iter()
            .map(|r| (r.email, r.params.unwrap_or_default()))
            .collect();
        let wanted: Vec<(String, Value)> =
            (0..n).map(|i| (format!("{id}-{i}@example.com"), json!({"name": format!("{id} {i}")}))).collect();
        assert_eq!(sent, wanted, "each recipient of {id} once, with its own parameters");
    }
    let sim = stack.esp.report();
    assert_eq!((sim.send.calls_accepted, sim.upload.calls_accepted), (2, 0), "one call per template");
    assert_eq!((sim.deliveries.total, sim.deliveries.duplicates), (8, 0));
    let deliveries = sqlx_count(&stack, "SELECT count(DISTINCT delivery_id) FROM chunks").await;
    assert_eq!(deliveries, 6, "each event its own delivery, polled and counted on its own");
    stack.stop().await;
}

#[tokio::test]
async fn a_send_batch_whose_answer_is_lost_leaves_each_event_to_the_esp_s_history_never_repeated() {
    let stack = TestStack { inline_recipients_max: 5, ..TestStack::default() }.start().await;
    let lost_answers = FaultRates { timeout_after_accept: 1.0, ..FaultRates::default() };
    let faults = Faults { timeout_hold: Duration::from_millis(50), ..Faults::only(Api::Send, lost_answers) };
    stack.esp.set_faults(faults).unwrap();
    let events: Vec<Value> = (0..4)
        .map(|i| {
            json!({"id": format!("lost-{i}"), "class": "realtime", "template": template(),
                   "audience": {"inline": [{"email": format!("lost-{i}@example.com"), "params": {"name": "L"}}]}})
        })
        .collect();
    release_together(&stack, &events).await;

    for i in 0..4 {
        let status = finished(&stack, &format!("lost-{i}")).await;
        assert_eq!((&status["state"], &status["delivered"]), (&json!("completed"), &json!(1)), "{status}");
    }
    let sim = stack.esp.report();
    assert_eq!(sim.send.calls_accepted, 1, "one call, whose answer was lost, and none after it");
    assert_eq!((sim.deliveries.total, sim.deliveries.duplicates), (4, 0), "each sent once");
    stack.stop().await;
}

#[tokio::test]
async fn an_inline_send_whose_answer_is_lost_is_found_in_the_esp_s_history_and_never_repeated() {
    let stack = TestStack { inline_recipients_max: 5, ..TestStack::default() }.start().await;
    // Half the sends are accepted and done, but their answer never arrives.
    let lost_answers = FaultRates { timeout_after_accept: 0.5, ..FaultRates::default() };
    let faults = Faults { timeout_hold: Duration::from_millis(50), ..Faults::only(Api::Send, lost_answers) };
    stack.esp.set_faults(faults).unwrap();
    for i in 0..8 {
        let recipients = json!([{"email": format!("back-{i}@example.com"), "params": {"name": "B"}}]);
        publish(
            &stack,
            &json!({"id": format!("back-{i}"), "class": "realtime", "template": template(),
                    "audience": {"inline": recipients}}),
        )
        .await;
    }

    for i in 0..8 {
        let status = finished(&stack, &format!("back-{i}")).await;
        assert_eq!((&status["state"], &status["delivered"]), (&json!("completed"), &json!(1)), "{status}");
    }
    let sim = stack.esp.report();
    assert!(sim.send.injected.timeout_after_accept > 0, "some answers were lost");
    assert_eq!((sim.deliveries.total, sim.deliveries.duplicates), (8, 0), "each sent once");
    assert_eq!(sim.upload.calls_accepted, 0);
    stack.stop().await;
}

#[tokio::test]
async fn two_triggers_on_one_database_never_dispatch_a_chunk_twice_or_exceed_the_limit() {
    let stack = TestStack { triggers: 2, chunk_size: 20, ..TestStack::default() }.start().await;
    let uri = csv_audience(&stack, "shared", 400, "").await;

    publish(
        &stack,
        &json!({"id": "shared", "class": "batch", "template": template(),
        "audience": {"gcs": {"uris": [uri]}}}),
    )
    .await;

    assert_eq!(finished(&stack, "shared").await["state"], "completed");
    let sim = stack.esp.report();
    assert_eq!(sim.requests["shared"].counts.unique, 400);
    let chunks = sqlx_count(&stack, "SELECT count(*) FROM chunks WHERE request_id = 'shared'").await;
    assert!(chunks >= 20, "20 chunks prepared, {chunks} once the tail was cut");
    assert_eq!(sim.upload.calls_accepted as i64, chunks, "each chunk uploaded once");
    assert_eq!(sim.deliveries.duplicates, 0);
    assert_eq!(sim.upload.over_limit_attempts + sim.send.over_limit_attempts, 0);
    let second =
        stack.stand_ins.pubsub.subscription_stats("projects/haishin-local/subscriptions/trigger-events-1");
    assert!(second.is_some_and(|s| s.acked > 0), "the second trigger received events too");
    stack.stop().await;
}

#[tokio::test]
async fn the_tail_is_cut_over_the_free_slots_and_each_recipient_gets_one_mail() {
    let stack = TestStack { esp_limit: 4, ..TestStack::default() }.start().await;
    let uri = csv_audience(&stack, "tail", 100, "").await;
    // Prepared on arrival, dispatched a moment later: all 100 recipients are one pending chunk
    // when the scheduler first looks, with 4 slots free.
    let not_before = chrono::Utc::now() + chrono::Duration::seconds(1);

    publish(
        &stack,
        &json!({"id": "tail", "class": "batch", "template": template(), "not_before": not_before,
        "audience": {"gcs": {"uris": [uri]}}}),
    )
    .await;

    let status = finished(&stack, "tail").await;
    assert_eq!(status["state"], "completed");
    // 100 pending over 4 slots: pieces of 100 / 4, none under a quarter of a chunk.
    let pieces: Vec<(i32, i32)> =
        sqlx::query_as("SELECT first_line, recipients FROM chunks WHERE request_id = 'tail' ORDER BY seq")
            .fetch_all(stack.store.pool())
            .await
            .unwrap();
    assert_eq!(pieces, [(0, 25), (25, 25), (50, 25), (75, 25)]);
    let chunks = pieces.len() as i64;
    assert_eq!(status["audience"]["chunks"].as_i64(), Some(chunks));
    assert_eq!(status["delivered"], 100);
    let sim = stack.esp.report();
    assert_eq!(sim.requests["tail"].counts.unique, 100);
    assert_eq!(sim.deliveries.duplicates, 0);
    assert_eq!(sim.upload.calls_accepted as i64, chunks, "each piece uploaded once");
    assert!(sim.upload.peak_concurrency <= 4);
    assert_eq!(sim.upload.over_limit_attempts + sim.send.over_limit_attempts, 0);
    stack.stop().await;
}
