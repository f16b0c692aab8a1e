//! The provider's bounce and complaint webhooks, on the public entry: SNS messages signed as
//! Amazon SNS signs them (with a test certificate served from a local origin) and SendGrid events
//! signed as SendGrid signs them add suppressions and per-request counts; unsigned, wrongly
//! signed, replayed or foreign ones are refused with 401 and change nothing; a redelivered report
//! counts once; and, on the whole pipeline, a bounce reported for a campaign's message shows in
//! its status and keeps the next campaign from sending to that address.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use haishin_local::stack::{LocalStack, MailProvider, UNSUBSCRIBE_SECRET};
use haishin_shared::store::Store;
use haishin_tests::mail_servers::{SmtpBehaviour, SmtpRecorder};
use haishin_tests::{TestStack, finished, fresh_database};
use haishin_trigger::feedback::FeedbackArgs;
use haishin_trigger::public::{PublicConfig, PublicEntry};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:ses-feedback";
const CERTIFICATE: &[u8] = include_bytes!("../fixtures/sns/signing-cert.pem");
const SIGNING_KEY: &[u8] = include_bytes!("../fixtures/sns/signing-key.pk8");

/// A local stand-in of SNS's certificate and subscription endpoints.
struct SnsOrigin {
    url: String,
    confirmations: Arc<AtomicUsize>,
}

impl SnsOrigin {
    async fn start() -> Self {
        use axum::routing::get;
        let confirmations = Arc::new(AtomicUsize::new(0));
        let counter = confirmations.clone();
        let app = axum::Router::new()
            .route("/SimpleNotificationService-test.pem", get(|| async { CERTIFICATE }))
            .route(
                "/confirm",
                get(move || async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    "<ConfirmSubscriptionResponse/>"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, confirmations }
    }

    fn certificate_url(&self) -> String {
        format!("{}/SimpleNotificationService-test.pem", self.url)
    }
}

/// An SNS message of `kind` carrying `message`, signed with the test key (SHA-1 for version 1,
/// SHA-256 for 2), with its fields in the order SNS signs them.
fn sns_message(origin: &SnsOrigin, kind: &str, id: &str, message: &str, version: &str) -> Value {
    let mut body = json!({
        "Type": kind,
        "MessageId": id,
        "TopicArn": TOPIC,
        "Message": message,
        "Timestamp": "2026-12-02T10:00:00.000Z",
        "SignatureVersion": version,
        "SigningCertURL": origin.certificate_url(),
    });
    let mut signed = format!("Message\n{message}\nMessageId\n{id}\n");
    if kind == "Notification" {
        body["Subject"] = json!("Amazon SES Email Event Notification");
        signed += "Subject\nAmazon SES Email Event Notification\n";
    } else {
        let url = format!("{}/confirm?Token=t-{id}", origin.url);
        signed += &format!("SubscribeURL\n{url}\n");
        body["SubscribeURL"] = json!(url);
        body["Token"] = json!(format!("t-{id}"));
    }
    signed += "Timestamp\n2026-12-02T10:00:00.000Z\n";
    if kind != "Notification" {
        signed += &format!("Token\nt-{id}\n");
    }
    signed += &format!("TopicArn\n{TOPIC}\nType\n{kind}\n");
    body["Signature"] = json!(rsa_sign(&signed, version));
    body
}

/// SNS's signature: RSA PKCS #1 v1.5 over SHA-1 (version 1; the RustCrypto `rsa` crate, since
/// aws-lc-rs signs nothing with SHA-1) or SHA-256 (version 2).
fn rsa_sign(text: &str, version: &str) -> String {
    if version == "1" {
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::signature::{SignatureEncoding, Signer};
        let key = rsa::RsaPrivateKey::from_pkcs8_der(SIGNING_KEY).unwrap();
        let signer = rsa::pkcs1v15::SigningKey::<sha1::Sha1>::new(key);
        return BASE64.encode(signer.sign(text.as_bytes()).to_vec());
    }
    let key = RsaKeyPair::from_pkcs8(SIGNING_KEY).unwrap();
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), text.as_bytes(), &mut signature).unwrap();
    BASE64.encode(signature)
}

/// An SES bounce notification for `addresses` (`Permanent` or `Transient`).
fn ses_bounce(kind: &str, addresses: &[&str], request: &str) -> String {
    let recipients: Vec<Value> = addresses.iter().map(|a| json!({"emailAddress": a})).collect();
    json!({
        "notificationType": "Bounce",
        "bounce": {"bounceType": kind, "bounceSubType": "General", "bouncedRecipients": recipients,
                   "timestamp": "2026-12-02T09:59:58.000Z", "feedbackId": "f-1"},
        "mail": {"messageId": "m-1", "tags": {"haishin-request": [request]}}
    })
    .to_string()
}

