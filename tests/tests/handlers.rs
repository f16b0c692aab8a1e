//! Each service's handlers, called as Pub/Sub and Cloud Tasks call them (with signed tokens), on
//! the local stack: redeliveries and retries never send twice.

use std::time::Duration;

use haishin_local::stack::{LocalStack, PUSH_ACCOUNT, TASKS_ACCOUNT};
use haishin_shared::domain::{Audience, ChunkId, ChunkState, Class, DeliveryRequest, Recipient, Template};
use haishin_shared::esp::{EspProvider, ListSendConfig, ListSendEsp, ListUpload, SendRequest};
use haishin_tests::TestStack;
use serde_json::{Value, json};

const CHUNK: &str = "manual~000000";

/// A request whose one chunk the test moves by hand (the trigger never dispatches it: the request
/// stays `preparing`), with its list already uploaded to the ESP.
async fn uploaded_chunk(stack: &LocalStack) -> (ListSendEsp, String) {
    let recipients: Vec<Recipient> = (0..3)
        .map(|i| Recipient { email: format!("m{i}@example.com"), params: Default::default() })
        .collect();
    let request = DeliveryRequest {
        id: "manual".into(),
        class: Class::Batch,
        priority: 0,
        template: Template::Stored { id: "t-1".into() },
        audience: Audience::Inline(recipients.clone()),
        not_before: None,
        deadline: None,
        labels: Default::default(),
    };
    haishin_trigger::intake::records::insert_request(&stack.store, &request).await.unwrap();
    let esp = ListSendEsp::new(
        ListSendConfig::new(stack.endpoints.esp.clone()).with_api_key(haishin_local::stack::ESP_API_KEY),
    )
    .unwrap();
    let list =
        esp.upload_list(&ListUpload::new("list:manual", "manual", &recipients).unwrap()).await.unwrap();
    sqlx::query(
        "UPDATE requests SET state = 'preparing', lease_until = now() + interval '1 hour' WHERE id = 'manual';
         ",
    )
    .execute(stack.store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO chunks (id, request_id, seq, class, priority, state, object, recipients, list_id, upload_attempts)
         VALUES ($1, 'manual', 0, 'batch', 0, 'uploaded', 'unused', 3, $2, 1)",
    )
    .bind(CHUNK)
    .bind(list.to_string())
    .execute(stack.store.pool())
    .await
    .unwrap();
    (esp, list.to_string())
}

fn push_envelope(message: &Value) -> Value {
    let data = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        serde_json::to_vec(message).unwrap(),
    );
    json!({"message": {"data": data, "messageId": "m-1", "attributes": {"class": "batch"}}, "subscription": "projects/haishin-local/subscriptions/sender-batch"})
}

async fn push_delivery(stack: &LocalStack) -> reqwest::StatusCode {
    let token = stack.stand_ins.signer.sign(&stack.endpoints.sender, PUSH_ACCOUNT);
    let body = push_envelope(&json!({"chunk_id": CHUNK, "request_id": "manual", "class": "batch"}));
    reqwest::Client::new()
        .post(format!("{}/push/deliveries", stack.endpoints.sender))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
}

async fn chunk_state(stack: &LocalStack) -> ChunkState {
    stack.store.chunk(&ChunkId::from(CHUNK)).await.unwrap().unwrap().state
}

#[tokio::test]
async fn the_same_push_delivered_twice_at_once_sends_once() {
    let stack = TestStack { call_latency: Duration::from_millis(100), ..TestStack::default() }.start().await;
    uploaded_chunk(&stack).await;

    let (a, b) = tokio::join!(push_delivery(&stack), push_delivery(&stack));

    // One sends; the other finds it in progress (409: come back later) or already sent (200).
    let mut statuses = [a.as_u16(), b.as_u16()];
    statuses.sort();
    assert!(statuses == [200, 409] || statuses == [200, 200], "{statuses:?}");
    assert_eq!(stack.esp.report().requests["manual"].counts.sends, 1);
    assert_eq!(chunk_state(&stack).await, ChunkState::Sent);
    stack.stop().await;
}

