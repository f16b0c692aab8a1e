//! Every bad input gets a clear answer, through the API and through the requests topic: limits
//! that are stated and enforced, text PostgreSQL cannot store refused with a reason, and nothing
//! retried for ever (the stand-in's delivery counts show no redelivery storm).

use std::time::Duration;

use haishin_local::stack::{LocalStack, PROJECT, PUSH_ACCOUNT};
use haishin_shared::domain::{MAX_INLINE_RECIPIENTS, MAX_REQUEST_BYTES};
use haishin_shared::push::MAX_PUSH_BYTES;
use haishin_tests::{TestStack, finished, request_status};
use serde_json::{Value, json};

fn template() -> Value {
    json!({"subject": "{{name}}, it's back", "text": "Hello {{name}}, {{product}} is in stock: {{url}}"})
}

/// A realtime request with `n` inline recipients, each with realistic parameters (some 250 bytes).
fn inline_request(id: &str, n: usize) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|i| {
            json!({"email": format!("customer.number-{i:06}@mail.example.co.jp"), "params": {
                "name": format!("Customer {i:06}"),
                "product": "Insulated stainless steel bottle, 500 ml, matte black",
                "url": format!("https://shop.example.co.jp/products/4901234567890?utm_source=restock&r={i}"),
                "coupon": format!("RESTOCK-{i:08X}"),
            }})
        })
        .collect();
    json!({"id": id, "class": "realtime", "template": template(), "audience": {"inline": recipients}})
}

fn subscription_stats(stack: &LocalStack, name: &str) -> haishin_stand_ins::pubsub::SubscriptionStats {
    stack.stand_ins.pubsub.subscription_stats(&format!("projects/{PROJECT}/subscriptions/{name}")).unwrap()
}

