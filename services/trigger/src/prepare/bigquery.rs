//! A `bigquery` audience: one `EXPORT DATA` job per request writes the query's rows (or the
//! table's) as newline-delimited JSON to `gs://<bucket>/requests/<id>/export/*.json`, and the
//! shards are then read as a `gcs` audience's files are.
//!
//! `EXPORT DATA OPTIONS(…) AS <query>` needs no table of ours: BigQuery runs the query and writes
//! its result straight to Cloud Storage (sharded at 1 GB a file, hence the wildcard), so there is
//! no temporary table to expire or delete. JSON rather than CSV: it keeps each column's type and
//! its NULLs, and exports nested and repeated columns, which CSV cannot.
//!
//! Idempotent: the job ids are derived from the bucket and the request id
//! ([`export_job_id`]), and BigQuery never reuses one. A prepare step repeated after a crash
//! (Cloud Tasks delivers again) looks its job up first and waits for it, or reads what it
//! exported, rather than exporting again; so the shards, and the chunks cut from them, are the
//! same on every attempt. Only a job that failed for a reason a retry can get past
//! (`backendError`, `rateLimitExceeded`, …) is followed by another, under the next id, writing
//! the same URIs with `overwrite=true`.

use std::time::Duration;

use haishin_shared::domain::{
    BigqueryAudience, DeliveryRequest, EXPORT_SUFFIX, TableName, export_job_id, export_prefix,
};
use haishin_shared::gcp::{BigQuery, BigQueryError, Blobs, GcpError, Job};

use super::PrepareError;

/// Export jobs tried for one request before it fails: each follows one that failed transiently.
const MAX_ATTEMPTS: u32 = 5;

/// The export statement: the audience's query (or the whole table) written to `uri`.
pub(crate) fn statement(audience: &BigqueryAudience, uri: &str, project: &str) -> Result<String, String> {
    let source = match (&audience.query, &audience.table) {
        (Some(query), _) => query.trim().trim_end_matches(';').trim_end().to_owned(),
        (None, Some(table)) => format!("SELECT * FROM {}", TableName::parse(table)?.quoted(project)),
        (None, None) => return Err("bigquery audience gives neither a query nor a table".into()),
    };
    Ok(format!(
        "EXPORT DATA OPTIONS(uri={}, format='JSON', overwrite=true) AS\n{source}",
        string_literal(uri)
    ))
}

/// A GoogleSQL string literal.
fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Exports the audience (or finds its export done) and returns the shards' object names, in
/// order, with their sizes.
#[tracing::instrument(skip_all, fields(request_id = %request.id))]
pub(super) async fn export(
    bigquery: &BigQuery,
    blobs: &Blobs,
    bucket: &str,
    request: &DeliveryRequest,
    audience: &BigqueryAudience,
    wait: Duration,
) -> Result<Vec<(String, u64)>, PrepareError> {
    let prefix = export_prefix(&request.id);
    let uri = format!("gs://{bucket}/{prefix}*{EXPORT_SUFFIX}");
    let sql = statement(audience, &uri, bigquery.project()).map_err(PrepareError::Unusable)?;
    let parameters = audience.parameters().map_err(PrepareError::Unusable)?;
    let mut last = None;
    for attempt in 0..MAX_ATTEMPTS {
        let id = export_job_id(bucket, &request.id, attempt);
        let (job, started_now) = match bigquery.job(&id).await.map_err(failed)? {
            Some(job) => (job, false),
            None => {
                let job = bigquery.insert_query(&id, &sql, parameters.clone()).await.map_err(failed)?;
                tracing::info!(job = %id, attempt, "Audience export started.");
                (job, true)
            }
        };
        let job = bigquery.wait_for(&id, job, wait).await.map_err(failed)?;
        if !job.done() {
            return Err(PrepareError::Storage(GcpError::Transient {
                what: "the BigQuery export",
                detail: format!("job {id} is still running; the next attempt waits for it"),
            }));
        }
        match job.error() {
            None => return shards(blobs, bucket, &prefix, &job).await,
            Some(err) if !err.transient => return Err(failed(err)),
            // Failed in this attempt: the task queue retries later, and then the next job starts.
            Some(err) if started_now => return Err(failed(err)),
            Some(err) => last = Some(err),
        }
    }
    let last = last.map_or_else(String::new, |e| format!(": {e}"));
    Err(PrepareError::Unusable(format!("BigQuery: the export failed {MAX_ATTEMPTS} times{last}")))
}

/// What a failed call or job means for the request: BigQuery's reason in its status when no
/// retry can help, a retry by the task queue otherwise.
fn failed(err: BigQueryError) -> PrepareError {
    if err.transient {
        PrepareError::Storage(err.into_gcp("the BigQuery export"))
    } else {
        PrepareError::Unusable(format!("BigQuery: {err}"))
    }
}

/// The export's shards, once all the files the job reports are there.
async fn shards(
    blobs: &Blobs,
    bucket: &str,
    prefix: &str,
    job: &Job,
) -> Result<Vec<(String, u64)>, PrepareError> {
    let names: Vec<(String, u64)> = blobs
        .list_sized(bucket, prefix)
        .await?
        .into_iter()
        .filter(|(n, _)| n.ends_with(EXPORT_SUFFIX))
        .collect();
    let reported = job.statistics["query"]["exportDataStatistics"]["fileCount"]
        .as_str()
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(reported) = reported
        && names.len() < reported
    {
        return Err(PrepareError::Storage(GcpError::Transient {
            what: "reading the BigQuery export",
            detail: format!("{} of the {reported} exported files are listed under {prefix}", names.len()),
        }));
    }
    let rows = job.statistics["query"]["exportDataStatistics"]["rowCount"].as_str().unwrap_or("?");
    tracing::info!(files = names.len(), rows, "Audience export read.");
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn audience(json: serde_json::Value) -> BigqueryAudience {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_query_is_exported_as_given_and_its_params_stay_out_of_the_sql() {
        let a = audience(
            json!({ "query": "SELECT email FROM d.t WHERE name = @name;\n", "params": { "name": "O'Brien" } }),
        );
        let sql = statement(&a, "gs://b/requests/r/export/*.json", "p").unwrap();
        assert_eq!(
            sql,
            "EXPORT DATA OPTIONS(uri='gs://b/requests/r/export/*.json', format='JSON', overwrite=true) AS\n\
             SELECT email FROM d.t WHERE name = @name"
        );
        assert!(!sql.contains("Brien"), "{sql}");
    }

    #[test]
    fn a_table_is_read_whole_under_its_backquoted_name() {
        let sql = statement(&audience(json!({ "table": "d.people" })), "gs://b/x/*.json", "p").unwrap();
        assert!(sql.ends_with("AS\nSELECT * FROM `p.d.people`"), "{sql}");
        assert_eq!(string_literal(r"it's \ here"), r"'it\'s \\ here'");
    }
}
