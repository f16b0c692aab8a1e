//! The Cloud Tasks REST v2 methods, with the JSON the official client sends and reads.
//!
//! The client asks for `$alt=json;enum-encoding=int`, so enums go out as integers; both
//! integers and names are accepted on the way in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{MAX_TASK_BYTES, QueueHandle, Service, Task, valid_id};
use crate::server::ApiError;

/// The default dispatch deadline of an HTTP task.
const DEFAULT_DISPATCH_DEADLINE: Duration = Duration::from_secs(600);
/// Headers a task cannot set: Cloud Tasks sets or strips them.
const RESERVED_HEADERS: [&str; 4] = ["host", "content-length", "user-agent", "authorization"];
const RESERVED_HEADER_PREFIXES: [&str; 3] = ["x-cloudtasks-", "x-google-", "x-appengine-"];
/// `google.cloud.tasks.v2.HttpMethod`, by number.
const METHODS: [&str; 8] = ["POST", "POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"];
/// `Task.View`: BASIC leaves the body out, FULL includes it.
const VIEW_BASIC: i64 = 1;
const VIEW_FULL: i64 = 2;

type QueuePath = Path<(String, String, String)>;
type TaskPath = Path<(String, String, String, String)>;

pub(super) fn router(service: Arc<Service>) -> Router {
    Router::new()
        .route("/v2/projects/{project}/locations/{location}/queues/{queue}", get(get_queue))
        .route(
            "/v2/projects/{project}/locations/{location}/queues/{queue}/tasks",
            get(list_tasks).post(create_task),
        )
        .route(
            "/v2/projects/{project}/locations/{location}/queues/{queue}/tasks/{task}",
            get(get_task).delete(delete_task),
        )
        .fallback(|| async { ApiError::not_found("method not found in the Cloud Tasks stand-in") })
        .with_state(service)
}

