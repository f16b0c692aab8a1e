//! The Amazon SES provider against moto's server (PyPI `moto[server]`), which keeps every
//! message SES v2 `SendEmail` was given: what moto holds is what SES would have sent.

use std::time::{Duration, Instant};

use haishin_shared::domain::{Recipient, Template};
use haishin_shared::esp::{
    EspError, MessageOutcome, MessageProvider, MessageRenderer, OutcomeCounts, OutgoingMessage,
    ProviderLimits, RenderSettings, SesConfig, SesCredentials, SesProvider,
};
use haishin_shared::store::Reservation;
use haishin_tests::mail_servers::MotoServer;
use serde_json::{Value, json};

const SENDER: &str = "news@shop.example";

fn messages(addresses: &[String]) -> Vec<OutgoingMessage> {
    let template = Template::Inline {
        subject: "{{name}}, your order shipped".into(),
        text: Some("Hi {{name}}, order {{order}} is on its way.".into()),
        html: Some("<p>Hi {{name}}, order <b>{{order}}</b> is on its way.</p>".into()),
    };
    let settings = RenderSettings {
        from: format!("Shop <{SENDER}>"),
        envelope_from: None,
        unsubscribe_base_url: "https://mail.shop.example/unsubscribe".into(),
    };
    let renderer = MessageRenderer::new(&template, &settings).unwrap();
    addresses
        .iter()
        .enumerate()
        .map(|(i, email)| {
            let name = email.split('@').next().unwrap();
            let recipient = Recipient {
                email: email.clone(),
                params: json!({"name": name, "order": format!("A-{i}")}).as_object().unwrap().clone(),
            };
            renderer.render(&recipient, &format!("r-2~000001:{i}"), &format!("tok-{i}")).unwrap()
        })
        .collect()
}

fn addresses(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("customer{i}@example.com")).collect()
}

async fn provider(endpoint: &str, request_timeout: Duration) -> SesProvider {
    let mut config = SesConfig::new("eu-west-1");
    config.endpoint_url = Some(endpoint.to_owned());
    config.credentials = Some(SesCredentials {
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        session_token: None,
    });
    config.request_timeout = request_timeout;
    config.limits = ProviderLimits::new(4, 1000);
    SesProvider::new(&config).await.expect("valid settings")
}

async fn verify_sender(ses: &SesProvider) {
    ses.client()
        .create_email_identity()
        .email_identity(SENDER)
        .send()
        .await
        .expect("moto verifies the sender");
}

fn destinations(record: &Value) -> Vec<String> {
    let mut all: Vec<String> =
        record["destinations"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_owned()).collect();
    // moto lists the To header's addresses after the envelope's: one recipient may show twice.
    all.sort();
    all.dedup();
    all
}

#[tokio::test]
async fn each_recipient_is_sent_exactly_once_with_the_rendered_content() {
    let Some(moto) = MotoServer::start().await else { return };
    let ses = provider(&moto.endpoint, Duration::from_secs(10)).await;
    verify_sender(&ses).await;
    let batch = messages(&addresses(5));

    let outcomes = ses.send_batch(&batch, &Reservation::now()).await.unwrap();

    let sent = moto.sent_raw_messages().await;
    assert_eq!(sent.len(), 5, "{sent:#?}");
    for (i, (message, outcome)) in batch.iter().zip(&outcomes).enumerate() {
        let records: Vec<&Value> = sent.iter().filter(|r| destinations(r) == [message.to.clone()]).collect();
        assert_eq!(records.len(), 1, "{} was sent exactly one message", message.to);
        let record = records[0];
        assert_eq!(outcome, &MessageOutcome::Accepted { provider_id: record["id"].as_str().unwrap().into() });
        assert_eq!(record["source"], SENDER);
        let raw = record["raw_data"].as_str().unwrap();
        let name = format!("customer{i}");
        assert!(raw.contains(&format!("Subject: {name}, your order shipped\r\n")), "{raw}");
        assert!(raw.contains(&format!("Hi {name}, order A-{i} is on its way.")), "{raw}");
        assert!(raw.contains(&format!("<p>Hi {name}, order <b>A-{i}</b> is on its way.</p>")), "{raw}");
        assert!(raw.contains(&format!("Message-ID: {}\r\n", message.message_id)), "{raw}");
        assert!(raw.contains("Content-Type: multipart/alternative;"), "{raw}");
        assert!(
            raw.contains(&format!("List-Unsubscribe: <https://mail.shop.example/unsubscribe/tok-{i}>\r\n"))
        );
        assert!(raw.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"), "{raw}");
    }
}

#[tokio::test]
async fn a_sender_ses_does_not_know_is_refused_for_each_message_and_the_batch_goes_on() {
    let Some(moto) = MotoServer::start().await else { return };
    let ses = provider(&moto.endpoint, Duration::from_secs(10)).await;
    let batch = messages(&addresses(3));

    let outcomes = ses.send_batch(&batch, &Reservation::now()).await.unwrap();

    assert_eq!(OutcomeCounts::of(&outcomes).refused, 3, "{outcomes:?}");
    let MessageOutcome::Refused { reason } = &outcomes[0] else { unreachable!() };
    assert!(reason.starts_with("ses MessageRejected (400)"), "{reason}");
    assert!(!reason.contains("news@"), "the reason keeps no full address: {reason}");
    assert!(moto.sent_raw_messages().await.is_empty());
}

#[tokio::test]
async fn an_endpoint_that_refuses_connections_is_a_transient_error_for_the_whole_call() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ses = provider(&format!("http://127.0.0.1:{port}"), Duration::from_secs(5)).await;

    let result = ses.send_batch(&messages(&addresses(2)), &Reservation::now()).await;

    assert!(matches!(&result, Err(EspError::Transient(reason)) if reason.contains("not sent")), "{result:?}");
}

#[tokio::test]
async fn a_request_that_is_never_answered_leaves_its_message_unknown_and_defers_the_rest() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let ses = provider(&endpoint, Duration::from_millis(500)).await;

    let outcomes = ses.send_batch(&messages(&addresses(3)), &Reservation::now()).await.unwrap();

    assert!(matches!(&outcomes[0], MessageOutcome::Unknown { .. }), "{outcomes:?}");
    assert_eq!(OutcomeCounts::of(&outcomes).deferred, 2, "{outcomes:?}");
    silent.abort();
}

/// Messages per second through moto, one call and four at once; run with
/// `cargo test -p haishin-tests --test provider_ses -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn throughput_against_moto() {
    let Some(moto) = MotoServer::start().await else { return };
    let ses = provider(&moto.endpoint, Duration::from_secs(10)).await;
    verify_sender(&ses).await;
    let batch = messages(&addresses(400));
    for calls in [1usize, 4] {
        let started = Instant::now();
        let now = Reservation::now();
        let results =
            futures::future::join_all(batch.chunks(batch.len() / calls).map(|c| ses.send_batch(c, &now)))
                .await;
        let accepted: u64 = results.iter().map(|r| OutcomeCounts::of(r.as_ref().unwrap()).accepted).sum();
        let rate = accepted as f64 / started.elapsed().as_secs_f64();
        println!("ses via moto, {calls} call(s) at once: {accepted} messages at {rate:.0} messages/s");
    }
}
