//! The list-send protocol end to end: the `ListSendEsp` client against its reference server, the
//! ESP simulator, as a caller sees it (through the client and through raw HTTP).

use std::time::Duration;

use futures::future::join_all;
use haishin_esp_sim::{Api, EspSim, EspSimConfig, EspSimHandle, FaultRates, Faults, SimClient};
use haishin_shared::domain::{Class, Recipient, Template};
use haishin_shared::esp::{
    DeliveryId, DeliveryStatus, EspError, EspProvider, ListId, ListSendConfig, ListSendEsp, ListUpload,
    SendBatch, SendPart, SendRequest, SendTo,
};
use serde_json::json;

fn recipients(emails: &[&str]) -> Vec<Recipient> {
    emails
        .iter()
        .map(|e| Recipient {
            email: (*e).to_owned(),
            params: json!({"name": "N"}).as_object().cloned().unwrap(),
        })
        .collect()
}

fn list(key: &str, request_id: &str, emails: &[&str]) -> ListUpload<'static> {
    ListUpload::new(key, request_id, &recipients(emails)).unwrap()
}

fn send_of(key: &str, request_id: &str, list_id: &ListId) -> SendRequest {
    SendRequest {
        idempotency_key: key.to_owned(),
        request_id: request_id.into(),
        to: SendTo::List { list_id: list_id.clone() },
        template: Template::Inline { subject: "Hello {{name}}".into(), text: Some("Hi".into()), html: None },
        class: Class::Batch,
    }
}

fn esp(sim: &EspSimHandle) -> ListSendEsp {
    ListSendEsp::new(ListSendConfig::new(sim.url()).with_timeout(Duration::from_secs(10))).unwrap()
}

async fn start(config: EspSimConfig) -> EspSimHandle {
    EspSim::start(config).await.unwrap()
}

#[tokio::test]
async fn calls_over_the_limit_get_429_and_are_counted_as_over_limit_attempts() {
    let sim = start(EspSimConfig::fast(2, Duration::from_millis(300))).await;
    let esp = esp(&sim);
    let uploads: Vec<ListUpload> = (0..5).map(|i| list(&format!("k{i}"), "r", &["a@x.com"])).collect();

    let results = join_all(uploads.iter().map(|l| esp.upload_list(l))).await;

    let accepted = results.iter().filter(|r| r.is_ok()).count();
    let limited: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Err(EspError::RateLimited { retry_after }) => Some(*retry_after),
            _ => None,
        })
        .collect();
    assert_eq!(accepted, 2, "{results:?}");
    assert_eq!(limited, vec![Some(Duration::from_secs(1)); 3]);
    let report = sim.report();
    assert_eq!(report.upload.over_limit_attempts, 3);
    assert_eq!(report.upload.calls_accepted, 2);
    assert_eq!(report.upload.peak_concurrency, 2);
    assert_eq!(report.upload.injected.rate_limit, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_stay_within_the_limit_never_exceed_it() {
    let sim = start(EspSimConfig::fast(3, Duration::from_millis(15))).await;
    let esp = esp(&sim);
    let l = esp.upload_list(&list("k", "r", &["a@x.com", "b@x.com"])).await.unwrap();

    let workers = (0..3).map(|w| {
        let (esp, l) = (esp.clone(), l.clone());
        async move {
            for i in 0..8 {
                esp.send(&send_of(&format!("w{w}-{i}"), &format!("r{w}-{i}"), &l)).await?;
            }
            Ok::<_, EspError>(())
        }
    });
    let results = join_all(workers).await;

    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let report = sim.report();
    assert_eq!(report.send.over_limit_attempts, 0);
    assert_eq!(report.send.calls_completed, 24);
    assert!((1..=3).contains(&report.send.peak_concurrency), "{}", report.send.peak_concurrency);
    assert!(report.send.timeline.iter().all(|p| p.in_progress <= 3));
    assert_eq!(report.deliveries.total, 48);
    assert_eq!(report.deliveries.duplicates, 0);
}

#[tokio::test]
async fn sending_a_list_twice_delivers_twice_and_the_ledger_counts_duplicates() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = esp(&sim);
    let l = esp
        .upload_list(&list("chunk-1", "req-1", &["a@x.com", "B@x.com", "c@bounce.invalid"]))
        .await
        .unwrap();

    let first = esp.send(&send_of("chunk-1:send", "req-1", &l)).await.unwrap();
    let second = esp.send(&send_of("chunk-1:send", "req-1", &l)).await.unwrap();

    assert_ne!(first, second, "the simulator does not de-duplicate by key");
    let report = sim.report();
    assert_eq!(report.deliveries.total, 6);
    assert_eq!(report.deliveries.unique, 3);
    assert_eq!(report.deliveries.duplicates, 3);
    assert_eq!(report.deliveries.bounced, 2);
    let req = &report.requests["req-1"];
    assert_eq!((req.counts.sends, req.counts.duplicates, req.counts.delivered), (2, 3, 4));
    assert!(req.first_send_at <= req.last_send_at);
    let deliveries = SimClient::new(&sim.url()).unwrap().deliveries("req-1").await.unwrap().unwrap();
    assert!(deliveries.addresses_complete);
    let seen: Vec<(&str, u32, bool)> =
        deliveries.recipients.iter().map(|r| (r.email.as_str(), r.count, r.bounced)).collect();
    assert_eq!(seen, vec![("B@x.com", 2, false), ("a@x.com", 2, false), ("c@bounce.invalid", 2, true)]);
    assert_eq!(esp.find_delivery("chunk-1:send").await.unwrap(), Some(first));
}