/// The body of `CreateTask` (the parent travels in the path).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateTaskBody {
    task: Option<TaskJson>,
    response_view: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TaskJson {
    name: String,
    http_request: Option<HttpRequestJson>,
    app_engine_http_request: Option<Value>,
    schedule_time: Option<String>,
    dispatch_deadline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct HttpRequestJson {
    url: String,
    http_method: Option<Value>,
    headers: HashMap<String, String>,
    body: Option<String>,
    oidc_token: Option<OidcTokenJson>,
    oauth_token: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct OidcTokenJson {
    service_account_email: String,
    audience: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ViewQuery {
    response_view: Option<String>,
}

async fn create_task(
    State(service): State<Arc<Service>>,
    Path((p, l, q)): QueuePath,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let queue = find_queue(&service, &p, &l, &q)?;
    let request: CreateTaskBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_argument(format!("Invalid JSON payload received. {e}")))?;
    let view = view_of(request.response_view.as_ref());
    let task = parse_task(request.task.unwrap_or_default(), &queue.config.name)?;
    let task = queue.add(task).map_err(|_| {
        ApiError::rpc(StatusCode::CONFLICT, "ALREADY_EXISTS", "Requested entity already exists")
    })?;
    Ok(Json(task_json(&task, &queue.config.name, view)))
}

async fn get_task(
    State(service): State<Arc<Service>>,
    Path((p, l, q, t)): TaskPath,
    Query(query): Query<ViewQuery>,
) -> Result<Json<Value>, ApiError> {
    let queue = find_queue(&service, &p, &l, &q)?;
    let view = view_of(query.response_view.map(Value::String).as_ref());
    let state = queue.state.lock().expect("queue lock");
    match state.tasks.get(&t) {
        Some(task) => Ok(Json(task_json(task, &queue.config.name, view))),
        None => Err(task_not_found(state.finished_recently(&t))),
    }
}

async fn list_tasks(
    State(service): State<Arc<Service>>,
    Path((p, l, q)): QueuePath,
    Query(query): Query<ViewQuery>,
) -> Result<Json<Value>, ApiError> {
    let queue = find_queue(&service, &p, &l, &q)?;
    let view = view_of(query.response_view.map(Value::String).as_ref());
    let state = queue.state.lock().expect("queue lock");
    let mut tasks: Vec<&Task> = state.tasks.values().collect();
    tasks.sort_by(|a, b| (a.schedule_time, &a.id).cmp(&(b.schedule_time, &b.id)));
    let tasks: Vec<Value> = tasks.into_iter().map(|t| task_json(t, &queue.config.name, view)).collect();
    Ok(Json(json!({ "tasks": tasks })))
}

async fn delete_task(
    State(service): State<Arc<Service>>,
    Path((p, l, q, t)): TaskPath,
) -> Result<Json<Value>, ApiError> {
    let queue = find_queue(&service, &p, &l, &q)?;
    let mut state = queue.state.lock().expect("queue lock");
    match state.finish(&t, queue.config.name_ttl) {
        Some(_) => Ok(Json(json!({}))),
        None => Err(task_not_found(state.finished_recently(&t))),
    }
}

async fn get_queue(
    State(service): State<Arc<Service>>,
    Path((p, l, q)): QueuePath,
) -> Result<Json<Value>, ApiError> {
    let queue = find_queue(&service, &p, &l, &q)?;
    let config = &queue.config;
    Ok(Json(json!({
        "name": config.name,
        "rateLimits": {
            "maxDispatchesPerSecond": config.max_dispatches_per_second,
            "maxBurstSize": config.burst() as i64,
            "maxConcurrentDispatches": config.max_concurrent_dispatches,
        },
        "retryConfig": {
            "maxAttempts": config.max_attempts,
            "minBackoff": duration_json(config.min_backoff),
            "maxBackoff": duration_json(config.max_backoff),
            "maxDoublings": config.max_doublings,
        },
        "state": 1, // RUNNING
    })))
}

fn find_queue(
    service: &Service,
    project: &str,
    location: &str,
    queue: &str,
) -> Result<Arc<QueueHandle>, ApiError> {
    let name = format!("projects/{project}/locations/{location}/queues/{queue}");
    service.queue(&name).ok_or_else(|| ApiError::not_found(format!("Queue does not exist. ({name})")))
}

fn task_not_found(existed: bool) -> ApiError {
    if existed {
        ApiError::not_found(
            "The task no longer exists, though a task with this name existed recently. \
             The task either successfully completed or was deleted.",
        )
    } else {
        ApiError::not_found("Requested entity was not found.")
    }
}

/// Checks a task from the wire and turns it into the queue's form.
fn parse_task(json: TaskJson, queue_name: &str) -> Result<Task, ApiError> {
    if json.app_engine_http_request.is_some() {
        return Err(ApiError::invalid_argument("App Engine tasks are not supported by the stand-in"));
    }
    let http =
        json.http_request.ok_or_else(|| ApiError::invalid_argument("task.http_request is required"))?;
    if http.oauth_token.is_some() {
        return Err(ApiError::invalid_argument("OAuth tokens are not supported by the stand-in"));
    }
    let id = if json.name.is_empty() {
        uuid::Uuid::new_v4().as_u64_pair().0.to_string()
    } else {
        match json.name.strip_prefix(queue_name).and_then(|rest| rest.strip_prefix("/tasks/")) {
            Some(id) if valid_id(id) => id.to_owned(),
            _ => {
                return Err(ApiError::invalid_argument(format!(
                    "task name {} is not of the form {queue_name}/tasks/TASK_ID",
                    json.name
                )));
            }
        }
    };
    let url =
        reqwest::Url::parse(&http.url).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(
            || ApiError::invalid_argument(format!("HttpRequest.url {:?} must be an http(s) URL", http.url)),
        )?;
    let method = method_of(http.http_method.as_ref())?;
    let body = match &http.body {
        Some(b64) => {
            STANDARD.decode(b64).map_err(|e| ApiError::invalid_argument(format!("HttpRequest.body: {e}")))?
        }
        None => Vec::new(),
    };
    let mut headers = Vec::new();
    for (name, value) in http.headers {
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str())
            || RESERVED_HEADER_PREFIXES.iter().any(|p| lower.starts_with(p))
        {
            continue;
        }
        if HeaderName::from_bytes(name.as_bytes()).is_err() || HeaderValue::from_str(&value).is_err() {
            return Err(ApiError::invalid_argument(format!("invalid header {name}")));
        }
        headers.push((name, value));
    }
    if !body.is_empty() && !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
        headers.push(("Content-Type".to_owned(), "application/octet-stream".to_owned()));
    }
    let size =
        url.as_str().len() + body.len() + headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
    if size > MAX_TASK_BYTES {
        return Err(ApiError::invalid_argument(format!(
            "Task size too large: {size} bytes, the limit is {MAX_TASK_BYTES}"
        )));
    }
    let oidc = match http.oidc_token {
        Some(token) if token.service_account_email.is_empty() => {
            return Err(ApiError::invalid_argument("OidcToken.service_account_email is required"));
        }
        Some(token) => {
            let audience = if token.audience.is_empty() { http.url.clone() } else { token.audience };
            Some((token.service_account_email, audience))
        }
        None => None,
    };
    let now = Utc::now();
    let schedule_time = match json.schedule_time.as_deref() {
        Some(text) => DateTime::parse_from_rfc3339(text)
            .map_err(|e| ApiError::invalid_argument(format!("scheduleTime {text:?}: {e}")))?
            .with_timezone(&Utc),
        None => now,
    };
    let dispatch_deadline = match json.dispatch_deadline.as_deref() {
        Some(text) => parse_duration(text)
            .ok_or_else(|| ApiError::invalid_argument(format!("dispatchDeadline {text:?}")))?,
        None => DEFAULT_DISPATCH_DEADLINE,
    };
    Ok(Task {
        id,
        method,
        url,
        url_text: http.url,
        headers,
        body: body.into(),
        oidc,
        schedule_time,
        create_time: now,
        dispatch_deadline,
        dispatch_count: 0,
        response_count: 0,
        last_status: None,
        first_attempt: None,
        last_attempt: None,
        redelivered: false,
    })
}

