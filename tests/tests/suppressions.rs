//! Suppressions and one-click unsubscribe: the API (put, get, list, delete, import from Cloud
//! Storage), an address skipped when chunks are built and counted `suppressed`, an address
//! suppressed after that and before the send left out and counted so that every count still adds
//! up, and the `List-Unsubscribe` link of a rendered message unsubscribing its recipient, while
//! forged and expired links change nothing.

use std::time::Duration;

use haishin_local::stack::{BUCKET, LocalStack, MailProvider, UNSUBSCRIBE_SECRET};
use haishin_shared::domain::DeliveryRequest;
use haishin_shared::unsubscribe::{TokenClaims, TokenKey};
use haishin_tests::mail_servers::{SmtpBehaviour, SmtpRecorder};
use haishin_tests::{TestStack, eventually, finished, fresh_database, request_status};
use haishin_trigger::prepare::together::Together;
use haishin_trigger::public::{PublicConfig, PublicEntry};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn suppression_url(stack: &LocalStack, address: &str) -> String {
    let segment: String = address.replace('+', "%2B");
    format!("{}/v1/suppressions/{segment}", stack.endpoints.trigger)
}

async fn put(stack: &LocalStack, address: &str, body: Value) -> (StatusCode, Value) {
    let answer = client().put(suppression_url(stack, address)).json(&body).send().await.unwrap();
    (answer.status(), answer.json().await.unwrap_or(Value::Null))
}

async fn get(url: &str) -> (StatusCode, Value) {
    let answer = client().get(url).send().await.unwrap();
    (answer.status(), answer.json().await.unwrap_or(Value::Null))
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("an error body: {body}"))
}

async fn publish(stack: &LocalStack, body: &Value) {
    stack.requests_topic.publish(body, &[]).await.expect("published");
}

fn template() -> Value {
    json!({"subject": "Hello {{name}}", "text": "Hi {{name}}."})
}

fn audience(addresses: &[&str]) -> Value {
    let recipients: Vec<Value> =
        addresses.iter().map(|a| json!({"email": a, "params": {"name": "N"}})).collect();
    json!({ "inline": recipients })
}

/// The addresses the SMTP server received, one per message.
fn received(smtp: &SmtpRecorder) -> Vec<String> {
    smtp.received().iter().map(|m| m["rcpt_tos"][0].as_str().unwrap().to_owned()).collect()
}

/// The token of a `List-Unsubscribe: <https://…/unsubscribe/TOKEN>` header.
fn token_of(list_unsubscribe: &str) -> String {
    list_unsubscribe.trim_matches(['<', '>']).rsplit('/').next().unwrap().to_owned()
}

fn one_click(url: &str) -> reqwest::RequestBuilder {
    client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
}