#[tokio::test]
async fn a_list_uploaded_twice_with_one_key_is_one_list() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = esp(&sim);

    let first = esp.upload_list(&list("chunk-7", "r", &["a@x.com"])).await.unwrap();
    let again = esp.upload_list(&list("chunk-7", "r", &["a@x.com"])).await.unwrap();
    let other = esp.upload_list(&list("chunk-8", "r", &["a@x.com"])).await.unwrap();

    assert_eq!(first, again);
    assert_ne!(first, other);
}

#[tokio::test]
async fn a_send_is_found_by_its_key_once_accepted() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = esp(&sim);
    let l = esp.upload_list(&list("k", "r", &["a@x.com"])).await.unwrap();
    assert_eq!(esp.find_delivery("r~000001:send").await.unwrap(), None);

    let id = esp.send(&send_of("r~000001:send", "r", &l)).await.unwrap();

    assert_eq!(esp.find_delivery("r~000001:send").await.unwrap(), Some(id));
    assert_eq!(esp.find_delivery("r~000002:send").await.unwrap(), None);
}

#[tokio::test]
async fn a_delivery_is_processing_until_the_settle_delay_then_done_with_counts() {
    let config =
        EspSimConfig { settle_delay: Duration::from_millis(150), ..EspSimConfig::fast(4, Duration::ZERO) };
    let sim = start(config).await;
    let esp = esp(&sim);
    let l = esp.upload_list(&list("k", "r", &["a@x.com", "b@x.com", "z@bounce.invalid"])).await.unwrap();
    let id = esp.send(&send_of("k:send", "r", &l)).await.unwrap();

    assert_eq!(esp.delivery_status(&id).await.unwrap(), DeliveryStatus::Processing);
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(
        esp.delivery_status(&id).await.unwrap(),
        DeliveryStatus::Done { delivered: 2, bounced: 1, failed: 0 }
    );
    let unknown = esp.delivery_status(&DeliveryId("dlv-99999999".into())).await;
    assert!(matches!(unknown, Err(EspError::Permanent(_))), "{unknown:?}");
}

#[tokio::test]
async fn an_unknown_list_is_a_permanent_error_that_delivers_nothing() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;

    let err = esp(&sim).send(&send_of("k", "r", &ListId("lst-00000042".into()))).await.unwrap_err();

    assert!(matches!(err, EspError::Permanent(ref m) if m.contains("list_not_found")), "{err}");
    let report = sim.report();
    assert_eq!(report.send.invalid_calls, 1);
    assert_eq!(report.send.calls_accepted, 0);
    assert_eq!(report.deliveries.total, 0);
}

