//! Sends without a list that share a template, coalesced into one call while they wait for a
//! slot.
//!
//! The first send of a template opens a batch and waits for a provider slot; sends of the same
//! template and class that become ready meanwhile join it, up to the most recipients one call
//! carries. When the slot comes, the batch closes and goes out as one call: alone, the protocol's
//! inline send; with others, a send batch whose parts keep their own keys, requests and
//! recipients' parameters. So an idle ESP sees each send at once, and a busy one sees as many
//! sends per call as arrived while its slots were taken: the batch grows with the load, and adds
//! no wait of its own.
//!
//! An ESP without a send batch call ([`EspProvider::sends_batches`]) gets each send alone.
//!
//! Each part's result goes back to its own chunk, which settles it as a send of its own (a lost
//! answer is looked up in the ESP's history under that chunk's key).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use haishin_shared::domain::{Class, Template};
use haishin_shared::esp::{DeliveryId, EspError, EspProvider, SendBatch, SendPart, SendRequest, SendTo};
use haishin_shared::store::RateSchedule;
use haishin_shared::telemetry::metrics::{Api, metrics, outcome};
use tokio::sync::{Semaphore, oneshot};

/// What a part's send came to: its delivery or the call's error, or the rate schedule's error
/// before any call was made.
pub(crate) type PartResult = Result<Result<DeliveryId, EspError>, String>;

/// Which sends may share a call: the template (as JSON) and the class.
type Key = (String, Class);

/// A part waiting in a batch, and where its result goes.
type Waiting = (SendPart, oneshot::Sender<PartResult>);

/// The batches open, one per template and class.
pub struct Coalescer {
    /// Most recipients one call carries.
    max: usize,
    open: Mutex<HashMap<Key, Arc<Mutex<Batch>>>>,
}

/// A part queued for a call.
pub(crate) struct Ticket<'a> {
    coalescer: &'a Coalescer,
    key: Key,
    /// The batch this part opened, whose call it makes.
    lead: Option<Arc<Mutex<Batch>>>,
    result: oneshot::Receiver<PartResult>,
    template: Template,
    class: Class,
}

impl Ticket<'_> {
    /// The queued part's result: the call made for its batch, by this part when it opened the
    /// batch (once a slot is free, with whatever joined it by then), or by the part that did.
    pub(crate) async fn complete(
        self,
        esp: &dyn EspProvider,
        slots: &Semaphore,
        calls: Option<&RateSchedule>,
    ) -> PartResult {
        let Ticket { coalescer, key, lead, result, template, class } = self;
        if let Some(batch) = lead {
            let _slot = slots.acquire().await.expect("the semaphore is never closed");
            let parts = coalescer.close(&key, &batch);
            let waited = match calls {
                Some(calls) => calls.wait(1).await.map(drop).map_err(|err| err.to_string()),
                None => Ok(()),
            };
            match waited {
                Ok(()) => make_call(esp, &template, class, parts).await,
                Err(err) => {
                    for (_, done) in parts {
                        let _ = done.send(Err(err.clone()));
                    }
                }
            }
        }
        result.await.unwrap_or_else(|_| Err("the send batch stopped".into()))
    }
}

#[derive(Default)]
struct Batch {
    /// Taken by the call: no part joins any more.
    closed: bool,
    recipients: usize,
    parts: Vec<Waiting>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Coalescer {
    pub fn new(max: u32) -> Self {
        Self { max: max.max(1) as usize, open: Mutex::new(HashMap::new()) }
    }

    /// Puts `part` in the open batch of its template and class (or opens one): the part waits
    /// there for [`Ticket::complete`]. Parts queued together before any is completed share a
    /// call (up to the most recipients one call carries).
    pub(crate) fn queue(
        &self,
        esp: &dyn EspProvider,
        template: &Template,
        class: Class,
        part: SendPart,
    ) -> Ticket<'_> {
        let key = (serde_json::to_string(template).unwrap_or_default(), class);
        let (done, result) = oneshot::channel();
        let lead = if esp.sends_batches() {
            self.join(key.clone(), part, done)
        } else {
            Some(Arc::new(Mutex::new(Batch { closed: false, recipients: 0, parts: vec![(part, done)] })))
        };
        Ticket { coalescer: self, key, lead, result, template: template.clone(), class }
    }

    /// Adds the part to the open batch of its key if it has room; otherwise opens a new batch
    /// with it and returns that batch, whose call the caller makes.
    fn join(&self, key: Key, part: SendPart, done: oneshot::Sender<PartResult>) -> Option<Arc<Mutex<Batch>>> {
        let n = part.recipients.len();
        let mut open = lock(&self.open);
        if let Some(batch) = open.get(&key) {
            let mut batch = lock(batch);
            if !batch.closed && batch.recipients + n <= self.max {
                batch.recipients += n;
                batch.parts.push((part, done));
                return None;
            }
        }
        let batch = Arc::new(Mutex::new(Batch { closed: false, recipients: n, parts: vec![(part, done)] }));
        open.insert(key, Arc::clone(&batch));
        Some(batch)
    }

    /// Closes a batch for its call: no part joins it any more, and it is no longer the open
    /// batch of its key.
    fn close(&self, key: &Key, batch: &Arc<Mutex<Batch>>) -> Vec<Waiting> {
        let mut open = lock(&self.open);
        if open.get(key).is_some_and(|b| Arc::ptr_eq(b, batch)) {
            open.remove(key);
        }
        let mut batch = lock(batch);
        batch.closed = true;
        std::mem::take(&mut batch.parts)
    }
}

