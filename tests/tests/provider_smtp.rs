//! The SMTP provider against aiosmtpd (PyPI), which records every message it accepts and reads
//! it back with Python's own email parser: what arrived is what a mailbox would see.

use std::time::{Duration, Instant};

use haishin_shared::domain::{Recipient, Template};
use haishin_shared::esp::{
    EspError, MessageOutcome, MessageProvider, MessageRenderer, OutcomeCounts, OutgoingMessage,
    ProviderLimits, RenderSettings, SmtpConfig, SmtpProvider,
};
use haishin_shared::store::Reservation;
use haishin_tests::mail_servers::{SmtpBehaviour, SmtpRecorder};
use serde_json::{Value, json};

const SENDER: &str = "bounces@shop.example";

fn renderer() -> MessageRenderer {
    let template = Template::Inline {
        subject: "{{name}}さん、{{item}} is back".into(),
        text: Some("Hi {{name}}, {{item}} is back in stock.".into()),
        html: Some("<p>Hi {{name}}, <b>{{item}}</b> is back in stock.</p>".into()),
    };
    let settings = RenderSettings {
        from: "Shop <news@shop.example>".into(),
        envelope_from: Some(SENDER.into()),
        unsubscribe_base_url: "https://mail.shop.example/unsubscribe".into(),
    };
    MessageRenderer::new(&template, &settings).expect("the template compiles")
}

/// One rendered message per address, with the address's local part as `name`.
fn messages(addresses: &[&str]) -> Vec<OutgoingMessage> {
    let renderer = renderer();
    addresses
        .iter()
        .enumerate()
        .map(|(i, email)| {
            let name = display_name(email);
            let recipient = Recipient {
                email: (*email).into(),
                params: json!({"name": name, "item": "Tea & Cake"}).as_object().unwrap().clone(),
            };
            renderer.render(&recipient, &format!("r-1~000001:{i}"), &format!("tok-{i}")).unwrap()
        })
        .collect()
}

/// The `name` parameter of an address: its local part, with `zoe` written `Zoë` (not ASCII).
fn display_name(email: &str) -> String {
    let local = email.split('@').next().unwrap();
    if local == "zoe" { "Zoë".to_owned() } else { local.to_owned() }
}

fn provider(url: &str, command_timeout: Duration) -> SmtpProvider {
    let mut config = SmtpConfig::new(url);
    config.command_timeout = command_timeout;
    config.limits = ProviderLimits::new(4, 1000);
    SmtpProvider::new(&config).expect("valid settings")
}