#[tokio::test]
async fn the_documented_inline_limit_is_accepted_through_the_api_and_the_topic() {
    let stack = TestStack { chunk_size: 2_500, esp_limit: 4, ..TestStack::default() }.start().await;
    let api = inline_request("restock-api", MAX_INLINE_RECIPIENTS);
    let topic = inline_request("restock-topic", MAX_INLINE_RECIPIENTS);
    let size = serde_json::to_vec(&api).unwrap().len();
    assert!(size > 2_000_000 && size < MAX_REQUEST_BYTES, "a realistic request of {size} bytes");

    let posted = reqwest::Client::new()
        .post(format!("{}/v1/requests", stack.endpoints.trigger))
        .json(&api)
        .send()
        .await
        .unwrap();
    stack.requests_topic.publish(&topic, &[]).await.unwrap();

    assert_eq!(posted.status(), 202);
    for id in ["restock-api", "restock-topic"] {
        let status = finished(&stack, id).await;
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(stack.esp.report().requests[id].counts.unique, MAX_INLINE_RECIPIENTS as u64);
    }
    let pushes = subscription_stats(&stack, "trigger-requests");
    assert_eq!((pushes.acked, pushes.nacked, pushes.dead_lettered), (1, 0, 0), "{pushes:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_request_over_the_limits_is_refused_naming_the_limit_and_its_id_kept() {
    let stack = TestStack::default().start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/requests", stack.endpoints.trigger);
    // Over the byte limit: 413 with a JSON answer that names it.
    let huge = json!({"id": "huge", "class": "batch", "template": template(),
        "audience": {"inline": [{"email": "a@example.com", "params": {"blob": "x".repeat(MAX_REQUEST_BYTES)}}]}});
    let too_large = client.post(&url).json(&huge).send().await.unwrap();
    // Over the recipient limit, through the topic: acknowledged once and recorded as rejected.
    let crowd = inline_request("crowd", MAX_INLINE_RECIPIENTS + 1);
    stack.requests_topic.publish(&crowd, &[]).await.unwrap();

    assert_eq!(too_large.status(), 413);
    let answer: Value = too_large.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains(&MAX_REQUEST_BYTES.to_string()), "{answer}");
    let status = finished(&stack, "crowd").await;
    assert_eq!(status["state"], "rejected");
    assert!(status["reason"].as_str().unwrap().contains("more than 10000"), "{status}");
    let pushes = subscription_stats(&stack, "trigger-requests");
    assert_eq!((pushes.acked, pushes.nacked), (1, 0), "{pushes:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_push_too_large_or_unreadable_is_acknowledged_and_recorded_not_retried() {
    let stack = TestStack::default().start().await;
    let token = stack.stand_ins.signer.sign(&stack.endpoints.trigger, PUSH_ACCOUNT);
    let client = reqwest::Client::new();
    let push = |body: Vec<u8>| {
        client
            .post(format!("{}/push/requests", stack.endpoints.trigger))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let oversize = push(vec![b' '; MAX_PUSH_BYTES + 1]).await.unwrap().status().as_u16();
    let not_json = push(b"{\"message\": ".to_vec()).await.unwrap().status().as_u16();

    assert_eq!((oversize, not_json), (200, 200), "acknowledged: no retry can read them");
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM rejected_messages ORDER BY id")
        .fetch_all(stack.store.pool())
        .await
        .unwrap();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains(&MAX_PUSH_BYTES.to_string()), "{reasons:?}");
    assert!(reasons[1].contains("not the expected JSON"), "{reasons:?}");
    stack.stop().await;
}

#[tokio::test]
async fn text_postgresql_cannot_store_is_rejected_with_a_reason_never_retried() {
    let stack = TestStack::default().start().await;
    let nul = json!({"id": "nul-api", "class": "realtime", "template": template(),
        "audience": {"inline": [{"email": "a@example.com", "params": {"name": "A\u{0}B"}}]}});
    let mut by_topic = nul.clone();
    by_topic["id"] = "nul-topic".into();

    let posted = reqwest::Client::new()
        .post(format!("{}/v1/requests", stack.endpoints.trigger))
        .json(&nul)
        .send()
        .await
        .unwrap();
    stack.requests_topic.publish(&by_topic, &[]).await.unwrap();

    assert_eq!(posted.status(), 400);
    let answer: Value = posted.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("/audience/inline/0/params/name"), "{answer}");
    assert_eq!(answer["id"], "nul-api");
    let status = finished(&stack, "nul-topic").await;
    assert_eq!(status["state"], "rejected");
    assert!(request_status(&stack, "nul-api").await.is_some(), "the rejection is readable under its id");
    let pushes = subscription_stats(&stack, "trigger-requests");
    assert_eq!((pushes.acked, pushes.nacked), (1, 0), "{pushes:?}");
    stack.stop().await;
}

#[tokio::test]
async fn the_same_id_posted_five_times_at_once_gets_one_202_and_four_200() {
    let stack = TestStack { call_latency: Duration::from_millis(50), ..TestStack::default() }.start().await;
    let request = inline_request("five-at-once", 50);
    let client = reqwest::Client::new();
    let url = format!("{}/v1/requests", stack.endpoints.trigger);

    let answers = futures::future::join_all((0..5).map(|_| client.post(&url).json(&request).send())).await;

    let mut statuses: Vec<u16> = answers.into_iter().map(|a| a.unwrap().status().as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 202]);
    assert_eq!(finished(&stack, "five-at-once").await["state"], "completed");
    assert_eq!(stack.esp.report().requests["five-at-once"].counts.total, 50, "each recipient once");
    stack.stop().await;
}

