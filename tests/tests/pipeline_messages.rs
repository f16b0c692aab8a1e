//! The whole pipeline through message-based providers, on servers nobody here wrote: aiosmtpd
//! (SMTP) and moto (Amazon SES). What counts is what the server recorded: every recipient exactly
//! once, rendered, with the unsubscribe headers; a refused recipient counted failed while the rest
//! go on; a batch whose call died mid-way counted unknown, never handed over again.

use std::collections::BTreeMap;

use haishin_local::stack::{LocalStack, MailProvider, PUSH_ACCOUNT, UNSUBSCRIBE_URL};
use haishin_shared::domain::{ChunkId, ChunkState};
use haishin_tests::mail_servers::{MotoServer, SmtpBehaviour, SmtpRecorder};
use haishin_tests::{TestStack, finished};
use serde_json::{Value, json};

fn template() -> Value {
    json!({
        "subject": "Hello {{name}}",
        "text": "Hi {{name}}, your code is {{code}}.",
        "html": "<p>Hi {{name}}, your code is <b>{{code}}</b>.</p>",
    })
}

fn inline(prefix: &str, n: usize) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("{prefix}-{i}@example.com"), "params": {"name": format!("User {i}"), "code": i}}))
        .collect();
    json!({ "inline": recipients })
}

async fn publish(stack: &LocalStack, body: &Value) {
    stack.requests_topic.publish(body, &[]).await.expect("published");
}

fn stack_on(provider: MailProvider) -> TestStack {
    TestStack { provider, chunk_size: 40, esp_limit: 3, ..TestStack::default() }
}