#[tokio::test]
async fn a_send_may_carry_its_recipients_in_place_of_a_list_up_to_the_esp_s_cap() {
    let config = EspSimConfig { inline_recipients_max: 3, ..EspSimConfig::fast(4, Duration::ZERO) };
    let sim = start(config).await;
    let esp = esp(&sim);
    let inline = |key: &str, emails: &[&str]| SendRequest {
        to: SendTo::Recipients { recipients: recipients(emails) },
        ..send_of(key, "event", &ListId(String::new()))
    };

    let delivery = esp.send(&inline("event~1:send", &["a@x.com", "b@bounce.invalid"])).await.unwrap();
    let too_many = esp.send(&inline("event~2:send", &["c@x.com", "d@x.com", "e@x.com", "f@x.com"])).await;

    assert_eq!(esp.find_delivery("event~1:send").await.unwrap(), Some(delivery));
    let err = too_many.unwrap_err();
    assert!(matches!(err, EspError::Permanent(ref m) if m.contains("at most 3 recipients")), "{err}");
    let report = sim.report();
    assert_eq!((report.upload.calls_accepted, report.send.calls_accepted), (0, 1), "no list was uploaded");
    assert_eq!((report.deliveries.total, report.deliveries.bounced), (2, 1));
    let sent: Vec<String> =
        sim.deliveries("event").unwrap().recipients.into_iter().map(|r| r.email).collect();
    assert_eq!(sent, ["a@x.com", "b@bounce.invalid"]);
}

fn part(key: &str, request_id: &str, emails: &[(&str, &str)]) -> SendPart {
    SendPart {
        idempotency_key: key.to_owned(),
        request_id: request_id.into(),
        recipients: emails
            .iter()
            .map(|(email, name)| Recipient {
                email: (*email).to_owned(),
                params: json!({ "name": name }).as_object().cloned().unwrap(),
            })
            .collect(),
    }
}

fn batch(parts: Vec<SendPart>) -> SendBatch {
    SendBatch { template: Template::Stored { id: "restock".into() }, class: Class::Realtime, parts }
}

#[tokio::test]
async fn sends_sharing_a_template_go_in_one_call_each_part_its_own_send_with_its_own_parameters() {
    let config = EspSimConfig { inline_recipients_max: 4, ..EspSimConfig::fast(4, Duration::ZERO) };
    let sim = start(config).await;
    let esp = esp(&sim);

    let deliveries = esp
        .send_batch(&batch(vec![
            part("send:ev-1~0", "ev-1", &[("a@x.com", "Ann"), ("b@x.com", "Bob")]),
            part("send:ev-2~0", "ev-2", &[("c@x.com", "Cy")]),
        ]))
        .await
        .unwrap();
    let too_many = esp
        .send_batch(&batch(vec![
            part("send:ev-3~0", "ev-3", &[("d@x.com", "D"), ("e@x.com", "E")]),
            part("send:ev-4~0", "ev-4", &[("f@x.com", "F"), ("g@x.com", "G"), ("h@x.com", "H")]),
        ]))
        .await;

    assert_eq!(deliveries.len(), 2);
    assert_ne!(deliveries[0], deliveries[1], "each part is a delivery of its own");
    assert_eq!(esp.find_delivery("send:ev-1~0").await.unwrap(), Some(deliveries[0].clone()));
    assert_eq!(esp.find_delivery("send:ev-2~0").await.unwrap(), Some(deliveries[1].clone()));
    let err = too_many.unwrap_err();
    assert!(matches!(err, EspError::Permanent(ref m) if m.contains("at most 4 recipients in all")), "{err}");
    assert_eq!(esp.find_delivery("send:ev-3~0").await.unwrap(), None, "a refused batch sends no part");
    let report = sim.report();
    assert_eq!(report.send.calls_accepted, 1, "one call for both parts");
    assert_eq!(report.deliveries.total, 3);
    let ev1: Vec<(String, serde_json::Value)> = sim
        .deliveries("ev-1")
        .unwrap()
        .recipients
        .into_iter()
        .map(|r| (r.email, r.params.unwrap_or_default()))
        .collect();
    assert_eq!(
        ev1,
        [("a@x.com".to_owned(), json!({"name": "Ann"})), ("b@x.com".to_owned(), json!({"name": "Bob"}))]
    );
    let ev2 = sim.deliveries("ev-2").unwrap();
    assert_eq!((ev2.recipients[0].email.as_str(), ev2.counts.total), ("c@x.com", 1));
    assert_eq!(ev2.recipients[0].params, Some(json!({"name": "Cy"})));
}