#[tokio::test]
async fn rejections_are_listed_newest_first_with_the_id_each_could_be_read_under() {
    let stack = TestStack::default().start().await;
    let client = reqwest::Client::new();
    let post = |body: &'static str| {
        client
            .post(format!("{}/v1/requests", stack.endpoints.trigger))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    post(r#"{"not": "json"#).await.unwrap();
    post(r#"{"id": "has space", "class": "batch"}"#).await.unwrap();
    post(r#"{"id": "fine-id", "class": "urgent"}"#).await.unwrap();

    let list = |query: String| {
        let url = format!("{}/v1/rejections{query}", stack.endpoints.trigger);
        async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() }
    };
    let first = list("?limit=2".into()).await;
    let token = first["next_page_token"].as_str().expect("a second page").to_owned();
    let second = list(format!("?limit=2&page_token={token}")).await;
    let bad_token =
        reqwest::get(format!("{}/v1/rejections?page_token=forged", stack.endpoints.trigger)).await.unwrap();

    let rejections = first["rejections"].as_array().unwrap();
    assert_eq!(rejections.len(), 2);
    assert_eq!(
        (rejections[0]["id"].as_str(), rejections[0]["request"].as_bool()),
        (Some("fine-id"), Some(true))
    );
    assert!(rejections[0]["reason"].as_str().unwrap().contains("urgent"), "{first}");
    assert_eq!(
        (rejections[1]["id"].as_str(), rejections[1]["request"].as_bool()),
        (Some("has space"), Some(false))
    );
    let last = second["rejections"].as_array().unwrap();
    assert_eq!(last.len(), 1);
    assert!(
        last[0]["id"].is_null() && last[0]["reason"].as_str().unwrap().contains("not valid JSON"),
        "{second}"
    );
    assert!(second["next_page_token"].is_null());
    assert_eq!(bad_token.status(), 400);
    stack.stop().await;
}

/// Writes `text` as an audience file to the local Cloud Storage and returns its URI.
async fn audience_file(stack: &LocalStack, name: &str, text: String) -> String {
    let object = format!("audiences/{name}");
    stack.blobs.write(haishin_local::stack::BUCKET, &object, text.into_bytes().into()).await.unwrap();
    format!("gs://{}/{object}", haishin_local::stack::BUCKET)
}

fn file_request(id: &str, uri: &str) -> Value {
    json!({"id": id, "class": "batch", "template": template(), "audience": {"gcs": {"uris": [uri]}}})
}

#[tokio::test]
async fn bad_rows_are_skipped_counted_and_located_and_every_row_is_accounted_for() {
    let stack = TestStack::default().start().await;
    let mut csv = String::from("email,name,product,url\n");
    for i in 0..20 {
        csv.push_str(&format!("user{i}@example.com,User {i},Bottle,https://s.example/{i}\n"));
    }
    csv.push_str("not-an-address,Nobody,Bottle,https://s.example/x\n");
    csv.push_str("user3@example.com,Again,Bottle,https://s.example/3\n");
    csv.push_str("short@example.com,Short\n");
    csv.push_str("\"multi@example.com\",\"Line one\nline two\",Bottle,https://s.example/m\n");
    let uri = audience_file(&stack, "rows.csv", csv).await;

    stack.requests_topic.publish(&file_request("rows", &uri), &[]).await.unwrap();

    let status = finished(&stack, "rows").await;
    assert_eq!(status["state"], "completed", "{status}");
    let audience = &status["audience"];
    let skipped: u64 = audience["skipped"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(audience["rows"].as_u64().unwrap(), audience["recipients"].as_u64().unwrap() + skipped);
    assert_eq!(audience["recipients"], 21, "a quoted line break is one field, not two rows");
    assert_eq!(audience["skipped_at"]["invalid_email"], json!([format!("{uri}:22")]));
    assert_eq!(audience["skipped_at"]["duplicate"], json!([format!("{uri}:23")]));
    assert_eq!(audience["skipped_at"]["missing_column"], json!([format!("{uri}:24")]));
    assert_eq!(stack.esp.report().requests["rows"].counts.unique, 21);
    stack.stop().await;
}

#[tokio::test]
async fn a_file_an_unbalanced_quote_would_swallow_fails_naming_the_file_and_line() {
    let stack = TestStack::default().start().await;
    let mut csv = String::from("email,name,product,url\nfirst@example.com,\"First,Bottle,u\n");
    for i in 0..500 {
        csv.push_str(&format!("user{i}@example.com,User {i},Bottle,u\n"));
    }
    let uri = audience_file(&stack, "swallowed.csv", csv).await;

    stack.requests_topic.publish(&file_request("swallowed", &uri), &[]).await.unwrap();

    let status = finished(&stack, "swallowed").await;
    assert_eq!(status["state"], "failed", "{status}");
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains(&uri) && reason.contains("line 2") && reason.contains("unbalanced quote"),
        "{reason}"
    );
    assert!(stack.esp.report().requests.get("swallowed").is_none_or(|r| r.counts.total == 0));
    stack.stop().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_routes_the_trigger_serves() {
    let stack = TestStack::default().start().await;
    let spec: Value = reqwest::get(format!("{}/openapi.json", stack.endpoints.trigger))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let paths: Vec<&str> = spec["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(
        paths,
        [
            "/healthz",
            "/unsubscribe/{token}",
            "/v1/rejections",
            "/v1/requests",
            "/v1/requests/{id}",
            "/v1/requests/{id}:cancel",
            "/v1/requests/{id}:pause",
            "/v1/requests/{id}:resume",
            "/v1/suppressions",
            "/v1/suppressions/{address}",
            "/v1/suppressions:import",
            "/webhooks/sendgrid",
            "/webhooks/ses",
        ]
    );
    for path in ["/healthz", "/v1/rejections", "/v1/requests", "/v1/requests/some-id", "/v1/suppressions"] {
        let status = reqwest::get(format!("{}{path}", stack.endpoints.trigger)).await.unwrap().status();
        assert!(status == 200 || status == 404 && path.ends_with("some-id"), "{path}: {status}");
    }
    for (path, wanted) in [("/v1/suppressions/a@example.com", 404), ("/unsubscribe/not-a-token", 400)] {
        let status = reqwest::get(format!("{}{path}", stack.endpoints.trigger)).await.unwrap().status();
        assert_eq!(status, wanted, "{path}: served");
    }
    let import = reqwest::Client::new()
        .post(format!("{}/v1/suppressions:import", stack.endpoints.trigger))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(import.status(), 400, "served, and an import needs uris");
    for webhook in ["/webhooks/ses", "/webhooks/sendgrid"] {
        let answer = reqwest::Client::new()
            .post(format!("{}{webhook}", stack.endpoints.trigger))
            .body("[]")
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let body: Value = answer.json().await.unwrap_or_default();
        assert_eq!(status, 404, "{webhook}: {body}");
        assert!(body["error"].as_str().unwrap().contains("not configured"), "{webhook}: served: {body}");
    }
    let client = reqwest::Client::new();
    for verb in ["pause", "resume", "cancel"] {
        let url = format!("{}/v1/requests/some-id:{verb}", stack.endpoints.trigger);
        let answer = client.post(url).send().await.unwrap();
        assert_eq!(answer.status(), 404, "{verb}: served, and some-id is unknown");
        let body: Value = answer.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("some-id"), "{body}");
    }
    stack.stop().await;
}

async fn gzip(text: &str) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut encoder = async_compression::tokio::write::GzipEncoder::new(Vec::new());
    encoder.write_all(text.as_bytes()).await.unwrap();
    encoder.shutdown().await.unwrap();
    encoder.into_inner()
}

#[tokio::test]
async fn repeats_across_chunks_are_found_and_each_address_sent_once() {
    let stack = TestStack::default().start().await; // chunks of 100
    // 1,000 rows: rows 500 and up repeat the address of row `i - 500` one time in five, in every
    // spelling the key folds together, and keys that only differ by a character stay distinct.
    let mut csv = String::from("email,name,product,url\n");
    let mut repeats = 0;
    for i in 0..1_000 {
        let email = if i >= 500 && i % 5 == 0 {
            repeats += 1;
            format!("Reader{}@EXAMPLE.com", i - 500)
        } else {
            format!("reader{i}@example.com")
        };
        csv.push_str(&format!("{email},R,Bottle,u\n"));
    }
    let object = "audiences/repeats.csv";
    stack.blobs.write(haishin_local::stack::BUCKET, object, csv.into_bytes().into()).await.unwrap();
    let uri = format!("gs://{}/{object}", haishin_local::stack::BUCKET);
    stack.requests_topic.publish(&file_request("repeats", &uri), &[]).await.unwrap();

    let status = finished(&stack, "repeats").await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["skipped"]["duplicate"], repeats, "{status}");
    assert_eq!(status["audience"]["recipients"], 1_000 - repeats, "{status}");
    let delivered = &stack.esp.report().requests["repeats"];
    assert_eq!((delivered.counts.unique, delivered.counts.duplicates), (1_000 - repeats as u64, 0));
    stack.stop().await;
}

