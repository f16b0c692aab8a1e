//! Requests stored straight in the database with pending chunks, ready for a dispatch round: for
//! tests of the scheduling rule without the services.

use std::time::Duration;

use haishin_shared::domain::{Audience, ChunkId, Class, DeliveryRequest, Recipient, RequestId, Template};
use haishin_shared::store::{Claim, Store};
use haishin_trigger::intake::records::insert_request;
use haishin_trigger::prepare::AudienceSummary;
use haishin_trigger::prepare::records::{NewChunk, claim_prepare, finish_prepare, insert_chunks};

/// A request of `class` and `priority` with a stored template and one inline recipient.
pub fn request(id: &str, class: Class, priority: i32) -> DeliveryRequest {
    DeliveryRequest {
        id: RequestId::from(id),
        class,
        priority,
        template: Template::Stored { id: "t".into() },
        audience: Audience::Inline(vec![Recipient {
            email: "a@example.com".into(),
            params: Default::default(),
        }]),
        not_before: None,
        deadline: None,
        labels: Default::default(),
    }
}

/// Pending chunk rows `seqs` of the request, 10 recipients each.
pub fn new_chunks(request: &DeliveryRequest, seqs: std::ops::Range<u32>) -> Vec<NewChunk> {
    seqs.map(|seq| NewChunk {
        id: ChunkId::new(&request.id, seq),
        seq,
        object: format!("o/{seq}"),
        recipients: 10,
        lines: None,
    })
    .collect()
}

/// Ends the request's prepare step with this summary, a row read for each recipient.
pub async fn finish(store: &Store, id: &RequestId, summary: &AudienceSummary) {
    let summary = AudienceSummary { rows: summary.recipients, ..summary.clone() };
    assert!(finish_prepare(store, id, &summary).await.unwrap());
}

/// Stores the request, prepared into `chunks` pending chunks of 10 recipients.
pub async fn ready(store: &Store, request: &DeliveryRequest, chunks: u32) {
    assert!(insert_request(store, request).await.unwrap());
    let Claim::Claimed(_) = claim_prepare(store, &request.id, Duration::from_secs(60)).await.unwrap() else {
        panic!("prepare not claimed")
    };
    insert_chunks(store, request, &new_chunks(request, 0..chunks)).await.unwrap();
    let summary = AudienceSummary { chunks, recipients: 10 * u64::from(chunks), ..Default::default() };
    finish(store, &request.id, &summary).await;
}
