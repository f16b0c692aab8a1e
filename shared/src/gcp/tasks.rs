//! Creating Cloud Tasks HTTP tasks with OIDC tokens.

use std::time::Duration;

use google_cloud_gax::error::rpc::Code;
use google_cloud_tasks_v2::client::CloudTasks;
use google_cloud_tasks_v2::model::{HttpMethod, HttpRequest, OidcToken, Task};
use serde::Serialize;

use super::{GcpArgs, GcpError, anonymous};
use crate::telemetry::{TRACEPARENT, current_traceparent};

/// A Cloud Tasks queue whose tasks POST JSON to one URL with an OIDC token.
#[derive(Clone, Debug)]
pub struct TaskQueue {
    client: CloudTasks,
    queue: String,
    url: String,
    service_account: String,
    audience: String,
    dispatch_deadline: Duration,
}

/// What creating a named task found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Created,
    /// A task of that name exists (or did recently): the work is already queued.
    AlreadyExists,
}

/// Settings of one queue target.
#[derive(Debug, Clone)]
pub struct QueueTarget {
    /// `projects/P/locations/L/queues/Q`.
    pub queue: String,
    /// Where tasks are delivered.
    pub url: String,
    /// The account whose OIDC token the tasks carry.
    pub service_account: String,
    /// The token's audience (the target service's URL).
    pub audience: String,
    /// How long Cloud Tasks waits for the target to answer before it cancels the attempt and
    /// retries: the target's own request timeout. Cloud Tasks accepts 15 s to 30 min.
    pub dispatch_deadline: Duration,
}

/// The dispatch deadlines Cloud Tasks accepts.
const DISPATCH_DEADLINE_RANGE: (Duration, Duration) = (Duration::from_secs(15), Duration::from_secs(1800));

/// A Cloud Tasks task name derived from `key`: deterministic, so that creating the task again
/// finds the first one; hashed, because Cloud Tasks slows down on sequential names.
pub fn task_name(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl TaskQueue {
    pub async fn connect(args: &GcpArgs, target: QueueTarget) -> anyhow::Result<Self> {
        let mut builder = CloudTasks::builder();
        if let Some(endpoint) = &args.tasks_endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(anonymous());
        }
        let client = builder.build().await?;
        let (shortest, longest) = DISPATCH_DEADLINE_RANGE;
        let dispatch_deadline = target.dispatch_deadline.clamp(shortest, longest);
        if dispatch_deadline != target.dispatch_deadline {
            tracing::warn!(
                queue = %target.queue,
                asked_secs = target.dispatch_deadline.as_secs(),
                used_secs = dispatch_deadline.as_secs(),
                "Dispatch deadline outside what Cloud Tasks accepts; clamped."
            );
        }
        Ok(Self {
            client,
            queue: target.queue,
            url: target.url,
            service_account: target.service_account,
            audience: target.audience,
            dispatch_deadline,
        })
    }

    /// Creates a task delivering `body`, with the `traceparent` of the current span. A named task
    /// is created at most once: Cloud Tasks refuses a name it has seen, which makes re-dispatch
    /// after a crash harmless.
    pub async fn enqueue<T: Serialize>(&self, name: Option<&str>, body: &T) -> Result<Enqueued, GcpError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| GcpError::Permanent { what: "encoding a task", detail: e.to_string() })?;
        let http = HttpRequest::new()
            .set_url(self.url.clone())
            .set_http_method(HttpMethod::Post)
            .set_headers(task_headers())
            .set_body(body)
            .set_oidc_token(
                OidcToken::new()
                    .set_service_account_email(self.service_account.clone())
                    .set_audience(self.audience.clone()),
            );
        let deadline = google_cloud_wkt::Duration::clamp(self.dispatch_deadline.as_secs() as i64, 0);
        let mut task = Task::new().set_http_request(http).set_dispatch_deadline(deadline);
        if let Some(name) = name {
            task = task.set_name(format!("{}/tasks/{name}", self.queue));
        }
        match self.client.create_task().set_parent(self.queue.clone()).set_task(task).send().await {
            Ok(_) => Ok(Enqueued::Created),
            Err(err) if err.status().is_some_and(|s| s.code == Code::AlreadyExists) => {
                Ok(Enqueued::AlreadyExists)
            }
            Err(err) => Err(GcpError::from_gax("creating a task", &err)),
        }
    }
}

/// A task's HTTP headers: its content type, and the trace context of the current span, so that the
/// target's request span continues the trace.
fn task_headers() -> Vec<(&'static str, String)> {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    if let Some(traceparent) = current_traceparent() {
        headers.push((TRACEPARENT, traceparent));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::parse_traceparent;
    use crate::telemetry::testing::{TRACE, in_remote_trace};

    #[test]
    fn a_task_carries_the_trace_of_the_span_that_enqueues_it() {
        let headers = in_remote_trace(task_headers);

        let (_, sent) = headers.iter().find(|(name, _)| *name == TRACEPARENT).expect("a traceparent header");
        let sent = parse_traceparent(sent).expect("a valid traceparent");
        assert_eq!(sent.trace_id().to_string(), TRACE);
        assert!(headers.contains(&("Content-Type", "application/json".to_owned())));
    }

    #[test]
    fn outside_a_span_a_task_carries_no_traceparent() {
        assert_eq!(task_headers(), [("Content-Type", "application/json".to_owned())]);
    }
}
