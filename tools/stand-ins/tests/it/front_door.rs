//! The Cloud Run front door: the invoker check before the service, and what it forwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::channel::{mpsc, oneshot};
use futures::{SinkExt, StreamExt};
use haishin_stand_ins::front_door::SIGNATURE_REMOVED;
use haishin_stand_ins::oidc::{IdClaims, TokenSigner};
use haishin_stand_ins::pubsub::{PubSubServer, PushAuth, PushSubscription};
use haishin_stand_ins::{FrontDoor, FrontDoorConfig};
use tokio::net::TcpListener;
use tokio::time::timeout;

use crate::common::{PATIENCE, Receiver, Reply};
use crate::pubsub::{message, publisher};

const INVOKER: &str = "pubsub-push@haishin.iam.gserviceaccount.com";
const STRANGER: &str = "intruder@elsewhere.iam.gserviceaccount.com";

/// A front door in front of `backend` that lets [`INVOKER`] in.
async fn door_to(backend: &str, config: impl FnOnce(FrontDoorConfig) -> FrontDoorConfig) -> FrontDoor {
    let config = config(FrontDoorConfig { invokers: vec![INVOKER.into()], ..FrontDoorConfig::new(backend) });
    FrontDoor::start(config, &TokenSigner::new()).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// GETs `path` through the door, with `token` as bearer if given.
async fn get(door: &FrontDoor, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = http().get(format!("{}{path}", door.url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Checks that the token `make` gives for the door's URL (known once it listens) is answered
/// `status` on `/push/requests`, and that the service saw nothing.
async fn assert_turned_away(make: impl FnOnce(&str) -> Option<String>, status: u16) {
    let backend = Receiver::ok().await;
    let door = door_to(&backend.url, |c| c).await;
    let token = make(&door.url());

    let response = get(&door, "/push/requests", token.as_deref()).await;

    assert_eq!(response.status(), status);
    if status == 401 {
        assert!(response.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    }
    assert!(response.text().await.unwrap().contains("Your client does not have permission"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(backend.requests().is_empty(), "the service never sees a refused request");
    let stats = door.stats();
    assert_eq!((stats.forwarded, stats.unauthenticated + stats.forbidden), (0, 1));
}

/// A token signed by the run's key.
fn token(audience: &str, email: &str) -> String {
    TokenSigner::new().sign(audience, email)
}

#[tokio::test]
async fn a_request_without_a_token_is_answered_401() {
    assert_turned_away(|_| None, 401).await;
}

#[tokio::test]
async fn a_token_forged_with_another_key_is_answered_401() {
    assert_turned_away(|door| Some(TokenSigner::impostor().sign(door, INVOKER)), 401).await;
}

#[tokio::test]
async fn an_expired_token_is_answered_401() {
    let expired = |door: &str| {
        let mut claims = IdClaims::new(door, INVOKER);
        claims.iat -= 7200;
        claims.exp -= 7200;
        Some(TokenSigner::new().sign_claims(&claims))
    };

    assert_turned_away(expired, 401).await;
}

#[tokio::test]
async fn a_token_for_another_audience_is_answered_401() {
    assert_turned_away(|_| Some(token("http://127.0.0.1:9", INVOKER)), 401).await;
}

#[tokio::test]
async fn a_valid_token_of_an_account_without_the_invoker_binding_is_answered_403() {
    assert_turned_away(|door| Some(token(door, STRANGER)), 403).await;
}

#[tokio::test]
async fn a_valid_token_reaches_the_service_with_its_signature_removed_and_its_claims_intact() {
    let backend = Receiver::start(|_| {
        Reply::status(201).header("x-backend", "yes").header("set-cookie", "a=1").body("made")
    })
    .await;
    let door = door_to(&backend.url, |c| c).await;
    let signed = token(&door.url(), INVOKER);

    let response = http()
        .post(format!("{}/push/requests?attempt=1", door.url()))
        .bearer_auth(&signed)
        .header("x-request-id", "r-1")
        .header("content-type", "application/json")
        .body(r#"{"chunk":"c-1"}"#)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-backend"], "yes");
    assert_eq!(response.headers()["set-cookie"], "a=1");
    assert_eq!(response.text().await.unwrap(), "made");
    let received = backend.wait_for(1).await.remove(0);
    assert_eq!((received.method.as_str(), received.path.as_str()), ("POST", "/push/requests"));
    assert_eq!(received.query.as_deref(), Some("attempt=1"));
    assert_eq!(received.header("x-request-id"), "r-1");
    assert_eq!(received.header("content-type"), "application/json");
    assert_eq!(received.body.as_ref(), br#"{"chunk":"c-1"}"#);
    let forwarded = received.bearer().expect("the token is still there");
    let (signed_part, _) = signed.rsplit_once('.').unwrap();
    assert_eq!(forwarded, format!("{signed_part}.{SIGNATURE_REMOVED}"));
    let payload = forwarded.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(
        (claims["email"].as_str(), claims["aud"].as_str()),
        (Some(INVOKER), Some(door.url().as_str()))
    );
    assert_eq!(door.stats().forwarded, 1);
}

#[tokio::test]
async fn custom_audiences_and_invoker_changes_apply() {
    let backend = Receiver::ok().await;
    let custom = "https://trigger-4a5b6c-an.a.run.app";
    let door = door_to(&backend.url, |c| FrontDoorConfig { audiences: vec![custom.into()], ..c }).await;

    let custom_audience = get(&door, "/", Some(&token(custom, INVOKER))).await.status();
    door.grant_invoker(&format!("serviceAccount:{STRANGER}"));
    let granted = get(&door, "/", Some(&token(custom, STRANGER))).await.status();
    door.revoke_invoker(STRANGER);
    let revoked = get(&door, "/", Some(&token(custom, STRANGER))).await.status();

    assert_eq!((custom_audience.as_u16(), granted.as_u16(), revoked.as_u16()), (200, 200, 403));
}

#[tokio::test]
async fn public_paths_pass_without_a_token_and_keep_the_header_as_sent() {
    let backend = Receiver::ok().await;
    let door = door_to(&backend.url, |c| FrontDoorConfig {
        public_paths: vec!["/healthz".into(), "/v1/".into()],
        ..c
    })
    .await;
    let signed = token(&door.url(), INVOKER);

    let health = get(&door, "/healthz", None).await.status();
    let api = get(&door, "/v1/requests/r-1", Some(&signed)).await.status();
    let push = get(&door, "/push/requests", None).await.status();
    let sneaky = get(&door, "/v1/%2e%2e/push/requests", None).await.status();

    assert_eq!((health.as_u16(), api.as_u16(), push.as_u16(), sneaky.as_u16()), (200, 200, 401, 401));
    let received = backend.wait_for(2).await;
    assert_eq!(received[0].path, "/healthz");
    assert_eq!(received[1].bearer(), Some(signed.as_str()), "a public path's token is not touched");
}

/// A service that echoes the request body back as it reads it.
async fn echo_service() -> (String, tokio::task::JoinHandle<()>) {
    let router = Router::new().fallback(|request: Request| async move { Response::new(request.into_body()) });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (url, tokio::spawn(async move { axum::serve(listener, router).await.unwrap() }))
}

#[tokio::test]
async fn a_ten_megabyte_body_goes_through_both_ways_intact() {
    let (service, _task) = echo_service().await;
    let door = door_to(&service, |c| c).await;
    let body: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();

    let response = http()
        .post(format!("{}/tasks/upload", door.url()))
        .bearer_auth(token(&door.url(), INVOKER))
        .body(body.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let echoed = response.bytes().await.unwrap();
    assert!(echoed.len() == body.len() && echoed == body, "{} bytes came back", echoed.len());
}

/// The hand-offs between the test and [`streaming_service`].
#[derive(Default)]
struct Signals {
    /// Told when the first part of the request body reached the service.
    first_part_in: Mutex<Option<oneshot::Sender<()>>>,
    /// Waited on before the service sends the second part of its answer.
    first_part_out: Mutex<Option<oneshot::Receiver<()>>>,
}

/// A service that reports the first part of a request body as soon as it arrives, and answers
/// `part one` at once and `part two` only when the test has received part one.
async fn streaming_service(signals: Arc<Signals>) -> (String, tokio::task::JoinHandle<()>) {
    async fn handle(State(signals): State<Arc<Signals>>, request: Request) -> Response {
        let mut body = request.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert_eq!(first.as_ref(), b"part one;");
        let _ = signals.first_part_in.lock().unwrap().take().unwrap().send(());
        while body.next().await.is_some() {}
        let go = signals.first_part_out.lock().unwrap().take().unwrap();
        let parts =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"part one;")) }).chain(
                futures::stream::once(async move {
                    let _ = go.await;
                    Ok(Bytes::from_static(b"part two"))
                }),
            );
        Response::new(Body::from_stream(parts))
    }
    let router = Router::new().fallback(handle).with_state(signals);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (url, tokio::spawn(async move { axum::serve(listener, router).await.unwrap() }))
}

#[tokio::test]
async fn bodies_are_streamed_through_not_buffered() {
    let (first_in_tx, first_in) = oneshot::channel();
    let (first_out, first_out_rx) = oneshot::channel();
    let signals = Arc::new(Signals {
        first_part_in: Mutex::new(Some(first_in_tx)),
        first_part_out: Mutex::new(Some(first_out_rx)),
    });
    let (service, _task) = streaming_service(signals).await;
    let door = door_to(&service, |c| c).await;
    let (mut request_body, parts) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let sent = tokio::spawn(
        http()
            .post(format!("{}/tasks/upload", door.url()))
            .bearer_auth(token(&door.url(), INVOKER))
            .body(reqwest::Body::wrap_stream(parts))
            .send(),
    );

    request_body.send(Ok(Bytes::from_static(b"part one;"))).await.unwrap();
    timeout(PATIENCE, first_in).await.expect("the service got part one before the body ended").unwrap();
    request_body.send(Ok(Bytes::from_static(b"part two"))).await.unwrap();
    drop(request_body);
    let mut response = sent.await.unwrap().unwrap();
    let first = timeout(PATIENCE, response.chunk()).await.expect("part one came before part two").unwrap();
    first_out.send(()).unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }

    assert_eq!(first.as_deref(), Some(b"part one;".as_slice()));
    assert_eq!(rest, b"part two");
}

#[tokio::test]
async fn a_service_that_is_down_is_answered_503() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let door = door_to(&gone, |c| c).await;

    let response = get(&door, "/push/requests", Some(&token(&door.url(), INVOKER))).await;

    assert_eq!(response.status(), 503);
    assert_eq!(door.stats().backend_failures, 1);
}

#[tokio::test]
async fn a_pubsub_push_through_the_front_door_reaches_the_service_without_its_signature() {
    let backend = Receiver::ok().await;
    let door = door_to(&backend.url, |c| c).await;
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_topic("projects/haishin/topics/requests").unwrap();
    server
        .create_push_subscription(PushSubscription {
            oidc: Some(PushAuth { service_account_email: INVOKER.into(), audience: Some(door.url()) }),
            ..PushSubscription::new(
                "projects/haishin/subscriptions/trigger-requests",
                "projects/haishin/topics/requests",
                format!("{}/push/requests", door.url()),
            )
        })
        .unwrap();

    publisher(&server, "projects/haishin/topics/requests")
        .await
        .publish(message("request", &[]))
        .await
        .unwrap();

    let push = backend.wait_for(1).await.remove(0);
    assert!(push.bearer().unwrap().ends_with(&format!(".{SIGNATURE_REMOVED}")));
    assert_eq!(push.json()["subscription"], "projects/haishin/subscriptions/trigger-requests");
    assert!(server.wait_idle(PATIENCE).await);
    assert_eq!(
        server.subscription_stats("projects/haishin/subscriptions/trigger-requests").unwrap().acked,
        1
    );
}