fn ses_complaint(address: &str, request_header: &str) -> String {
    json!({
        "eventType": "Complaint",
        "complaint": {"complainedRecipients": [{"emailAddress": address}], "complaintFeedbackType": "abuse",
                      "timestamp": "2026-12-02T09:59:59.000Z"},
        "mail": {"messageId": "m-2", "headers": [{"name": "X-Haishin-Request", "value": request_header}]}
    })
    .to_string()
}

/// A SendGrid key pair: the signer, and the verification key as SendGrid shows it.
fn sendgrid_key() -> (EcdsaKeyPair, String) {
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let public = BASE64.encode(key.public_key().as_der().unwrap().as_ref());
    (key, public)
}

fn sendgrid_post(key: &EcdsaKeyPair, url: &str, body: &str, at: i64) -> reqwest::RequestBuilder {
    let timestamp = at.to_string();
    let signed = format!("{timestamp}{body}");
    let signature = key.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
    reqwest::Client::new()
        .post(url)
        .header("X-Twilio-Email-Event-Webhook-Signature", BASE64.encode(signature.as_ref()))
        .header("X-Twilio-Email-Event-Webhook-Timestamp", timestamp)
        .header("content-type", "application/json")
        .body(body.to_owned())
}

/// A public entry on `database_url` taking SNS messages of [`TOPIC`] from `origin`, and SendGrid
/// events signed with `sendgrid`. Returns its base URL and the sender of its shutdown.
async fn public_entry(
    database_url: &str,
    origin: Option<&SnsOrigin>,
    sendgrid: Option<String>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = PublicConfig {
        port: 0,
        host: "127.0.0.1".into(),
        database_url: database_url.to_owned().into(),
        database_max_connections: 2,
        unsubscribe_secret: UNSUBSCRIBE_SECRET.to_owned().into(),
        feedback: FeedbackArgs {
            sns_topic_arns: origin.map(|_| vec![TOPIC.to_owned()]).unwrap_or_default(),
            sns_certificate_origin: origin.map(|o| o.url.clone()),
            sendgrid_webhook_public_key: sendgrid,
        },
    };
    let entry = PublicEntry::build(config).await.unwrap();
    let base = format!("http://127.0.0.1:{}", entry.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(entry.run_until_stopped(async {
        let _ = stopped.await;
    }));
    (base, stop)
}

async fn post_json(url: &str, body: &Value) -> (StatusCode, Value) {
    let answer = reqwest::Client::new().post(url).body(body.to_string()).send().await.unwrap();
    (answer.status(), answer.json().await.unwrap_or(Value::Null))
}

/// Every suppression, as (address, reason, source), sorted.
async fn suppressions(store: &Store) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT address, reason, source FROM suppressions ORDER BY address")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

async fn feedback_rows(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM feedback").fetch_one(store.pool()).await.unwrap()
}

#[tokio::test]
async fn signed_ses_notifications_through_sns_add_suppressions_and_counts_once() {
    let (store, url) = fresh_database().await;
    let origin = SnsOrigin::start().await;
    let (base, stop) = public_entry(&url, Some(&origin), None).await;
    let ses = format!("{base}/webhooks/ses");

    // The subscription is confirmed by fetching its SubscribeURL.
    let confirmation =
        sns_message(&origin, "SubscriptionConfirmation", "c-1", "You have chosen to subscribe.", "1");
    assert_eq!(post_json(&ses, &confirmation).await.0, StatusCode::OK);
    assert_eq!(origin.confirmations.load(Ordering::SeqCst), 1);

    // A hard bounce (SignatureVersion 1), delivered twice: two suppressions, counted once.
    let bounce = sns_message(
        &origin,
        "Notification",
        "n-1",
        &ses_bounce("Permanent", &["Gone@Example.com", "left@example.com"], "spring"),
        "1",
    );
    let (status, body) = post_json(&ses, &bounce).await;
    assert_eq!(
        (status, body["recorded"].as_u64(), body["suppressed"].as_u64()),
        (StatusCode::OK, Some(2), Some(2)),
        "{body}"
    );
    let (status, body) = post_json(&ses, &bounce).await;
    assert_eq!(
        (status, body["recorded"].as_u64(), body["repeated"].as_u64()),
        (StatusCode::OK, Some(0), Some(2)),
        "{body}"
    );
    // A complaint (SignatureVersion 2, the request named by the header) and a soft bounce.
    let complaint =
        sns_message(&origin, "Notification", "n-2", &ses_complaint("angry@example.com", "spring"), "2");
    assert_eq!(post_json(&ses, &complaint).await.0, StatusCode::OK);
    let soft = sns_message(
        &origin,
        "Notification",
        "n-3",
        &ses_bounce("Transient", &["full@example.com"], "spring"),
        "2",
    );
    assert_eq!(post_json(&ses, &soft).await.0, StatusCode::OK);

    let expected = vec![
        ("angry@example.com".to_owned(), "complained".to_owned(), "ses".to_owned()),
        ("gone@example.com".to_owned(), "bounced".to_owned(), "ses".to_owned()),
        ("left@example.com".to_owned(), "bounced".to_owned(), "ses".to_owned()),
    ];
    assert_eq!(suppressions(&store).await, expected, "the soft bounce is not suppressed");
    let counts = store.feedback_counts(&"spring".into()).await.unwrap();
    assert_eq!((counts.bounced, counts.soft_bounced, counts.complained), (2, 1, 1));

    // Refused with 401, and nothing changes: unsigned, altered after signing, another topic, a
    // certificate from elsewhere, an unknown signature version, not an SNS message at all.
    let mut unsigned = sns_message(
        &origin,
        "Notification",
        "x-1",
        &ses_bounce("Permanent", &["victim@example.com"], "spring"),
        "1",
    );
    unsigned.as_object_mut().unwrap().remove("Signature");
    let mut altered = sns_message(
        &origin,
        "Notification",
        "x-2",
        &ses_bounce("Permanent", &["someone@example.com"], "spring"),
        "1",
    );
    altered["Message"] = json!(ses_bounce("Permanent", &["victim@example.com"], "spring"));
    let mut foreign_topic = sns_message(
        &origin,
        "Notification",
        "x-3",
        &ses_bounce("Permanent", &["victim@example.com"], "spring"),
        "1",
    );
    foreign_topic["TopicArn"] = json!("arn:aws:sns:us-east-1:999999999999:other");
    let mut foreign_certificate = bounce.clone();
    foreign_certificate["SigningCertURL"] =
        json!("https://certificates.example/SimpleNotificationService-x.pem");
    let mut version_3 = bounce.clone();
    version_3["SignatureVersion"] = json!("3");
    for (what, body) in [
        ("unsigned", unsigned),
        ("altered", altered),
        ("foreign topic", foreign_topic),
        ("foreign certificate", foreign_certificate),
        ("unknown version", version_3),
        ("not SNS", json!({"bounce": "victim@example.com"})),
    ] {
        let (status, answer) = post_json(&ses, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{what} says why: {answer}");
    }
    assert_eq!(suppressions(&store).await, expected);
    assert_eq!(feedback_rows(&store).await, 4);
    stop.send(()).unwrap();
}

#[tokio::test]
async fn signed_sendgrid_events_add_suppressions_and_forged_or_replayed_ones_change_nothing() {
    let (store, url) = fresh_database().await;
    let (key, public) = sendgrid_key();
    let (base, stop) = public_entry(&url, None, Some(public)).await;
    let sendgrid = format!("{base}/webhooks/sendgrid");
    let now = chrono::Utc::now().timestamp();

    let events = json!([
        {"email": "gone@example.com", "event": "bounce", "type": "bounce", "reason": "550 5.1.1 unknown user",
         "timestamp": now, "sg_event_id": "e-1", "haishin_request": "summer"},
        {"email": "busy@example.com", "event": "bounce", "type": "blocked", "timestamp": now, "sg_event_id": "e-2",
         "haishin_request": "summer"},
        {"email": "angry@example.com", "event": "spamreport", "timestamp": now, "sg_event_id": "e-3",
         "haishin_request": "summer"},
        {"email": "happy@example.com", "event": "delivered", "timestamp": now, "sg_event_id": "e-4"}
    ])
    .to_string();
    let answer = sendgrid_post(&key, &sendgrid, &events, now).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = answer.json().await.unwrap();
    assert_eq!((body["recorded"].as_u64(), body["suppressed"].as_u64()), (Some(3), Some(2)), "{body}");
    let expected = vec![
        ("angry@example.com".to_owned(), "complained".to_owned(), "sendgrid".to_owned()),
        ("gone@example.com".to_owned(), "bounced".to_owned(), "sendgrid".to_owned()),
    ];
    assert_eq!(suppressions(&store).await, expected);
    let counts = store.feedback_counts(&"summer".into()).await.unwrap();
    assert_eq!((counts.bounced, counts.soft_bounced, counts.complained), (1, 1, 1));

    let forged =
        json!([{"email": "victim@example.com", "event": "bounce", "timestamp": now, "sg_event_id": "f-1"}])
            .to_string();
    let (other_key, _) = sendgrid_key();
    let unsigned = reqwest::Client::new().post(&sendgrid).body(forged.clone());
    let altered = sendgrid_post(&key, &sendgrid, &events, now).body(forged.clone());
    let wrong_key = sendgrid_post(&other_key, &sendgrid, &forged, now);
    let replayed = sendgrid_post(&key, &sendgrid, &forged, now - 20 * 60);
    for (what, post) in
        [("unsigned", unsigned), ("altered", altered), ("wrong key", wrong_key), ("replayed", replayed)]
    {
        let answer = post.send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    assert_eq!(suppressions(&store).await, expected);
    assert_eq!(feedback_rows(&store).await, 3);
    stop.send(()).unwrap();
}

#[tokio::test]
async fn webhooks_not_configured_answer_not_found() {
    let (_, url) = fresh_database().await;
    let (base, stop) = public_entry(&url, None, None).await;
    for path in ["/webhooks/ses", "/webhooks/sendgrid"] {
        let (status, body) = post_json(&format!("{base}{path}"), &json!([])).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("not configured"), "{body}");
    }
    stop.send(()).unwrap();
}

fn campaign(id: &str, addresses: &[&str]) -> Value {
    let recipients: Vec<Value> = addresses.iter().map(|a| json!({"email": a, "params": {}})).collect();
    json!({"id": id, "class": "batch", "template": {"subject": "Sale", "text": "It's on."},
           "audience": {"inline": recipients}})
}

async fn publish(stack: &LocalStack, body: &Value) {
    stack.requests_topic.publish(body, &[]).await.expect("published");
}

#[tokio::test]
async fn a_bounce_reported_for_a_campaign_counts_in_its_status_and_the_next_campaign_skips_the_address() {
    let Some(smtp) = SmtpRecorder::start(SmtpBehaviour::default()).await else { return };
    let stack = TestStack {
        provider: MailProvider::Smtp { url: smtp.url.clone(), messages_per_second: None },
        ..TestStack::default()
    }
    .start()
    .await;
    let origin = SnsOrigin::start().await;
    let (base, stop) = public_entry(&stack.endpoints.database_url, Some(&origin), None).await;
    let audience = ["gone@example.com", "angry@example.com", "fine@example.com"];

    publish(&stack, &campaign("spring", &audience)).await;
    assert_eq!(finished(&stack, "spring").await["state"], "completed");
    // SES passes the message's headers back with its notifications: the request is named there.
    let message = smtp.received().into_iter().find(|m| m["rcpt_tos"][0] == "gone@example.com").unwrap();
    let request = message["request"].as_str().expect("the message names its request").to_owned();
    assert_eq!(request, "spring");
    let ses = format!("{base}/webhooks/ses");
    let mut bounce = json!({
        "notificationType": "Bounce",
        "bounce": {"bounceType": "Permanent", "bouncedRecipients": [{"emailAddress": "gone@example.com"}]},
        "mail": {"headers": [{"name": "X-Haishin-Request", "value": request}]}
    });
    let notification = sns_message(&origin, "Notification", "n-10", &bounce.to_string(), "1");
    assert_eq!(post_json(&ses, &notification).await.0, StatusCode::OK);
    bounce = json!(ses_complaint("angry@example.com", &request));
    let notification = sns_message(&origin, "Notification", "n-11", bounce.as_str().unwrap(), "2");
    assert_eq!(post_json(&ses, &notification).await.0, StatusCode::OK);

    let status = haishin_tests::request_status(&stack, "spring").await.unwrap();
    assert_eq!((status["bounced"].as_i64(), status["complained"].as_i64()), (Some(1), Some(1)), "{status}");

    publish(&stack, &campaign("summer", &audience)).await;
    let summer = finished(&stack, "summer").await;
    assert_eq!(summer["audience"]["skipped"]["suppressed"], 2, "{summer}");
    let to_fine = smtp.received().iter().filter(|m| m["rcpt_tos"][0] == "fine@example.com").count();
    let to_gone = smtp.received().iter().filter(|m| m["rcpt_tos"][0] == "gone@example.com").count();
    assert_eq!((to_fine, to_gone), (2, 1), "the bounced address got the first campaign only");
    stop.send(()).unwrap();
    stack.stop().await;
}