#[tokio::test]
async fn a_missing_or_wrong_api_key_is_refused_as_permanent() {
    let config = EspSimConfig { api_key: Some("s3cret".into()), ..EspSimConfig::fast(4, Duration::ZERO) };
    let sim = start(config).await;
    let upload = list("k", "r", &["a@x.com"]);

    let anonymous = esp(&sim).upload_list(&upload).await.unwrap_err();
    let wrong = ListSendEsp::new(ListSendConfig::new(sim.url()).with_api_key("nope")).unwrap();
    let wrong = wrong.find_delivery("k").await.unwrap_err();
    let right = ListSendEsp::new(ListSendConfig::new(sim.url()).with_api_key("s3cret")).unwrap();

    assert!(matches!(anonymous, EspError::Permanent(ref m) if m.contains("401")), "{anonymous}");
    assert!(matches!(wrong, EspError::Permanent(ref m) if m.contains("401")), "{wrong}");
    assert!(right.upload_list(&upload).await.is_ok());
    assert_eq!(sim.report().upload.invalid_calls, 1);
}

#[tokio::test]
async fn injected_errors_are_transient_and_injected_429s_rate_limited_without_work() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = esp(&sim);
    let upload = list("k", "r", &["a@x.com"]);

    sim.set_faults(Faults::only(Api::Upload, FaultRates { error: 1.0, ..FaultRates::default() })).unwrap();
    let error = esp.upload_list(&upload).await.unwrap_err();
    sim.set_faults(Faults::only(Api::Upload, FaultRates { rate_limit: 1.0, ..FaultRates::default() }))
        .unwrap();
    let limited = esp.upload_list(&upload).await.unwrap_err();

    assert!(matches!(error, EspError::Transient(ref m) if m.contains("500")), "{error}");
    assert!(!error.maybe_accepted());
    assert_eq!(limited, EspError::RateLimited { retry_after: Some(Duration::from_secs(1)) });
    let report = sim.report();
    assert_eq!((report.upload.injected.error, report.upload.injected.rate_limit), (1, 1));
    assert_eq!(report.upload.over_limit_attempts, 0);
    assert_eq!(report.upload.calls_accepted, 0);
    assert!(report.upload.timeline.is_empty());
}