fn to_of(record: &Value) -> Vec<String> {
    record["rcpt_tos"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn each_recipient_gets_one_personalized_standards_compliant_message() {
    let Some(server) = SmtpRecorder::start(SmtpBehaviour::default()).await else { return };
    let batch = messages(&["ann@example.com", "bo@example.com", "zoe@example.com"]);

    let outcomes =
        provider(&server.url, Duration::from_secs(10)).send_batch(&batch, &Reservation::now()).await.unwrap();

    let received = server.received();
    assert_eq!(received.len(), 3, "one message per recipient: {received:#?}");
    for (message, outcome) in batch.iter().zip(&outcomes) {
        let name = display_name(&message.to);
        let record: Vec<&Value> = received.iter().filter(|r| to_of(r) == [message.to.clone()]).collect();
        assert_eq!(record.len(), 1, "{} received exactly one message", message.to);
        let record = record[0];
        assert_eq!(
            outcome,
            &MessageOutcome::Accepted { provider_id: record["queue_id"].as_str().unwrap().into() }
        );
        assert_eq!(record["mail_from"], SENDER);
        assert_eq!(record["defects"], json!([]), "Python's parser finds nothing wrong");
        assert_eq!(record["mime_version"], "1.0");
        assert_eq!(record["subject"], format!("{name}さん、Tea & Cake is back"));
        assert!(record["raw"].as_str().unwrap().contains("Subject: =?utf-8?"), "RFC 2047 subject");
        assert_eq!(record["from"], "Shop <news@shop.example>");
        assert_eq!(record["to"], message.to);
        assert_eq!(record["message_id"], message.message_id);
        assert_eq!(record["date_valid"], true);
        assert_eq!(record["content_type"], "multipart/alternative");
        let parts = record["parts"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0]["content_type"], "text/plain");
        assert_eq!(
            parts[0]["content"].as_str().unwrap().trim_end(),
            format!("Hi {name}, Tea & Cake is back in stock.")
        );
        assert_eq!(parts[1]["content_type"], "text/html");
        assert_eq!(
            parts[1]["content"].as_str().unwrap().trim_end(),
            format!("<p>Hi {name}, <b>Tea &amp; Cake</b> is back in stock.</p>")
        );
        assert_eq!(parts[1]["charset"], "utf-8");
        let token = message.idempotency_key.rsplit(':').next().unwrap();
        assert_eq!(
            record["list_unsubscribe"],
            format!("<https://mail.shop.example/unsubscribe/tok-{token}>")
        );
        assert_eq!(record["list_unsubscribe_post"], "List-Unsubscribe=One-Click");
    }
    let ids: std::collections::BTreeSet<&str> =
        received.iter().map(|r| r["message_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "a Message-ID per recipient");
}

#[tokio::test]
async fn a_refused_recipient_is_counted_refused_and_the_rest_of_the_batch_goes_on() {
    let behaviour = SmtpBehaviour {
        refuse: vec!["gone@example.com".into()],
        defer: vec!["busy@example.com".into()],
        ..SmtpBehaviour::default()
    };
    let Some(server) = SmtpRecorder::start(behaviour).await else { return };
    let batch = messages(&[
        "ann@example.com",
        "gone@example.com",
        "busy@example.com",
        "bo@example.com",
        "zoë@example.com",
    ]);

    let outcomes =
        provider(&server.url, Duration::from_secs(10)).send_batch(&batch, &Reservation::now()).await.unwrap();

    assert!(matches!(&outcomes[0], MessageOutcome::Accepted { .. }), "{outcomes:?}");
    let MessageOutcome::Refused { reason } = &outcomes[1] else { panic!("550 is refused: {outcomes:?}") };
    assert!(reason.starts_with("smtp 550: 5.1.1"), "{reason}");
    assert!(!reason.contains("gone@"), "the reason keeps no full address: {reason}");
    let MessageOutcome::Deferred { reason, .. } = &outcomes[2] else {
        panic!("451 is deferred: {outcomes:?}")
    };
    assert!(reason.starts_with("smtp 451"), "{reason}");
    assert!(matches!(&outcomes[3], MessageOutcome::Accepted { .. }), "{outcomes:?}");
    let MessageOutcome::Refused { reason } = &outcomes[4] else {
        panic!("no SMTPUTF8, refused: {outcomes:?}")
    };
    assert!(reason.contains("SMTPUTF8"), "aiosmtpd does not offer SMTPUTF8 by default: {reason}");
    let delivered: Vec<Vec<String>> = server.received().iter().map(to_of).collect();
    assert_eq!(delivered, [vec!["ann@example.com".to_owned()], vec!["bo@example.com".to_owned()]]);
}

#[tokio::test]
async fn a_message_whose_answer_never_comes_is_unknown_and_the_untried_rest_is_deferred() {
    let behaviour = SmtpBehaviour { hang: vec!["slow@example.com".into()], ..SmtpBehaviour::default() };
    let Some(server) = SmtpRecorder::start(behaviour).await else { return };
    let batch = messages(&["ann@example.com", "slow@example.com", "bo@example.com"]);

    let outcomes =
        provider(&server.url, Duration::from_secs(1)).send_batch(&batch, &Reservation::now()).await.unwrap();

    assert!(matches!(&outcomes[0], MessageOutcome::Accepted { .. }), "{outcomes:?}");
    assert!(matches!(&outcomes[1], MessageOutcome::Unknown { .. }), "{outcomes:?}");
    assert!(matches!(&outcomes[2], MessageOutcome::Deferred { .. }), "{outcomes:?}");
    let delivered: Vec<Vec<String>> = server.received().iter().map(to_of).collect();
    assert_eq!(
        delivered,
        [vec!["ann@example.com".to_owned()], vec!["slow@example.com".to_owned()]],
        "the server did take the unknown message: re-sending it would deliver it twice"
    );
}

#[tokio::test]
async fn auth_from_the_url_logs_in_and_a_wrong_password_fails_the_whole_call_for_good() {
    let behaviour =
        SmtpBehaviour { auth: Some(("haishin".into(), "s3cret".into())), ..SmtpBehaviour::default() };
    let Some(server) = SmtpRecorder::start(behaviour).await else { return };
    let batch = messages(&["ann@example.com", "bo@example.com"]);

    let good = provider(&format!("smtp://haishin:s3cret@127.0.0.1:{}", server.port), Duration::from_secs(10));
    let outcomes = good.send_batch(&batch, &Reservation::now()).await.unwrap();
    let bad = provider(&format!("smtp://haishin:wrong@127.0.0.1:{}", server.port), Duration::from_secs(10));
    let refused = bad.send_batch(&batch, &Reservation::now()).await;

    assert_eq!(OutcomeCounts::of(&outcomes).accepted, 2);
    assert!(matches!(&refused, Err(EspError::Permanent(reason)) if reason.contains("535")), "{refused:?}");
    assert_eq!(server.received().len(), 2, "nothing passed with the wrong password");
}

#[tokio::test]
async fn a_server_that_refuses_connections_is_a_transient_error_for_the_whole_call() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let batch = messages(&["ann@example.com", "bo@example.com"]);

    let result = provider(&format!("smtp://127.0.0.1:{port}"), Duration::from_secs(5))
        .send_batch(&batch, &Reservation::now())
        .await;

    assert!(matches!(&result, Err(EspError::Transient(reason)) if reason.contains("connect")), "{result:?}");
}

/// Messages per second on one connection and on four at once; run with
/// `cargo test -p haishin-tests --test provider_smtp -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn throughput_against_aiosmtpd() {
    let Some(server) = SmtpRecorder::start(SmtpBehaviour::default()).await else { return };
    let addresses: Vec<String> = (0..1000).map(|i| format!("r{i}@example.com")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let batch = messages(&refs);
    let smtp = provider(&server.url, Duration::from_secs(10));
    for connections in [1usize, 4] {
        let started = Instant::now();
        let now = Reservation::now();
        let calls = batch.chunks(batch.len() / connections).map(|chunk| smtp.send_batch(chunk, &now));
        let results = futures::future::join_all(calls).await;
        let accepted: u64 = results.iter().map(|r| OutcomeCounts::of(r.as_ref().unwrap()).accepted).sum();
        let rate = accepted as f64 / started.elapsed().as_secs_f64();
        println!("smtp, {connections} connection(s): {accepted} messages at {rate:.0} messages/s");
    }
}