#[tokio::test]
async fn gzipped_exports_are_read_and_repeated_addresses_found_through_case_and_idna() {
    let stack = TestStack::default().start().await;
    let csv = "email,name,product,url\nuser@BÜCHER.example,A,Bottle,u\nuser@bücher.example,B,Bottle,u\n\
               USER@xn--bcher-kva.example,C,Bottle,u\nStraße@example.com,D,Bottle,u\nSTRASSE@example.com,E,Bottle,u\n";
    let ndjson =
        "{\"email\":\"n1@example.com\",\"params\":{\"name\":\"N\",\"product\":\"P\",\"url\":\"u\"}}\n";
    for (object, text) in [("export-000.csv.gz", csv), ("export-001.ndjson.gz", ndjson)] {
        let bytes = gzip(text).await;
        stack
            .blobs
            .write(haishin_local::stack::BUCKET, &format!("audiences/{object}"), bytes.into())
            .await
            .unwrap();
    }
    let uri = format!("gs://{}/audiences/export-*.gz", haishin_local::stack::BUCKET);

    stack.requests_topic.publish(&file_request("gzipped", &uri), &[]).await.unwrap();

    let status = finished(&stack, "gzipped").await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["rows"], 6);
    assert_eq!(status["audience"]["recipients"], 3, "{status}");
    assert_eq!(status["audience"]["skipped"]["duplicate"], 3);
    let delivered = &stack.esp.report().requests["gzipped"];
    assert_eq!(delivered.counts.unique, 3);
    stack.stop().await;
}

