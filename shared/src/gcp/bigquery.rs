//! BigQuery's REST API, the part the services call: a query run to its end (`jobs.query`, then
//! `jobs.getQueryResults` while it runs), a query job under an id of the caller's choosing
//! (`jobs.insert`, `jobs.get`), and BigQuery's errors split into transient and permanent.
//!
//! Hand-made REST rather than the `google-cloud-bigquery-v2` crate: its errors keep the HTTP
//! status and the `google.rpc` status but drop BigQuery's own `errors[].reason`, and that reason
//! is what tells a retryable `rateLimitExceeded` (HTTP 403) from a final `accessDenied` (also
//! 403). The calls are few and their JSON is small.

use std::time::Duration;

use google_cloud_auth::credentials::Credentials;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{GcpArgs, GcpError, rest_credentials, rest_headers};

/// How long one call may wait on BigQuery's side for a query to finish before it is polled again.
const POLL_WAIT: Duration = Duration::from_secs(10);

/// Reasons BigQuery gives for a failure that a later attempt can get past. Every other reason
/// (`invalidQuery`, `notFound`, `accessDenied`, `quotaExceeded`, `invalid`, …) is final.
const TRANSIENT_REASONS: [&str; 8] = [
    "backendError",
    "internalError",
    "jobBackendError",
    "jobInternalError",
    "rateLimitExceeded",
    "jobRateLimitExceeded",
    "tableUnavailable",
    "timeout",
];

/// A failed BigQuery call or job: BigQuery's reason (empty when there was no answer) and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if reason.is_empty() { String::new() } else { format!("{reason}: ") })]
pub struct BigQueryError {
    pub reason: String,
    pub message: String,
    /// Whether a later attempt can succeed.
    pub transient: bool,
}

impl BigQueryError {
    fn unanswered(message: String) -> Self {
        Self { reason: String::new(), message, transient: true }
    }

    /// From BigQuery's reason when it gave one, else from the HTTP status (as [`GcpError::classify`]).
    fn classify(reason: &str, message: &str, http: Option<u16>) -> Self {
        let transient = if reason.is_empty() {
            matches!(GcpError::classify("", None, http, String::new()), GcpError::Transient { .. })
        } else {
            TRANSIENT_REASONS.contains(&reason)
        };
        Self { reason: reason.to_owned(), message: clean(message), transient }
    }

    /// As a [`GcpError`] about `what`.
    pub fn into_gcp(self, what: &'static str) -> GcpError {
        let detail = self.to_string();
        if self.transient {
            GcpError::Transient { what, detail }
        } else {
            GcpError::Permanent { what, detail }
        }
    }
}