/// Statuses of `n` sequential uploads, by raw HTTP.
async fn upload_statuses(sim: &EspSimHandle, n: usize) -> Vec<u16> {
    let http = reqwest::Client::new();
    let body = serde_json::to_vec(&list("k", "r", &["a@x.com"])).unwrap();
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        let response = http
            .post(format!("{}/v1/lists", sim.url()))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn faults_are_injected_at_roughly_their_rates_and_repeat_with_the_seed() {
    let faulty = || EspSimConfig {
        seed: 42,
        faults: Faults {
            spike_factor: 1.0,
            ..Faults::both(FaultRates {
                error: 0.2,
                rate_limit: 0.1,
                timeout_after_accept: 0.0,
                latency_spike: 0.3,
            })
        },
        ..EspSimConfig::fast(4, Duration::ZERO)
    };
    let sim = start(faulty()).await;

    let statuses = upload_statuses(&sim, 400).await;

    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    assert!((50..=110).contains(&count(500)), "500s: {}", count(500));
    assert!((20..=65).contains(&count(429)), "429s: {}", count(429));
    assert_eq!(count(500) + count(429) + count(201), 400);
    let report = sim.report();
    assert_eq!(report.upload.injected.error, count(500) as u64);
    assert_eq!(report.upload.injected.rate_limit, count(429) as u64);
    let spikes = report.upload.injected.latency_spike as f64 / count(201) as f64;
    assert!((0.2..=0.4).contains(&spikes), "spike share {spikes}");

    let again = start(faulty()).await;
    assert_eq!(upload_statuses(&again, 400).await, statuses);
    let other_seed = start(EspSimConfig { seed: 43, ..faulty() }).await;
    assert_ne!(upload_statuses(&other_seed, 400).await, statuses);
}

#[tokio::test]
async fn a_latency_spike_multiplies_the_latency() {
    let config = EspSimConfig {
        faults: Faults {
            spike_factor: 5.0,
            ..Faults::only(Api::Upload, FaultRates { latency_spike: 1.0, ..FaultRates::default() })
        },
        ..EspSimConfig::fast(4, Duration::from_millis(40))
    };
    let sim = start(config).await;

    let started = std::time::Instant::now();
    esp(&sim).upload_list(&list("k", "r", &["a@x.com"])).await.unwrap();

    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    let report = sim.report();
    assert!((report.upload.service_seconds - 0.2).abs() < 1e-6, "{}", report.upload.service_seconds);
}

fn timeout_faults(hold: Duration) -> Faults {
    Faults {
        timeout_hold: hold,
        ..Faults::only(Api::Send, FaultRates { timeout_after_accept: 1.0, ..FaultRates::default() })
    }
}

#[tokio::test]
async fn a_timeout_after_accept_is_indeterminate_yet_delivered_and_findable() {
    let sim = start(EspSimConfig::fast(4, Duration::from_millis(10))).await;
    let esp =
        ListSendEsp::new(ListSendConfig::new(sim.url()).with_timeout(Duration::from_millis(300))).unwrap();
    let l = esp.upload_list(&list("k", "req-9", &["a@x.com", "b@x.com"])).await.unwrap();
    sim.set_faults(timeout_faults(Duration::from_secs(30))).unwrap();

    let err = esp.send(&send_of("req-9~000000:send", "req-9", &l)).await.unwrap_err();

    assert!(matches!(err, EspError::Indeterminate(ref m) if m.contains("timed out")), "{err}");
    assert!(err.is_retryable());
    let report = sim.report();
    assert_eq!(report.deliveries.total, 2);
    assert_eq!(report.send.injected.timeout_after_accept, 1);
    assert_eq!(report.send.in_progress, 0, "the slot is freed once the work is done");
    let found = esp.find_delivery("req-9~000000:send").await.unwrap();
    assert!(found.is_some());
    let shutting_down = std::time::Instant::now();
    sim.shutdown().await.unwrap();
    assert!(shutting_down.elapsed() < Duration::from_secs(5), "withheld answers do not delay shutdown");
}

#[tokio::test]
async fn a_dropped_connection_after_accept_is_indeterminate_too() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = esp(&sim);
    let l = esp.upload_list(&list("k", "r", &["a@x.com"])).await.unwrap();
    sim.set_faults(timeout_faults(Duration::ZERO)).unwrap();

    let err = esp.send(&send_of("k:send", "r", &l)).await.unwrap_err();

    assert!(err.maybe_accepted(), "{err}");
    assert_eq!(sim.report().deliveries.total, 1);
    assert!(esp.find_delivery("k:send").await.unwrap().is_some());
}

#[tokio::test]
async fn work_goes_on_and_holds_its_slot_after_the_caller_hangs_up() {
    let sim = start(EspSimConfig::fast(1, Duration::from_millis(300))).await;
    let impatient =
        ListSendEsp::new(ListSendConfig::new(sim.url()).with_timeout(Duration::from_millis(50))).unwrap();

    let gave_up = impatient.upload_list(&list("k", "r", &["a@x.com"])).await.unwrap_err();
    let retried = esp(&sim).upload_list(&list("k", "r", &["a@x.com"])).await.unwrap_err();
    tokio::time::sleep(Duration::from_millis(400)).await;

    assert!(gave_up.maybe_accepted(), "{gave_up}");
    assert!(matches!(retried, EspError::RateLimited { .. }), "{retried}");
    let report = sim.report();
    assert_eq!(report.upload.calls_completed, 1);
    assert_eq!(report.upload.over_limit_attempts, 1);
    // The list exists: uploading with the same key returns it at once.
    assert_eq!(
        esp(&sim).upload_list(&list("k", "r", &["a@x.com"])).await.unwrap(),
        ListId("lst-00000001".into())
    );
}