/// How many messages each recipient address received.
fn per_address<'a>(addresses: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for address in addresses {
        *counts.entry(address.to_owned()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn smtp_receives_every_recipient_once_rendered_with_the_unsubscribe_headers() {
    let refused = "batch-7@example.com".to_owned();
    let behaviour = SmtpBehaviour { refuse: vec![refused.clone()], ..SmtpBehaviour::default() };
    let Some(smtp) = SmtpRecorder::start(behaviour).await else { return };
    let stack =
        stack_on(MailProvider::Smtp { url: smtp.url.clone(), messages_per_second: None }).start().await;

    publish(
        &stack,
        &json!({"id": "batch", "class": "batch", "template": template(), "audience": inline("batch", 150)}),
    )
    .await;
    publish(
        &stack,
        &json!({"id": "event", "class": "realtime", "template": template(), "audience": inline("rt", 1)}),
    )
    .await;

    let batch = finished(&stack, "batch").await;
    assert_eq!(finished(&stack, "event").await["state"], "completed");
    assert_eq!(batch["state"], "completed");
    let received = smtp.received();
    let counts = per_address(
        received.iter().flat_map(|m| m["rcpt_tos"].as_array().unwrap()).map(|a| a.as_str().unwrap()),
    );
    assert_eq!(counts.len(), 150, "149 batch recipients and the event's one");
    assert!(counts.values().all(|&n| n == 1), "each recipient once: {counts:?}");
    assert!(!counts.contains_key(&refused));

    let message =
        received.iter().find(|m| m["rcpt_tos"][0] == "batch-3@example.com").expect("batch-3 received");
    assert_eq!(message["subject"], "Hello User 3");
    assert_eq!(message["content_type"], "multipart/alternative");
    assert_eq!(message["defects"], json!([]));
    assert_eq!(message["date_valid"], true);
    let parts = message["parts"].as_array().unwrap();
    assert!(parts[0]["content"].as_str().unwrap().contains("your code is 3."), "{parts:?}");
    assert!(parts[1]["content"].as_str().unwrap().contains("<b>3</b>"), "{parts:?}");
    assert!(message["list_unsubscribe"].as_str().unwrap().starts_with(&format!("<{UNSUBSCRIBE_URL}/")));
    assert_eq!(message["list_unsubscribe_post"], "List-Unsubscribe=One-Click");
    let ids = per_address(received.iter().map(|m| m["message_id"].as_str().unwrap()));
    assert_eq!(ids.len(), received.len(), "a Message-ID per recipient");

    assert_eq!(
        (&batch["delivered"], &batch["failed"], &batch["unknown"]),
        (&json!(149), &json!(1), &json!(0)),
        "{batch}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn ses_in_moto_holds_every_recipient_once() {
    let Some(moto) = MotoServer::start().await else { return };
    let stack = stack_on(MailProvider::Ses { endpoint: moto.endpoint.clone(), messages_per_second: None })
        .start()
        .await;

    publish(
        &stack,
        &json!({"id": "batch", "class": "batch", "template": template(), "audience": inline("ses", 90)}),
    )
    .await;

    let batch = finished(&stack, "batch").await;
    assert_eq!(batch["state"], "completed");
    assert_eq!(batch["delivered"], 90, "{batch}");
    let sent = moto.sent_raw_messages().await;
    // moto lists the To header's addresses after the envelope's: a message's recipient may show twice.
    let counts = per_address(sent.iter().flat_map(|m| {
        let mut to: Vec<&str> =
            m["destinations"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        to.sort();
        to.dedup();
        to
    }));
    assert_eq!(counts.len(), 90);
    assert!(counts.values().all(|&n| n == 1), "each recipient once: {counts:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_realtime_event_overtakes_a_batch_chunk_already_being_sent() {
    // A relay that takes 10 ms a message: the batch's 600 take at least 6 s on its one connection.
    let slow =
        SmtpBehaviour { delay: Some(std::time::Duration::from_millis(10)), ..SmtpBehaviour::default() };
    let Some(smtp) = SmtpRecorder::start(slow).await else { return };
    // One send slot and one large chunk: without giving way, the event would wait for all of it.
    let stack = TestStack {
        provider: MailProvider::Smtp { url: smtp.url.clone(), messages_per_second: None },
        chunk_size: 600,
        esp_limit: 1,
        ..TestStack::default()
    }
    .start()
    .await;
    publish(
        &stack,
        &json!({"id": "batch", "class": "batch", "template": template(), "audience": inline("batch", 600)}),
    )
    .await;
    haishin_tests::eventually("the batch to start arriving", std::time::Duration::from_secs(30), || async {
        (!smtp.received().is_empty()).then_some(())
    })
    .await;

    publish(
        &stack,
        &json!({"id": "event", "class": "realtime", "template": template(), "audience": inline("rt", 1)}),
    )
    .await;

    assert_eq!(finished(&stack, "event").await["state"], "completed");
    let batch = finished(&stack, "batch").await;
    assert_eq!(batch["state"], "completed");
    let order: Vec<String> =
        smtp.received().iter().map(|m| m["rcpt_tos"][0].as_str().unwrap().to_owned()).collect();
    let event_at = order.iter().position(|a| a == "rt-0@example.com").expect("the event was received");
    assert!(event_at < 500, "the event arrived after {event_at} of the batch's 600 messages");
    assert_eq!(per_address(order.iter().map(String::as_str)).len(), 601, "each recipient once");
    assert_eq!(order.len(), 601);
    stack.stop().await;
}

#[tokio::test]
async fn a_batch_whose_call_died_counts_unknown_and_is_never_handed_over_again() {
    let Some(smtp) = SmtpRecorder::start(SmtpBehaviour::default()).await else { return };
    let stack =
        stack_on(MailProvider::Smtp { url: smtp.url.clone(), messages_per_second: None }).start().await;
    let chunk = ChunkId::from("crashed~000000");
    manual_chunk(&stack, "crashed", 10).await;
    // An earlier attempt handed over messages 0..3 and died before it heard back: the row says so.
    sqlx::query(
        "UPDATE chunks SET state = 'sending', send_attempts = 1, progress = 3, in_flight = '{0,1,2}',
             lease_until = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(&chunk)
    .execute(stack.store.pool())
    .await
    .unwrap();

    assert_eq!(push_delivery(&stack, &chunk, "crashed").await, 200);

    let row = stack.store.chunk(&chunk).await.unwrap().unwrap();
    assert_eq!(row.state, ChunkState::Completed);
    assert_eq!((row.delivered, row.unknown, row.in_flight), (Some(7), Some(3), None));
    let received: Vec<String> =
        smtp.received().iter().map(|m| m["rcpt_tos"][0].as_str().unwrap().to_owned()).collect();
    assert_eq!(received.len(), 7);
    assert!(
        received
            .iter()
            .all(|a| !["m-0@example.com", "m-1@example.com", "m-2@example.com"].contains(&a.as_str()))
    );
    stack.stop().await;
}

/// A request whose one chunk the test moves by hand (the request stays `preparing`, so the trigger
/// never dispatches it), its recipients in a chunk object as the audience step writes them.
async fn manual_chunk(stack: &LocalStack, id: &str, n: usize) {
    let audience = inline("m", n);
    let request = json!({"id": id, "class": "batch", "template": template(), "audience": audience});
    let request: haishin_shared::domain::DeliveryRequest = serde_json::from_value(request).unwrap();
    haishin_trigger::intake::records::insert_request(&stack.store, &request).await.unwrap();
    sqlx::query(
        "UPDATE requests SET state = 'preparing', lease_until = now() + interval '1 hour' WHERE id = $1",
    )
    .bind(id)
    .execute(stack.store.pool())
    .await
    .unwrap();
    let lines: String = audience["inline"].as_array().unwrap().iter().map(|r| format!("{r}\n")).collect();
    let object = format!("requests/{id}/chunks/000000.ndjson");
    stack.blobs.write(haishin_local::stack::BUCKET, &object, lines.into_bytes().into()).await.unwrap();
    sqlx::query(
        "INSERT INTO chunks (id, request_id, seq, class, priority, state, object, recipients)
         VALUES ($1, $2, 0, 'batch', 0, 'uploaded', $3, $4)",
    )
    .bind(format!("{id}~000000"))
    .bind(id)
    .bind(object)
    .bind(n as i32)
    .execute(stack.store.pool())
    .await
    .unwrap();
}

async fn push_delivery(stack: &LocalStack, chunk: &ChunkId, request: &str) -> u16 {
    let token = stack.stand_ins.signer.sign(&stack.endpoints.sender, PUSH_ACCOUNT);
    let message = json!({"chunk_id": chunk, "request_id": request, "class": "batch"});
    let data = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        serde_json::to_vec(&message).unwrap(),
    );
    let body = json!({"message": {"data": data, "messageId": "m-1", "attributes": {"class": "batch"}},
                      "subscription": "projects/haishin-local/subscriptions/sender-batch"});
    let response = reqwest::Client::new()
        .post(format!("{}/push/deliveries", stack.endpoints.sender))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}