/// The task as the API returns it.
fn task_json(task: &Task, queue_name: &str, view: i64) -> Value {
    let method = METHODS.iter().skip(1).position(|m| *m == task.method.as_str()).map_or(1, |i| i + 1);
    let mut http = json!({
        "url": task.url_text,
        "httpMethod": method,
        "headers": task.headers.iter().cloned().collect::<HashMap<_, _>>(),
    });
    if view == VIEW_FULL && !task.body.is_empty() {
        http["body"] = STANDARD.encode(&task.body).into();
    }
    if let Some((email, audience)) = &task.oidc {
        http["oidcToken"] = json!({ "serviceAccountEmail": email, "audience": audience });
    }
    let mut out = json!({
        "name": format!("{queue_name}/tasks/{}", task.id),
        "httpRequest": http,
        "scheduleTime": timestamp_json(task.schedule_time),
        "createTime": timestamp_json(task.create_time),
        "dispatchDeadline": duration_json(task.dispatch_deadline),
        "dispatchCount": task.dispatch_count,
        "responseCount": task.response_count,
        "view": view,
    });
    if let Some(at) = task.first_attempt {
        out["firstAttempt"] = json!({ "dispatchTime": timestamp_json(at) });
    }
    if let Some(at) = task.last_attempt {
        out["lastAttempt"] = json!({ "dispatchTime": timestamp_json(at) });
    }
    out
}

/// `HttpMethod` from its number or name; unspecified means POST.
fn method_of(value: Option<&Value>) -> Result<reqwest::Method, ApiError> {
    let name = match value {
        None | Some(Value::Null) => "POST",
        Some(Value::Number(n)) => {
            n.as_u64().and_then(|i| METHODS.get(usize::try_from(i).ok()?)).copied().unwrap_or("")
        }
        Some(Value::String(s)) if s == "HTTP_METHOD_UNSPECIFIED" => "POST",
        Some(Value::String(s)) => METHODS.iter().find(|m| *m == s).copied().unwrap_or(""),
        Some(_) => "",
    };
    name.parse().map_err(|_| ApiError::invalid_argument(format!("unknown HttpRequest.http_method {value:?}")))
}

/// `Task.View` from its number or name; BASIC unless FULL is asked for.
fn view_of(value: Option<&Value>) -> i64 {
    let full = match value {
        Some(Value::Number(n)) => n.as_i64() == Some(VIEW_FULL),
        Some(Value::String(s)) => s == "FULL" || s.parse::<i64>().ok() == Some(VIEW_FULL),
        _ => false,
    };
    if full { VIEW_FULL } else { VIEW_BASIC }
}

/// A protobuf JSON duration such as `"600s"` or `"0.100s"`.
fn parse_duration(text: &str) -> Option<Duration> {
    let seconds: f64 = text.strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

fn duration_json(duration: Duration) -> String {
    match duration.subsec_nanos() {
        0 => format!("{}s", duration.as_secs()),
        _ => format!("{:.9}s", duration.as_secs_f64()),
    }
}

fn timestamp_json(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_views_read_numbers_and_names() {
        assert_eq!(method_of(None).unwrap(), reqwest::Method::POST);
        assert_eq!(method_of(Some(&json!(0))).unwrap(), reqwest::Method::POST);
        assert_eq!(method_of(Some(&json!(2))).unwrap(), reqwest::Method::GET);
        assert_eq!(method_of(Some(&json!("PUT"))).unwrap(), reqwest::Method::PUT);
        assert!(method_of(Some(&json!(9))).is_err());
        assert_eq!(view_of(Some(&json!(2))), VIEW_FULL);
        assert_eq!(view_of(Some(&json!("FULL"))), VIEW_FULL);
        assert_eq!(view_of(None), VIEW_BASIC);
    }

    #[test]
    fn durations_round_trip_through_protobuf_json() {
        assert_eq!(parse_duration("600s"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("0.100s"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(duration_json(Duration::from_millis(100)), "0.100000000s");
        assert_eq!(duration_json(Duration::from_secs(3600)), "3600s");
    }
}