#[tokio::test]
async fn busy_slot_seconds_are_computed_over_a_window() {
    let sim = start(EspSimConfig::fast(2, Duration::from_millis(200))).await;
    let esp = esp(&sim);
    let uploads = [list("a", "r", &["a@x.com"]), list("b", "r", &["b@x.com"])];

    let results = join_all(uploads.iter().map(|l| esp.upload_list(l))).await;

    assert!(results.iter().all(Result::is_ok));
    let report = sim.report();
    let total = report.upload.busy_slot_seconds;
    assert!((0.39..0.6).contains(&total), "busy {total}");
    let timeline = &report.upload.timeline;
    assert_eq!(timeline.len(), 4);
    let ms = |at: f64| chrono::DateTime::from_timestamp_micros((at * 1000.0).round() as i64).unwrap();
    let (first, last) = (ms(timeline[0].at_ms), ms(timeline[3].at_ms));
    let whole = report.busy_slot_seconds(Api::Upload, first, last);
    assert!((whole - total).abs() < 0.002, "{whole} vs {total}");
    let mid = first + chrono::Duration::milliseconds(100);
    let first_half = report.busy_slot_seconds(Api::Upload, report.started_at, mid);
    assert!((0.18..0.21).contains(&first_half), "first half {first_half}");
    assert!(report.utilization(Api::Upload, first, last) > 0.9);
    assert_eq!(report.busy_slot_seconds(Api::Send, first, last), 0.0);
}

#[tokio::test]
async fn a_ten_thousand_recipient_list_is_cheap_and_keeps_only_hashes() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = esp(&sim);
    let emails: Vec<String> = (0..10_000).map(|i| format!("user{i}@example.com")).collect();
    let emails: Vec<&str> = emails.iter().map(String::as_str).collect();
    let upload = list("big", "big-req", &emails);

    let started = std::time::Instant::now();
    let l = esp.upload_list(&upload).await.unwrap();
    let uploaded_in = started.elapsed();
    esp.send(&send_of("big:send", "big-req", &l)).await.unwrap();

    assert!(uploaded_in < Duration::from_secs(3), "{uploaded_in:?}");
    let deliveries = sim.deliveries("big-req").unwrap();
    assert_eq!(deliveries.counts.unique, 10_000);
    assert!(!deliveries.addresses_complete);
    assert!(deliveries.recipients.is_empty());
}

#[tokio::test]
async fn the_report_and_faults_are_available_over_http() {
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let client = SimClient::new(&sim.url()).unwrap();
    client.wait_ready(Duration::from_secs(5)).await.unwrap();
    let l = esp(&sim).upload_list(&list("k", "r", &["a@x.com"])).await.unwrap();
    esp(&sim).send(&send_of("k", "r", &l)).await.unwrap();
    let faults = Faults::only(Api::Send, FaultRates { error: 0.5, ..FaultRates::default() });

    client.set_faults(&faults).await.unwrap();
    let bad = client.set_faults(&Faults::both(FaultRates { error: 2.0, ..FaultRates::default() })).await;
    let report = client.report(true).await.unwrap();
    let lean = client.report(false).await.unwrap();

    assert!(bad.is_err());
    assert_eq!(sim.faults(), faults);
    assert_eq!(report.faults, faults);
    assert_eq!(report.deliveries.total, 1);
    assert_eq!(report.requests["r"].counts.sends, 1);
    assert_eq!(report.upload.timeline.len(), 2);
    assert!(lean.upload.timeline.is_empty());
    assert_eq!(client.deliveries("nobody").await.unwrap(), None);
}

#[tokio::test]
async fn an_esp_that_cannot_be_reached_is_transient_and_never_maybe_accepted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let esp = ListSendEsp::new(ListSendConfig::new(url)).unwrap();

    let err = esp.upload_list(&list("k", "r", &["a@x.com"])).await.unwrap_err();

    assert!(matches!(err, EspError::Transient(_)), "{err}");
    assert!(!err.maybe_accepted());
}

#[tokio::test]
async fn a_bare_404_is_not_taken_for_an_unknown_send() {
    // A base url that misses the API: the 404s are the router's, not the protocol's.
    let sim = start(EspSimConfig::fast(4, Duration::ZERO)).await;
    let esp = ListSendEsp::new(ListSendConfig::new(format!("{}/wrong/", sim.url()))).unwrap();

    let err = esp.find_delivery("k").await.unwrap_err();

    assert!(matches!(err, EspError::Permanent(_)), "{err}");
}