#[tokio::test]
async fn suppressions_are_put_read_listed_lifted_and_imported_with_bad_lines_counted() {
    let stack = TestStack::default().start().await;

    let (code, entry) =
        put(&stack, "User@BÜCHER.example", json!({"reason": "complained", "source": "crm"})).await;
    assert_eq!(code, StatusCode::CREATED, "{entry}");
    assert_eq!(entry["address"], "user@xn--bcher-kva.example", "kept under its key, nothing more");
    assert_eq!(
        (&entry["scope"], &entry["reason"], &entry["source"]),
        (&json!("global"), &json!("complained"), &json!("crm"))
    );
    let (code, again) = put(&stack, "user@xn--bcher-kva.example", json!({"reason": "bounced"})).await;
    assert_eq!(
        (code, &again["reason"], &again["created_at"]),
        (StatusCode::OK, &json!("bounced"), &entry["created_at"])
    );
    let (code, _) = put(&stack, "user@bücher.example", json!({"scope": "category:promotions"})).await;
    assert_eq!(code, StatusCode::CREATED);

    let (code, read) = get(&suppression_url(&stack, "USER@bücher.example")).await;
    assert_eq!(code, StatusCode::OK);
    let scopes: Vec<&str> =
        read["suppressions"].as_array().unwrap().iter().map(|s| s["scope"].as_str().unwrap()).collect();
    assert_eq!(scopes, ["category:promotions", "global"]);

    for (address, body, wanted) in [
        ("not-an-address", json!({}), "not an email address"),
        ("a@example.com", json!({"scope": "promotions"}), "neither `global` nor a label"),
        ("a@example.com", json!({"reason": "spam"}), "reason `spam` is not one of"),
        ("a@example.com", json!({"scpoe": "global"}), "unknown field `scpoe`"),
    ] {
        let (code, answer) = put(&stack, address, body).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{answer}");
        assert!(error_of(&answer).contains(wanted), "{answer}");
    }

    // Import: one address per line, and a gzipped CSV with an `email` column.
    let plain = "a@example.com\n\nnot-an-address\nB@Example.com\na@example.com\n";
    stack.blobs.write(BUCKET, "lists/plain.txt", plain.as_bytes().to_vec().into()).await.unwrap();
    let csv = "id,email,name\n1,c@example.com,C\n2,,D\n3,\"d@example.com\",E\n";
    stack.blobs.write(BUCKET, "lists/export-1.csv.gz", gzip(csv).await.into()).await.unwrap();
    let import = |body: Value| {
        client().post(format!("{}/v1/suppressions:import", stack.endpoints.trigger)).json(&body).send()
    };
    let answer = import(json!({"uris": [format!("gs://{BUCKET}/lists/plain.txt")]})).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let report: Value = answer.json().await.unwrap();
    assert_eq!(
        (&report["lines"], &report["added"], &report["already_suppressed"], &report["bad"]),
        (&json!(4), &json!(2), &json!(1), &json!(1)),
        "{report}"
    );
    assert_eq!(report["bad_at"], json!([format!("gs://{BUCKET}/lists/plain.txt:3")]));
    let answer = import(json!({"uris": [format!("gs://{BUCKET}/lists/export-*.csv.gz")],
                               "scope": "category:promotions", "reason": "bounced"}))
    .await
    .unwrap();
    let report: Value = answer.json().await.unwrap();
    assert_eq!((&report["added"], &report["bad"]), (&json!(2), &json!(1)), "{report}");
    assert_eq!(report["bad_at"], json!([format!("gs://{BUCKET}/lists/export-1.csv.gz:3")]));
    for (body, wanted) in [
        (json!({"uris": [format!("gs://{BUCKET}/lists/missing.txt")]}), "lists/missing.txt"),
        (json!({"uris": ["https://example.com/list.txt"]}), "is not a gs:// uri"),
        (json!({"uris": []}), "uris is required"),
        (json!({"uris": [format!("gs://{BUCKET}/lists/plain.txt")], "reason": "nope"}), "reason `nope`"),
    ] {
        let answer = import(body).await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
        let answer: Value = answer.json().await.unwrap();
        assert!(error_of(&answer).contains(wanted), "{answer}");
    }

    // The list, a page at a time, newest first, filtered.
    let mut seen = Vec::new();
    let mut url = format!("{}/v1/suppressions?page_size=2", stack.endpoints.trigger);
    loop {
        let (code, page) = get(&url).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        seen.extend(page["suppressions"].as_array().unwrap().iter().cloned());
        match page["next_page_token"].as_str() {
            Some(token) => {
                url = format!("{}/v1/suppressions?page_size=2&page_token={token}", stack.endpoints.trigger)
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "2 put, 2 imported globally, 2 for promotions: {seen:?}");
    let times: Vec<&str> = seen.iter().map(|s| s["created_at"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    let (_, promotions) =
        get(&format!("{}/v1/suppressions?scope=category:promotions&reason=bounced", stack.endpoints.trigger))
            .await;
    let addresses: Vec<&str> = promotions["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["d@example.com", "c@example.com"]);
    for query in ["page_token=forged", "page_size=0", "colour=red", "reason=spam"] {
        let (code, answer) = get(&format!("{}/v1/suppressions?{query}", stack.endpoints.trigger)).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{query}: {answer}");
    }

    // Lifting one: in its scope, global unless the query names another.
    let delete =
        |query: &str| client().delete(format!("{}{query}", suppression_url(&stack, "b@example.com"))).send();
    let answer = delete("?scope=nope").await.unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(error_of(&answer.json().await.unwrap()).contains("neither `global` nor a label"));
    assert_eq!(delete("?scope=category:promotions").await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(delete("").await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(delete("?scope=global").await.unwrap().status(), StatusCode::NOT_FOUND);
    let (code, answer) = get(&suppression_url(&stack, "b@example.com")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(error_of(&answer).contains("is not suppressed"));
    stack.stop().await;
}

#[tokio::test]
async fn a_suppressed_address_is_skipped_when_chunks_are_built_and_counted_suppressed() {
    let stack = TestStack::default().start().await;
    put(&stack, "a@example.com", json!({})).await;
    put(&stack, "b@example.com", json!({"scope": "category:promotions"})).await;
    put(&stack, "c@example.com", json!({"scope": "category:other"})).await;

    let addresses = ["a@example.com", "B@example.com", "c@example.com", "d@example.com", "A@EXAMPLE.com"];
    publish(
        &stack,
        &json!({"id": "promo", "class": "batch", "template": {"id": "t"},
                            "audience": audience(&addresses), "labels": {"category": "promotions"}}),
    )
    .await;
    publish(
        &stack,
        &json!({"id": "only-suppressed", "class": "batch", "template": {"id": "t"},
                            "audience": audience(&["a@example.com"])}),
    )
    .await;

    let status = finished(&stack, "promo").await;
    assert_eq!(status["state"], "completed", "{status}");
    let audience = &status["audience"];
    assert_eq!((&audience["rows"], &audience["recipients"]), (&json!(5), &json!(2)), "{status}");
    assert_eq!(audience["skipped"], json!({"suppressed": 2, "duplicate": 1}));
    assert_eq!(audience["skipped_at"]["suppressed"], json!(["inline:1", "inline:2"]));
    let sent: Vec<String> =
        stack.esp.deliveries("promo").unwrap().recipients.into_iter().map(|r| r.email).collect();
    assert_eq!(sent, ["c@example.com", "d@example.com"], "c is suppressed for another category only");
    let status = finished(&stack, "only-suppressed").await;
    assert_eq!(
        (&status["state"], &status["audience"]["chunks"]),
        (&json!("completed"), &json!(0)),
        "{status}"
    );
    assert!(stack.esp.deliveries("only-suppressed").is_none());
    stack.stop().await;
}

/// Publishes `id` to start in an hour (`not_before`), waits until it is prepared, suppresses
/// `later` globally, then lets it start now: the chunks are built before the suppressions, and go
/// out after them.
async fn suppress_after_prepare(stack: &LocalStack, id: &str, addresses: &[&str], later: &[&str]) {
    suppress_after_prepare_held(stack, id, addresses, later).await;
    sqlx::query("UPDATE requests SET not_before = now() WHERE id = $1")
        .bind(id)
        .execute(stack.store.pool())
        .await
        .unwrap();
}

/// As [`suppress_after_prepare`], but the request stays held back (`not_before` an hour ahead).
async fn suppress_after_prepare_held(stack: &LocalStack, id: &str, addresses: &[&str], later: &[&str]) {
    let not_before = chrono::Utc::now() + chrono::Duration::hours(1);
    let request = json!({"id": id, "class": "batch", "template": template(), "audience": audience(addresses),
                         "not_before": not_before});
    publish(stack, &request).await;
    let status = eventually(&format!("{id} to be prepared"), Duration::from_secs(20), || async {
        request_status(stack, id).await.filter(|s| !s["audience"].is_null())
    })
    .await;
    assert_eq!(status["audience"]["skipped"], json!({}), "nothing suppressed yet: {status}");
    assert!(status["chunks"]["pending"].as_i64().unwrap() > 0, "nothing dispatched yet: {status}");
    for address in later {
        assert_eq!(put(stack, address, json!({"reason": "unsubscribed"})).await.0, StatusCode::CREATED);
    }
}

/// The request as `GET /v1/requests` lists it, with its recipients by outcome.
async fn listed(stack: &LocalStack, id: &str) -> Value {
    let (_, page) = get(&format!("{}/v1/requests?page_size=100", stack.endpoints.trigger)).await;
    page["requests"].as_array().unwrap().iter().find(|r| r["id"] == id).cloned().expect("listed")
}

fn assert_outcomes_add_up(summary: &Value) {
    let r = &summary["recipients"];
    let sum: i64 =
        ["pending", "in_flight", "sent", "failed", "expired", "cancelled", "unknown", "suppressed"]
            .iter()
            .map(|k| r[*k].as_i64().unwrap())
            .sum();
    assert_eq!(Some(sum), r["total"].as_i64(), "{summary}");
}

#[tokio::test]
async fn a_realtime_event_sent_without_a_list_leaves_out_an_address_suppressed_after_preparation() {
    let stack = TestStack { inline_recipients_max: 10, ..TestStack::default() }.start().await;
    let not_before = chrono::Utc::now() + chrono::Duration::hours(1);
    let addresses = ["r-1@example.com", "r-2@example.com", "r-3@example.com"];
    let request = json!({"id": "restock", "class": "realtime", "template": template(),
                         "audience": audience(&addresses), "not_before": not_before});
    publish(&stack, &request).await;
    let everyone = json!({"id": "restock-all", "class": "realtime", "template": template(),
                          "audience": audience(&["r-2@example.com"]), "not_before": not_before});
    publish(&stack, &everyone).await;
    for id in ["restock", "restock-all"] {
        eventually(&format!("{id} to be prepared"), Duration::from_secs(20), || async {
            request_status(&stack, id).await.filter(|s| s["chunks"]["pending"].as_i64() == Some(1))
        })
        .await;
    }
    assert_eq!(
        put(&stack, "R-2@example.com", json!({"reason": "unsubscribed"})).await.0,
        StatusCode::CREATED
    );
    sqlx::query("UPDATE requests SET not_before = now()").execute(stack.store.pool()).await.unwrap();

    let status = finished(&stack, "restock").await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!((&status["delivered"], &status["suppressed"]), (&json!(2), &json!(1)), "{status}");
    let sent: Vec<String> =
        stack.esp.deliveries("restock").unwrap().recipients.into_iter().map(|r| r.email).collect();
    assert_eq!(sent, ["r-1@example.com", "r-3@example.com"]);
    let status = finished(&stack, "restock-all").await;
    assert_eq!((&status["state"], &status["suppressed"]), (&json!("completed"), &json!(1)), "{status}");
    assert!(stack.esp.deliveries("restock-all").is_none(), "nothing sent");
    assert_outcomes_add_up(&listed(&stack, "restock").await);
    let report = stack.esp.report();
    assert_eq!((report.upload.calls_accepted, report.send.calls_accepted), (0, 1), "no list uploaded");
    stack.stop().await;
}

#[tokio::test]
async fn an_address_suppressed_after_preparation_is_not_sent_through_smtp_and_the_counts_add_up() {
    let Some(smtp) = SmtpRecorder::start(SmtpBehaviour::default()).await else { return };
    let stack = TestStack {
        provider: MailProvider::Smtp { url: smtp.url.clone(), messages_per_second: None },
        chunk_size: 20,
        ..TestStack::default()
    }
    .start()
    .await;
    let addresses: Vec<String> = (0..30).map(|i| format!("late-{i}@example.com")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();

    suppress_after_prepare(&stack, "late", &addresses, &["late-3@example.com", "LATE-25@example.com"]).await;

    let status = finished(&stack, "late").await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(
        (&status["delivered"], &status["suppressed"], &status["failed"]),
        (&json!(28), &json!(2), &json!(0))
    );
    assert_eq!(status["audience"]["recipients"], 30, "prepared before the suppressions: {status}");
    let got = received(&smtp);
    assert_eq!(got.len(), 28);
    assert!(!got.iter().any(|a| a == "late-3@example.com" || a == "late-25@example.com"), "{got:?}");
    let summary = listed(&stack, "late").await;
    assert_eq!(
        (&summary["recipients"]["sent"], &summary["recipients"]["suppressed"]),
        (&json!(28), &json!(2))
    );
    assert_outcomes_add_up(&summary);
    let chunks = stack.store.chunks_of(&"late".into()).await.unwrap();
    let per_chunk: i64 = chunks.iter().filter_map(|c| c.suppressed).sum();
    assert_eq!(per_chunk, 2, "counted on the chunks that held them: {chunks:?}");
    stack.stop().await;
}

#[tokio::test]
async fn an_address_suppressed_after_preparation_is_left_out_of_the_uploaded_list() {
    let stack = TestStack::default().start().await;
    let addresses: Vec<String> = (0..10).map(|i| format!("list-{i}@example.com")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    suppress_after_prepare(&stack, "list", &addresses, &["list-4@example.com"]).await;
    suppress_after_prepare(&stack, "gone", &["gone@example.com"], &["gone@example.com"]).await;

    let status = finished(&stack, "list").await;
    assert_eq!(
        (&status["state"], &status["suppressed"], &status["delivered"]),
        (&json!("completed"), &json!(1), &json!(9))
    );
    let sent: Vec<String> =
        stack.esp.deliveries("list").unwrap().recipients.into_iter().map(|r| r.email).collect();
    assert_eq!(sent.len(), 9);
    assert!(!sent.contains(&"list-4@example.com".to_owned()));
    assert_outcomes_add_up(&listed(&stack, "list").await);
    // Nobody left to send to: the chunk is completed without calling the ESP.
    let status = finished(&stack, "gone").await;
    assert_eq!((&status["state"], &status["suppressed"]), (&json!("completed"), &json!(1)), "{status}");
    assert!(stack.esp.deliveries("gone").is_none());
    assert_outcomes_add_up(&listed(&stack, "gone").await);
    stack.stop().await;
}

#[tokio::test]
async fn a_prepare_step_repeated_after_an_interruption_keeps_the_chunks_already_handed_on() {
    let stack = TestStack { chunk_size: 20, ..TestStack::default() }.start().await;
    let addresses: Vec<String> = (0..30).map(|i| format!("again-{i:02}@example.com")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    // Prepared before the suppressions; the first chunk then counts as handed on (queued).
    suppress_after_prepare_held(
        &stack,
        "again",
        &addresses,
        &["again-05@example.com", "again-25@example.com"],
    )
    .await;
    let first = haishin_shared::domain::ChunkId::from("again~000000");
    sqlx::query("UPDATE chunks SET state = 'queued' WHERE id = $1")
        .bind(&first)
        .execute(stack.store.pool())
        .await
        .unwrap();
    // The step is taken up again, as after a crash: its lease ran out.
    sqlx::query("UPDATE requests SET state = 'preparing', lease_until = now() - interval '1 second' WHERE id = 'again'")
        .execute(stack.store.pool())
        .await
        .unwrap();
    let token = stack.stand_ins.signer.sign(&stack.endpoints.trigger, haishin_local::stack::TASKS_ACCOUNT);
    let answer = client()
        .post(format!("{}/tasks/prepare", stack.endpoints.trigger))
        .bearer_auth(token)
        .json(&json!({"request_id": "again"}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());

    let chunks = stack.store.chunks_of(&"again".into()).await.unwrap();
    let kept: Vec<(i32, i32)> = chunks.iter().map(|c| (c.seq, c.recipients)).collect();
    assert_eq!(
        kept,
        [(0, 20), (1, 9)],
        "the chunk handed on stands as it was; the other is rebuilt without the suppressed"
    );
    let status = request_status(&stack, "again").await.unwrap();
    let audience = &status["audience"];
    assert_eq!(
        (&audience["rows"], &audience["recipients"], &audience["skipped"]),
        (&json!(30), &json!(29), &json!({"suppressed": 1}))
    );

    // Sent now: the chunk built before the suppression leaves its address out at the upload.
    sqlx::query("UPDATE chunks SET state = 'pending' WHERE id = $1")
        .bind(&first)
        .execute(stack.store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE requests SET not_before = now() WHERE id = 'again'")
        .execute(stack.store.pool())
        .await
        .unwrap();
    let status = finished(&stack, "again").await;
    assert_eq!(
        (&status["state"], &status["suppressed"], &status["delivered"]),
        (&json!("completed"), &json!(1), &json!(28))
    );
    let sent: Vec<String> =
        stack.esp.deliveries("again").unwrap().recipients.into_iter().map(|r| r.email).collect();
    assert_eq!(sent.len(), 28);
    assert!(!sent.iter().any(|a| a == "again-05@example.com" || a == "again-25@example.com"));
    assert_outcomes_add_up(&listed(&stack, "again").await);
    stack.stop().await;
}

#[tokio::test]
async fn the_one_click_link_of_a_message_unsubscribes_its_recipient_from_its_category() {
    let Some(smtp) = SmtpRecorder::start(SmtpBehaviour::default()).await else { return };
    let stack = TestStack {
        provider: MailProvider::Smtp { url: smtp.url.clone(), messages_per_second: None },
        ..TestStack::default()
    }
    .start()
    .await;
    let news = |id: &str, category: &str| {
        json!({"id": id, "class": "realtime", "template": template(), "labels": {"category": category},
               "audience": audience(&["reader@example.com", "other@example.com"])})
    };
    publish(&stack, &news("news-1", "news")).await;
    assert_eq!(finished(&stack, "news-1").await["state"], "completed");
    let message = smtp.received().into_iter().find(|m| m["rcpt_tos"][0] == "reader@example.com").unwrap();
    let token = token_of(message["list_unsubscribe"].as_str().unwrap());
    let url = format!("{}/unsubscribe/{token}", stack.endpoints.trigger);

    // Following the link shows a page and changes nothing: mail scanners follow links.
    let page = client().get(&url).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(page.headers()["cache-control"], "no-store");
    let html = page.text().await.unwrap();
    assert!(html.contains("<form method=\"post\">") && html.contains("r***@example.com"), "{html}");
    assert!(!html.contains("reader@"), "the page hides the address");
    assert_eq!(get(&suppression_url(&stack, "reader@example.com")).await.0, StatusCode::NOT_FOUND);

    // The mail client's one-click POST (RFC 8058): no session, nothing else asked.
    let answer = one_click(&url).header("accept", "application/json").send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        json!({"unsubscribed": true, "scope": "category:news"})
    );
    assert_eq!(one_click(&url).send().await.unwrap().status(), StatusCode::OK, "twice is once");
    let (_, read) = get(&suppression_url(&stack, "reader@example.com")).await;
    let entry = &read["suppressions"][0];
    assert_eq!(
        (&entry["scope"], &entry["reason"], &entry["source"]),
        (&json!("category:news"), &json!("unsubscribed"), &json!("one-click")),
        "{read}"
    );

    publish(&stack, &news("news-2", "news")).await;
    publish(&stack, &news("sale-1", "sale")).await;
    let status = finished(&stack, "news-2").await;
    assert_eq!(status["audience"]["skipped"], json!({"suppressed": 1}), "{status}");
    assert_eq!(finished(&stack, "sale-1").await["delivered"], 2, "another category still reaches the reader");
    let to_reader = received(&smtp).iter().filter(|a| *a == "reader@example.com").count();
    assert_eq!(to_reader, 2, "news-1 and sale-1, not news-2");
    stack.stop().await;
}

#[tokio::test]
async fn forged_altered_and_expired_links_are_refused_and_change_nothing() {
    let stack = TestStack::default().start().await;
    let key = TokenKey::new(UNSUBSCRIBE_SECRET).unwrap();
    let claims =
        |expires_at| TokenClaims { address: "victim@example.com".into(), scope: "global".into(), expires_at };
    let valid = key.sign(&claims(chrono::Utc::now() + chrono::Duration::days(1)));
    let expired = key.sign(&claims(chrono::Utc::now() - chrono::Duration::hours(1)));
    let other_key = TokenKey::new("someone else's secret, long enough to sign").unwrap();
    let forged = other_key.sign(&claims(chrono::Utc::now() + chrono::Duration::days(1)));
    let (_, mac) = valid.split_once('.').unwrap();
    let someone_else =
        key.sign(&TokenClaims { address: "someone@example.com".into(), ..claims(chrono::Utc::now()) });
    let altered = format!("{}.{mac}", someone_else.split_once('.').unwrap().0);
    let url = |token: &str| format!("{}/unsubscribe/{token}", stack.endpoints.trigger);

    for (token, code, wanted) in [
        (expired.as_str(), StatusCode::FORBIDDEN, "expired"),
        (forged.as_str(), StatusCode::FORBIDDEN, "not issued by this sender"),
        (altered.as_str(), StatusCode::FORBIDDEN, "altered"),
        ("not-a-token", StatusCode::BAD_REQUEST, "malformed"),
    ] {
        let answer = one_click(&url(token)).send().await.unwrap();
        assert_eq!(answer.status(), code, "{wanted}");
        assert!(answer.text().await.unwrap().contains(wanted), "{wanted}");
        let answer = one_click(&url(token)).header("accept", "application/json").send().await.unwrap();
        let body: Value = answer.json().await.unwrap();
        assert!(error_of(&body).contains("nothing was changed"), "{body}");
        assert_eq!(client().get(url(token)).send().await.unwrap().status(), code);
    }
    // A valid link with anything but the one-click body, and its page, change nothing either.
    let answer = client().post(url(&valid)).body("unsubscribe=yes").send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(answer.text().await.unwrap().contains("List-Unsubscribe=One-Click"));
    assert_eq!(client().get(url(&valid)).send().await.unwrap().status(), StatusCode::OK);
    let (_, page) = get(&format!("{}/v1/suppressions", stack.endpoints.trigger)).await;
    assert_eq!(page["suppressions"], json!([]), "nothing was suppressed");

    // The page's button posts the same body, and its source says so.
    let answer = client()
        .post(url(&valid))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click&source=page")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(answer.text().await.unwrap().contains("You are unsubscribed"));
    let (_, page) = get(&format!("{}/v1/suppressions", stack.endpoints.trigger)).await;
    let entries = page["suppressions"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (&entries[0]["address"], &entries[0]["source"]),
        (&json!("victim@example.com"), &json!("unsubscribe-page"))
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_public_entry_serves_the_unsubscribe_links_and_nothing_else() {
    let (store, url) = fresh_database().await;
    let config = |secret: &str| PublicConfig {
        port: 0,
        host: "127.0.0.1".into(),
        database_url: url.clone().into(),
        database_max_connections: 2,
        unsubscribe_secret: secret.to_owned().into(),
        feedback: Default::default(),
    };
    assert!(PublicEntry::build(config("short")).await.is_err(), "a key too short is refused");
    let entry = PublicEntry::build(config(UNSUBSCRIBE_SECRET)).await.unwrap();
    let base = format!("http://127.0.0.1:{}", entry.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(entry.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let key = TokenKey::new(UNSUBSCRIBE_SECRET).unwrap();
    let claims = TokenClaims {
        address: "reader@example.com".into(),
        scope: "category:news".into(),
        expires_at: chrono::Utc::now() + chrono::Duration::days(1),
    };
    let token = key.sign(&claims);
    assert_eq!(
        one_click(&format!("{base}/unsubscribe/{token}")).send().await.unwrap().status(),
        StatusCode::OK
    );
    let kept: Vec<(String, String, String)> =
        sqlx::query_as("SELECT address, scope, reason FROM suppressions")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(kept, [("reader@example.com".into(), "category:news".into(), "unsubscribed".into())]);
    assert_eq!(client().get(format!("{base}/healthz")).send().await.unwrap().status(), StatusCode::OK);
    for path in ["/v1/suppressions", "/v1/requests", "/openapi.json"] {
        let status = client().get(format!("{base}{path}")).send().await.unwrap().status();
        assert_eq!(status, StatusCode::NOT_FOUND, "{path} is the trigger's, not the public entry's");
    }
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}

async fn gzip(text: &str) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut encoder = async_compression::tokio::write::GzipEncoder::new(Vec::new());
    encoder.write_all(text.as_bytes()).await.unwrap();
    encoder.shutdown().await.unwrap();
    encoder.into_inner()
}

/// Chunk object lines for these addresses.
fn chunk_lines(addresses: &[&str]) -> Vec<Box<serde_json::value::RawValue>> {
    addresses
        .iter()
        .map(|email| serde_json::value::to_raw_value(&json!({"email": email, "params": {}})).unwrap())
        .collect()
}

fn emails(lines: &[Box<serde_json::value::RawValue>]) -> Vec<String> {
    lines.iter().filter_map(|line| haishin_shared::suppression::email_of(line)).collect()
}

#[tokio::test]
async fn the_check_before_the_provider_sees_the_suppressions_written_since_the_build_however_many() {
    use haishin_shared::domain::Class;
    use haishin_shared::suppression::SinceBuilt;

    let (store, _) = fresh_database().await;
    let mut request = haishin_tests::dispatchable::request("since", Class::Batch, 1);
    request.labels = [("category".to_owned(), "promotions".to_owned())].into();
    haishin_trigger::intake::records::insert_request(&store, &request).await.unwrap();
    let suppress = |address: &'static str, scope: &'static str, age: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query(
                "INSERT INTO suppressions (address, scope, reason, source, created_at)
                 VALUES ($1, $2, 'manual', 'test', now() - $3::interval)",
            )
            .bind(address)
            .bind(scope)
            .bind(age)
            .execute(store.pool())
            .await
            .unwrap();
        }
    };
    // An hour before the request: applied when its chunks were built, not asked again.
    suppress("old@example.com", "global", "1 hour").await;
    // Since (or just before) it was received: in its scopes, or of a label it does not carry.
    suppress("new-global@example.com", "global", "1 minute").await;
    suppress("new-label@example.com", "category:promotions", "0 seconds").await;
    suppress("other@example.com", "category:news", "0 seconds").await;
    let chunk = [
        "old@example.com",
        "New-Global@EXAMPLE.com",
        "new-label@example.com",
        "other@example.com",
        "kept@example.com",
    ];

    let since = SinceBuilt::of_request(&store, &request.id).await.unwrap();
    let (kept, left_out) = since.leave_out(&store, &request.id, chunk_lines(&chunk)).await.unwrap();
    assert_eq!(emails(&kept), ["old@example.com", "other@example.com", "kept@example.com"]);
    assert_eq!(left_out, 2);

    // An import since: more than are matched in memory, so the chunk's addresses are asked for
    // in full, with the same outcome.
    sqlx::query(
        "INSERT INTO suppressions (address, scope, reason, source)
         SELECT 'bulk-' || i || '@example.com', 'global', 'imported', 'test' FROM generate_series(1, 1000) AS i",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let chunk: Vec<&str> = chunk.iter().copied().chain(["bulk-7@example.com"]).collect();
    let since = SinceBuilt::of_request(&store, &request.id).await.unwrap();
    let (kept, left_out) = since.leave_out(&store, &request.id, chunk_lines(&chunk)).await.unwrap();
    assert_eq!(emails(&kept), ["other@example.com", "kept@example.com"], "old@ too, asked in full");
    assert_eq!(left_out, 4);
}

#[tokio::test]
async fn inline_requests_taken_in_together_are_stored_by_one_statement_each_with_its_own_suppressions() {
    let stack = TestStack::default().start().await;
    put(&stack, "x@example.com", json!({"scope": "category:promo"})).await;
    put(&stack, "g@example.com", json!({})).await;
    // Chunks of two candidates, so that a request's chunks are several.
    let together = Together::start(stack.store.clone(), stack.blobs.clone(), BUCKET.into(), 2);
    let request = |body: Value| DeliveryRequest::parse(body.to_string().as_bytes()).unwrap();
    let promo = request(json!({"id": "promo", "class": "realtime", "template": template(),
        "audience": audience(&["x@example.com", "y@example.com"]), "labels": {"category": "promo"}}));
    let plain = request(json!({"id": "plain", "class": "realtime", "template": template(),
        "audience": audience(&["x@example.com", "g@example.com", "z@example.com", "Z@example.com", "nobody"])}));
    let promo_again = request(json!({"id": "promo", "class": "realtime", "template": template(),
        "audience": audience(&["w@example.com"])}));

    // Queued before the writer runs (one thread): the three are one group.
    let answers = futures::future::join_all([promo, plain, promo_again].map(|r| together.store(r))).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();

    assert_eq!(answers.iter().map(|a| a.created).collect::<Vec<_>>(), [true, true, false]);
    assert_eq!(answers[0].summary.recipients, 1, "x is suppressed for the promo category");
    assert_eq!(answers[0].summary.skipped.get("suppressed"), Some(&1));
    assert_eq!(answers[1].summary.recipients, 2, "x is not suppressed without the label; g is everywhere");
    assert_eq!(
        answers[1].summary.skipped.values().sum::<u64>(),
        3,
        "g suppressed, Z a repeat, nobody invalid: {:?}",
        answers[1].summary.skipped
    );
    let lines: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT request_id, lines, recipients FROM chunks WHERE request_id IN ('promo', 'plain')
         ORDER BY request_id, seq",
    )
    .fetch_all(stack.store.pool())
    .await
    .unwrap();
    let emails = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["email"].as_str().unwrap().into())
            .collect()
    };
    let by_chunk: Vec<(&str, Vec<String>)> =
        lines.iter().map(|(id, text, _)| (id.as_str(), emails(text))).collect();
    assert_eq!(
        by_chunk,
        [
            ("plain", vec!["x@example.com".to_owned()]),
            ("plain", vec!["z@example.com".to_owned()]),
            ("promo", vec!["y@example.com".to_owned()]),
        ]
    );
    let stored: Vec<(String, String, Value, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT id, state, labels, received_at FROM requests WHERE id IN ('promo', 'plain') ORDER BY id",
    )
    .fetch_all(stack.store.pool())
    .await
    .unwrap();
    assert_eq!(stored[1].2, json!({"category": "promo"}), "the first body under an id is the request");
    assert!(stored.iter().all(|(_, state, _, _)| state == "dispatching"));
    assert_eq!(stored[0].3, stored[1].3, "one statement, one transaction time");
    stack.stop().await;
}