/// Text fit for a status line: one line, no terminal escapes.
fn clean(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A query job as `jobs.insert` and `jobs.get` describe it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Job {
    pub status: JobStatus,
    /// `statistics` as BigQuery reports it (`query.exportDataStatistics.fileCount`, …).
    pub statistics: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JobStatus {
    /// `PENDING`, `RUNNING` or `DONE`.
    pub state: String,
    error_result: Option<ErrorProto>,
}

impl Job {
    pub fn done(&self) -> bool {
        self.status.state == "DONE"
    }

    /// Why a finished job failed, if it did.
    pub fn error(&self) -> Option<BigQueryError> {
        let e = self.status.error_result.as_ref()?;
        Some(BigQueryError::classify(&e.reason, &e.message, None))
    }
}

/// The parts of an answer used here: a query's state, a job, or an error.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Answer {
    job_complete: bool,
    job_reference: Option<JobReference>,
    /// Errors of a finished query (the emulator also answers a failed query with 200 and these).
    errors: Vec<ErrorProto>,
    error: Option<ErrorBody>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobReference {
    job_id: String,
    location: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ErrorProto {
    reason: String,
    message: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ErrorBody {
    message: String,
    errors: Vec<ErrorProto>,
}

/// A BigQuery client for one project, built once at start.
#[derive(Debug, Clone)]
pub struct BigQuery {
    http: reqwest::Client,
    credentials: Credentials,
    /// `…/bigquery/v2/projects/<project>`.
    base: String,
    project: String,
    /// Where jobs run (`US`, `EU`, a region); BigQuery infers it when absent.
    location: Option<String>,
}

impl BigQuery {
    /// A client for `gcp.project`, on Google's endpoint or `gcp.bigquery_endpoint`.
    pub fn new(gcp: &GcpArgs, location: Option<&str>) -> anyhow::Result<Self> {
        let endpoint =
            gcp.bigquery_endpoint.clone().unwrap_or_else(|| "https://bigquery.googleapis.com".to_owned());
        Ok(Self {
            http: reqwest::Client::builder().timeout(POLL_WAIT + Duration::from_secs(50)).build()?,
            credentials: rest_credentials(gcp.bigquery_endpoint.as_ref())?,
            base: format!("{}/bigquery/v2/projects/{}", endpoint.trim_end_matches('/'), gcp.project),
            project: gcp.project.clone(),
            location: location.filter(|l| !l.is_empty()).map(str::to_owned),
        })
    }

    /// The project jobs run in.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// Runs a GoogleSQL statement with named `parameters` to its end, waiting at most `wait`,
    /// and returns the finished answer (`rows`, `schema`, `numDmlAffectedRows`, …).
    pub async fn query(
        &self,
        sql: &str,
        parameters: Vec<Value>,
        wait: Duration,
    ) -> Result<serde_json::Map<String, Value>, BigQueryError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut body = json!({
            "query": sql,
            "useLegacySql": false,
            "parameterMode": "NAMED",
            "queryParameters": parameters,
            "timeoutMs": POLL_WAIT.as_millis() as u64,
        });
        if let Some(location) = &self.location {
            body["location"] = location.as_str().into();
        }
        let mut answer = self.call(self.http.post(format!("{}/queries", self.base)).json(&body)).await?;
        loop {
            if answer.job_complete {
                return Ok(answer.rest);
            }
            let Some(job) = &answer.job_reference else {
                return Err(BigQueryError::unanswered("the query's answer names no job".into()));
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(BigQueryError::unanswered(format!(
                    "job {} did not finish in {wait:?}",
                    job.job_id
                )));
            }
            let mut url = format!("{}/queries/{}?timeoutMs={}", self.base, job.job_id, POLL_WAIT.as_millis());
            if let Some(location) = job.location.as_ref().or(self.location.as_ref()) {
                url.push_str(&format!("&location={location}"));
            }
            answer = self.call(self.http.get(url)).await?;
        }
    }

    /// The job `job_id`, or `None` when BigQuery has none by that id.
    pub async fn job(&self, job_id: &str) -> Result<Option<Job>, BigQueryError> {
        let mut url = format!("{}/jobs/{job_id}", self.base);
        if let Some(location) = &self.location {
            url.push_str(&format!("?location={location}"));
        }
        match self.call(self.http.get(url)).await {
            Ok(answer) => Ok(Some(job_of(answer)?)),
            Err(e) if e.reason == "notFound" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts a query job under `job_id`. Ids are never reused: an id already taken answers
    /// `duplicate`, and the job already there is returned instead. (Look the id up with
    /// [`BigQuery::job`] first: the emulator replaces a job inserted twice.)
    pub async fn insert_query(
        &self,
        job_id: &str,
        sql: &str,
        parameters: Vec<Value>,
    ) -> Result<Job, BigQueryError> {
        let mut reference = json!({ "projectId": self.project, "jobId": job_id });
        if let Some(location) = &self.location {
            reference["location"] = location.as_str().into();
        }
        let body = json!({
            "jobReference": reference,
            "configuration": { "query": {
                "query": sql,
                "useLegacySql": false,
                "parameterMode": "NAMED",
                "queryParameters": parameters,
            } },
        });
        match self.call(self.http.post(format!("{}/jobs", self.base)).json(&body)).await {
            Ok(answer) => job_of(answer),
            Err(e) if e.reason == "duplicate" => self
                .job(job_id)
                .await?
                .ok_or_else(|| BigQueryError::unanswered(format!("job {job_id} is taken but not found"))),
            Err(e) => Err(e),
        }
    }

    /// Polls the job until it is done or `wait` has passed, and returns it as last seen.
    pub async fn wait_for(&self, job_id: &str, mut job: Job, wait: Duration) -> Result<Job, BigQueryError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(200);
        while !job.done() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            job = self
                .job(job_id)
                .await?
                .ok_or_else(|| BigQueryError::unanswered(format!("job {job_id} is gone")))?;
        }
        Ok(job)
    }

    /// One REST call; an error answer (HTTP, or `errors` in a finished query) becomes its error.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Answer, BigQueryError> {
        let unanswered = |e: &dyn std::fmt::Display| BigQueryError::unanswered(e.to_string());
        let headers = rest_headers(&self.credentials).await.map_err(|e| unanswered(&e))?;
        let response = request.headers(headers).send().await.map_err(|e| unanswered(&e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| unanswered(&e))?;
        let Ok(answer) = serde_json::from_str::<Answer>(&text) else {
            let shown: String = text.chars().take(300).collect();
            return Err(BigQueryError::classify("", &format!("{status}: {shown}"), Some(status.as_u16())));
        };
        let failure = match &answer.error {
            Some(body) => Some(body.errors.first().cloned().map_or_else(
                || ErrorProto { reason: String::new(), message: body.message.clone() },
                |e| ErrorProto {
                    message: if e.message.is_empty() { body.message.clone() } else { e.message },
                    ..e
                },
            )),
            None => answer.errors.first().cloned(),
        };
        match failure {
            Some(e) => Err(BigQueryError::classify(&e.reason, &e.message, Some(status.as_u16()))),
            None if !status.is_success() => {
                Err(BigQueryError::classify("", status.as_str(), Some(status.as_u16())))
            }
            None => Ok(answer),
        }
    }
}

fn job_of(answer: Answer) -> Result<Job, BigQueryError> {
    serde_json::from_value(Value::Object(answer.rest))
        .map_err(|e| BigQueryError::unanswered(format!("unreadable job: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigquery_reasons_decide_what_is_retried() {
        let rate = BigQueryError::classify("rateLimitExceeded", "Exceeded rate limits", Some(403));
        assert!(rate.transient);
        let denied = BigQueryError::classify("accessDenied", "Access Denied: Table p:d.t", Some(403));
        assert!(!denied.transient);
        assert_eq!(denied.to_string(), "accessDenied: Access Denied: Table p:d.t");
        assert!(!BigQueryError::classify("quotaExceeded", "Quota exceeded", Some(403)).transient);
        assert!(BigQueryError::classify("backendError", "", Some(500)).transient);
        assert!(BigQueryError::classify("", "", Some(503)).transient);
        assert!(!BigQueryError::classify("", "", Some(400)).transient);
    }

    #[test]
    fn messages_are_one_clean_line() {
        assert_eq!(
            clean("Syntax error: at\n  SELEC * \u{1b}[4mFROM\u{1b}[0m t"),
            "Syntax error: at SELEC * FROM t"
        );
    }
}