#[tokio::test]
async fn templates_are_checked_at_intake_and_against_a_file_s_columns() {
    let stack = TestStack::default().start().await;
    let client = reqwest::Client::new();
    let post =
        |body: Value| client.post(format!("{}/v1/requests", stack.endpoints.trigger)).json(&body).send();
    let unclosed = json!({"id": "unclosed", "class": "realtime", "template": {"subject": "Hi {{name", "text": "x"},
        "audience": {"inline": [{"email": "a@example.com", "params": {"name": "A"}}]}});
    let valueless = json!({"id": "valueless", "class": "realtime", "template": template(),
        "audience": {"inline": [{"email": "a@example.com", "params": {"name": "A", "product": "P"}}]}});
    let uri = audience_file(&stack, "no-url.csv", "email,name,product\na@example.com,A,P\n".into()).await;

    let unclosed = post(unclosed).await.unwrap();
    let valueless = post(valueless).await.unwrap();
    stack.requests_topic.publish(&file_request("no-url-column", &uri), &[]).await.unwrap();

    assert_eq!(unclosed.status(), 400);
    let reason = unclosed.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_owned();
    assert!(reason.contains("template subject does not parse"), "{reason}");
    assert_eq!(valueless.status(), 400);
    let reason = valueless.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_owned();
    assert!(reason.contains("`url`") && reason.contains("recipient 0"), "{reason}");
    let status = finished(&stack, "no-url-column").await;
    assert_eq!(status["state"], "failed");
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains(&uri) && reason.contains("`url`"), "{reason}");
    assert!(stack.esp.report().requests.get("no-url-column").is_none_or(|r| r.counts.total == 0));
    stack.stop().await;
}