#[tokio::test]
async fn the_same_push_delivered_again_after_the_send_does_nothing() {
    let stack = TestStack::default().start().await;
    uploaded_chunk(&stack).await;

    assert_eq!(push_delivery(&stack).await, 200);
    assert_eq!(push_delivery(&stack).await, 200);

    let sim = stack.esp.report();
    assert_eq!(sim.requests["manual"].counts.sends, 1);
    assert_eq!(sim.deliveries.duplicates, 0);
    stack.stop().await;
}

#[tokio::test]
async fn a_send_taken_over_after_a_crash_is_found_in_the_esp_history_not_repeated() {
    let stack = TestStack::default().start().await;
    let (esp, list) = uploaded_chunk(&stack).await;
    // An earlier attempt reached the ESP, then its worker died before recording the outcome.
    esp.send(&SendRequest {
        idempotency_key: haishin_sender::send_key(&ChunkId::from(CHUNK)),
        request_id: "manual".into(),
        to: haishin_shared::esp::SendTo::List { list_id: haishin_shared::esp::ListId(list) },
        template: Template::Stored { id: "t-1".into() },
        class: Class::Batch,
    })
    .await
    .unwrap();
    sqlx::query(
        "UPDATE chunks SET state = 'sending', send_attempts = 1, lease_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind(CHUNK)
    .execute(stack.store.pool())
    .await
    .unwrap();

    assert_eq!(push_delivery(&stack).await, 200);

    assert_eq!(chunk_state(&stack).await, ChunkState::Sent);
    let sim = stack.esp.report();
    assert_eq!(sim.requests["manual"].counts.sends, 1, "not sent a second time");
    assert_eq!(sim.deliveries.duplicates, 0);
    stack.stop().await;
}

#[tokio::test]
async fn an_upload_task_retried_after_its_work_succeeded_does_nothing() {
    let stack = TestStack::default().start().await;
    uploaded_chunk(&stack).await;
    let uploads_before = stack.esp.report().upload.calls_accepted;
    let token = stack.stand_ins.signer.sign(&stack.endpoints.list_uploader, TASKS_ACCOUNT);

    let status = reqwest::Client::new()
        .post(format!("{}/tasks/upload", stack.endpoints.list_uploader))
        .bearer_auth(token)
        .header("X-CloudTasks-TaskRetryCount", "1")
        .json(&json!({"chunk_id": CHUNK, "request_id": "manual", "generation": 1}))
        .send()
        .await
        .unwrap()
        .status();

    assert_eq!(status, 200);
    assert_eq!(stack.esp.report().upload.calls_accepted, uploads_before);
    assert_eq!(chunk_state(&stack).await, ChunkState::Uploaded);
    stack.stop().await;
}

#[tokio::test]
async fn a_dead_lettered_message_shows_in_its_request_status_and_a_dead_lettered_request_is_taken_in() {
    let stack = TestStack::default().start().await;
    uploaded_chunk(&stack).await;
    let token = stack.stand_ins.signer.sign(&stack.endpoints.trigger, PUSH_ACCOUNT);
    let post = |body: Value| {
        let token = token.clone();
        let url = format!("{}/push/dead-letters", stack.endpoints.trigger);
        async move {
            reqwest::Client::new().post(url).bearer_auth(token).json(&body).send().await.unwrap().status()
        }
    };
    let mut dead_chunk = push_envelope(&json!({"chunk_id": CHUNK, "request_id": "manual", "class": "batch"}));
    dead_chunk["message"]["attributes"] = json!({"CloudPubSubDeadLetterSourceSubscription": "projects/haishin-local/subscriptions/sender-batch"});
    let dead_request = push_envelope(&json!({"id": "late", "class": "realtime", "template": {"id": "t-1"},
        "audience": {"inline": [{"email": "late@example.com", "params": {"name": "N"}}]}}));
    let mut dead_request = dead_request;
    dead_request["message"]["messageId"] = json!("m-2");

    assert_eq!(post(dead_chunk.clone()).await, 200);
    assert_eq!(post(dead_chunk).await, 200, "a redelivered dead letter is kept once");
    assert_eq!(post(dead_request).await, 200);

    let status = haishin_tests::request_status(&stack, "manual").await.unwrap();
    let letters = status["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["source"], "projects/haishin-local/subscriptions/sender-batch");
    assert_eq!(letters[0]["chunk_id"], CHUNK);
    assert_eq!(haishin_tests::finished(&stack, "late").await["state"], "completed");
    stack.stop().await;
}