/// One call for the parts: alone, an inline send; together, a send batch. Each part is told its
/// result.
async fn make_call(esp: &dyn EspProvider, template: &Template, class: Class, mut parts: Vec<Waiting>) {
    let call = metrics().esp_call(Api::Send, class);
    if parts.len() == 1 {
        let (part, done) = parts.pop().expect("one part");
        let send = SendRequest {
            idempotency_key: part.idempotency_key,
            request_id: part.request_id,
            to: SendTo::Recipients { recipients: part.recipients },
            template: template.clone(),
            class,
        };
        let result = esp.send(&send).await;
        call.finish(outcome(result.as_ref().map(drop)));
        let _ = done.send(Ok(result));
        return;
    }
    let (parts, done): (Vec<SendPart>, Vec<_>) = parts.into_iter().unzip();
    let batch = SendBatch { template: template.clone(), class, parts };
    let result = esp.send_batch(&batch).await;
    call.finish(outcome(result.as_ref().map(drop)));
    tracing::debug!(sends = batch.parts.len(), recipients = batch.recipients(), "Send batch made.");
    match result {
        Ok(deliveries) => {
            for (delivery, done) in deliveries.into_iter().zip(done) {
                let _ = done.send(Ok(Ok(delivery)));
            }
        }
        Err(err) => {
            for done in done {
                let _ = done.send(Ok(Err(err.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use haishin_shared::domain::{Class, Recipient, Template};
    use haishin_shared::esp::{
        DeliveryId, DeliveryStatus, EspError, EspProvider, ListId, ListUpload, SendBatch, SendPart,
        SendRequest,
    };
    use tokio::sync::Semaphore;

    use super::Coalescer;

    /// An ESP that records how many sends each call carried.
    struct Recording {
        batches: bool,
        calls: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl EspProvider for Recording {
        async fn upload_list(&self, _: &ListUpload<'_>) -> Result<ListId, EspError> {
            Err(EspError::Permanent("no uploads here".into()))
        }
        async fn send(&self, send: &SendRequest) -> Result<DeliveryId, EspError> {
            self.calls.lock().unwrap().push(1);
            Ok(DeliveryId(format!("d-{}", send.idempotency_key)))
        }
        fn sends_batches(&self) -> bool {
            self.batches
        }
        async fn send_batch(&self, batch: &SendBatch) -> Result<Vec<DeliveryId>, EspError> {
            self.calls.lock().unwrap().push(batch.parts.len());
            Ok(batch.parts.iter().map(|p| DeliveryId(format!("d-{}", p.idempotency_key))).collect())
        }
        async fn find_delivery(&self, _: &str) -> Result<Option<DeliveryId>, EspError> {
            Ok(None)
        }
        async fn delivery_status(&self, _: &DeliveryId) -> Result<DeliveryStatus, EspError> {
            Ok(DeliveryStatus::Processing)
        }
    }

    fn part(key: &str, n: usize) -> SendPart {
        let recipients = (0..n)
            .map(|i| Recipient { email: format!("{key}-{i}@x.com"), params: Default::default() })
            .collect();
        SendPart { idempotency_key: key.into(), request_id: key.into(), recipients }
    }

    /// Queues every part before completing any, as the sender does with one message's chunks.
    async fn send_all(esp: &Recording, parts: Vec<(&Template, SendPart)>) -> Vec<DeliveryId> {
        let coalescer = Coalescer::new(5);
        let slots = Semaphore::new(8);
        let tickets: Vec<_> = parts
            .into_iter()
            .map(|(template, part)| coalescer.queue(esp, template, Class::Realtime, part))
            .collect();
        let results =
            futures::future::join_all(tickets.into_iter().map(|t| t.complete(esp, &slots, None))).await;
        results.into_iter().map(|r| r.unwrap().unwrap()).collect()
    }

    #[tokio::test]
    async fn sends_of_a_template_share_a_call_up_to_the_most_recipients_it_carries() {
        let esp = Recording { batches: true, calls: Mutex::new(Vec::new()) };
        let (restock, drop) =
            (Template::Stored { id: "restock".into() }, Template::Stored { id: "drop".into() });
        let parts = vec![
            (&restock, part("a", 2)),
            (&drop, part("b", 1)),
            (&restock, part("c", 3)),
            (&restock, part("d", 1)),
        ];

        let deliveries = send_all(&esp, parts).await;

        // restock: a + c fill one call (5), d opens another; drop: b alone.
        let mut calls = esp.calls.lock().unwrap().clone();
        calls.sort();
        assert_eq!(calls, [1, 1, 2]);
        let ids: Vec<&str> = deliveries.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(ids, ["d-a", "d-b", "d-c", "d-d"], "each part gets its own delivery");
    }

    #[tokio::test]
    async fn an_esp_without_send_batches_gets_each_send_alone() {
        let esp = Recording { batches: false, calls: Mutex::new(Vec::new()) };
        let restock = Template::Stored { id: "restock".into() };

        let deliveries = send_all(&esp, vec![(&restock, part("a", 1)), (&restock, part("b", 1))]).await;

        assert_eq!(*esp.calls.lock().unwrap(), [1, 1]);
        assert_eq!(deliveries.len(), 2);
    }
}
