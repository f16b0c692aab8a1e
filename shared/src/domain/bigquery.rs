//! A `bigquery` audience: a query (with named parameters) or a table, and how its parts are
//! checked before the request is accepted.
//!
//! Parameters travel to BigQuery as named query parameters (`@name` in the query), never spliced
//! into the SQL; a table name is checked against a strict pattern so that it can be written
//! between backquotes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::RequestId;

/// Longest query accepted, in bytes (BigQuery's own limit is 1,024 KB).
pub const MAX_QUERY_BYTES: usize = 1_000_000;
/// Most named parameters a query may take.
pub const MAX_PARAMETERS: usize = 100;

/// The suffix of export shards: BigQuery's `JSON` format is newline-delimited JSON. Chunk objects
/// end `.ndjson`, so a lifecycle rule on `requests/` with this suffix reaches exports alone.
pub const EXPORT_SUFFIX: &str = ".json";

/// Where a request's BigQuery export is written: `requests/<id>/export/`, beside its chunks.
pub fn export_prefix(request: &RequestId) -> String {
    format!("requests/{request}/export/")
}

/// The id of a request's `attempt`-th export job. BigQuery never reuses a job id, so the same
/// request in the same bucket always finds its own jobs, and a repeated prepare step finds the
/// export an earlier one started instead of running another.
pub fn export_job_id(bucket: &str, request: &RequestId, attempt: u32) -> String {
    let digest =
        Sha256::new().chain_update(bucket).chain_update([0]).chain_update(request.as_str()).finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("haishin_export_{hex}_{attempt}")
}

/// Scalar types a parameter may name in its typed form (`{"type": "DATE", "value": "…"}`).
const SCALAR_TYPES: [&str; 12] = [
    "STRING",
    "INT64",
    "FLOAT64",
    "NUMERIC",
    "BIGNUMERIC",
    "BOOL",
    "DATE",
    "DATETIME",
    "TIME",
    "TIMESTAMP",
    "BYTES",
    "JSON",
];

/// A BigQuery query or table, exported to Cloud Storage and streamed. Exactly one of `query` and
/// `table` is given; `params` only with a query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BigqueryAudience {
    /// GoogleSQL returning one row per recipient: an `email` column and the template's parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `project.dataset.table` or `dataset.table`, read whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The query's named parameters: a string, integer, number, boolean or an array of one of
    /// them, or `{"type": "DATE", "value": "2026-12-01"}` (also `"ARRAY<DATE>"` with an array).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub params: Map<String, Value>,
}

/// A table named as `project.dataset.table` (the project may be absent: the job's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    pub project: Option<String>,
    pub dataset: String,
    pub table: String,
}

impl TableName {
    /// Parses a table name. Projects are lower-case letters, digits and `-`; datasets letters,
    /// digits and `_`; tables letters, digits, `_` and `-` (names with other characters, which
    /// BigQuery allows in tables, are refused here rather than quoted).
    pub fn parse(name: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "bigquery table `{name}` is not `project.dataset.table` or `dataset.table` of plain names"
            )
        };
        let parts: Vec<&str> = name.split('.').collect();
        let (project, dataset, table) = match parts.as_slice() {
            [p, d, t] => (Some(*p), *d, *t),
            [d, t] => (None, *d, *t),
            _ => return Err(bad()),
        };
        let project_ok = project.is_none_or(|p| {
            (1..=63).contains(&p.len())
                && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
        let dataset_ok = (1..=1024).contains(&dataset.len())
            && dataset.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let table_ok = (1..=1024).contains(&table.len())
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !(project_ok && dataset_ok && table_ok) {
            return Err(bad());
        }
        Ok(Self { project: project.map(str::to_owned), dataset: dataset.to_owned(), table: table.to_owned() })
    }

    /// The name between backquotes, with `default_project` when it names none.
    pub fn quoted(&self, default_project: &str) -> String {
        let project = self.project.as_deref().unwrap_or(default_project);
        format!("`{project}.{}.{}`", self.dataset, self.table)
    }
}

impl BigqueryAudience {
    /// Checks the audience: one of query and table, parameters BigQuery can take.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.query, &self.table) {
            (Some(query), None) => {
                if query.trim().trim_end_matches(';').trim().is_empty() {
                    return Err("bigquery query is empty".into());
                }
                if query.len() > MAX_QUERY_BYTES {
                    return Err(format!("bigquery query is longer than {MAX_QUERY_BYTES} bytes"));
                }
                self.parameters().map(drop)
            }
            (None, Some(table)) if !self.params.is_empty() => {
                TableName::parse(table)?;
                Err("bigquery params go with a query, not a table".into())
            }
            (None, Some(table)) => TableName::parse(table).map(drop),
            (Some(_), Some(_)) => Err("bigquery audience gives both a query and a table: give one".into()),
            (None, None) => Err("bigquery audience gives neither a query nor a table".into()),
        }
    }

    /// The parameters as BigQuery's REST API takes them (`queryParameters` of a query job).
    pub fn parameters(&self) -> Result<Vec<Value>, String> {
        if self.params.len() > MAX_PARAMETERS {
            return Err(format!("bigquery audience has more than {MAX_PARAMETERS} params"));
        }
        self.params.iter().map(|(name, value)| parameter(name, value)).collect()
    }
}

/// One named parameter (`{"name", "parameterType", "parameterValue"}`).
fn parameter(name: &str, value: &Value) -> Result<Value, String> {
    let valid_name = (1..=128).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!(
            "bigquery param `{name}` is not a name (letters, digits and _, not first a digit)"
        ));
    }
    let fail = |why: String| format!("bigquery param `{name}`: {why}");
    let (kind, value) = match value {
        Value::Object(typed) => typed_value(typed).map_err(fail)?,
        other => (inferred_type(other).map_err(fail)?, other.clone()),
    };
    let (parameter_type, parameter_value) = if let Some(element) = array_element(&kind) {
        let Value::Array(items) = &value else { return Err(fail(format!("a {kind} takes an array"))) };
        let values: Result<Vec<Value>, String> =
            items.iter().map(|item| scalar_value(element, item).map(|v| json!({ "value": v }))).collect();
        (
            json!({ "type": "ARRAY", "arrayType": { "type": element } }),
            json!({ "arrayValues": values.map_err(fail)? }),
        )
    } else {
        (json!({ "type": kind }), json!({ "value": scalar_value(&kind, &value).map_err(fail)? }))
    };
    Ok(json!({ "name": name, "parameterType": parameter_type, "parameterValue": parameter_value }))
}

/// `{"type": T, "value": V}`: the type as given, checked.
fn typed_value(typed: &Map<String, Value>) -> Result<(String, Value), String> {
    let (Some(Value::String(kind)), Some(value), 2) = (typed.get("type"), typed.get("value"), typed.len())
    else {
        return Err("an object param is {\"type\": \"DATE\", \"value\": \"…\"}".into());
    };
    let kind = kind.trim().to_ascii_uppercase().replace(' ', "");
    let scalar = array_element(&kind).unwrap_or(&kind);
    if !SCALAR_TYPES.contains(&scalar) {
        return Err(format!("type {kind} is not one of {} (or ARRAY<…> of one)", SCALAR_TYPES.join(", ")));
    }
    Ok((kind, value.clone()))
}

/// The type a plain JSON value stands for.
fn inferred_type(value: &Value) -> Result<String, String> {
    let scalar = |value: &Value| match value {
        Value::String(_) => Ok("STRING"),
        Value::Bool(_) => Ok("BOOL"),
        Value::Number(n) if n.is_i64() => Ok("INT64"),
        Value::Number(n) if n.is_f64() => Ok("FLOAT64"),
        Value::Number(_) => Err("the integer is too large for INT64: give it as a NUMERIC".to_owned()),
        Value::Null => Err("null has no type: give {\"type\": …, \"value\": null}".to_owned()),
        _ => Err("give a string, a number, a boolean or an array of one of them".to_owned()),
    };
    match value {
        Value::Array(items) => {
            let first = items
                .first()
                .ok_or("an empty array has no type: give {\"type\": \"ARRAY<…>\", \"value\": []}")?;
            let kind = scalar(first)?;
            if items.iter().any(|item| scalar(item) != Ok(kind)) {
                return Err(format!("the array mixes types (its first element is a {kind})"));
            }
            Ok(format!("ARRAY<{kind}>"))
        }
        other => scalar(other).map(str::to_owned),
    }
}

fn array_element(kind: &str) -> Option<&str> {
    kind.strip_prefix("ARRAY<")?.strip_suffix('>')
}

/// A scalar's `value`, as BigQuery takes it: text, or null.
fn scalar_value(kind: &str, value: &Value) -> Result<Value, String> {
    Ok(match (kind, value) {
        (_, Value::Null) => Value::Null,
        ("JSON", value) => Value::String(value.to_string()),
        (_, Value::String(text)) => Value::String(text.clone()),
        (_, Value::Number(n)) if kind != "BOOL" && kind != "STRING" => Value::String(n.to_string()),
        ("BOOL", Value::Bool(b)) => Value::String(b.to_string()),
        (kind, value) => return Err(format!("{value} is not a {kind}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audience(json: Value) -> Result<BigqueryAudience, String> {
        let audience: BigqueryAudience = serde_json::from_value(json).map_err(|e| e.to_string())?;
        audience.validate().map(|()| audience)
    }

    #[test]
    fn plain_values_become_typed_named_parameters() {
        let a = audience(json!({
            "query": "SELECT email FROM t WHERE name = @name AND n > @n",
            "params": { "name": "O'Brien", "n": 3, "ok": true, "tags": ["a", "b"], "day": { "type": "DATE", "value": "2026-12-01" } },
        }))
        .unwrap();
        let params = a.parameters().unwrap();
        let by_name = |n: &str| params.iter().find(|p| p["name"] == n).unwrap().clone();
        assert_eq!(by_name("name")["parameterType"], json!({ "type": "STRING" }));
        assert_eq!(by_name("name")["parameterValue"], json!({ "value": "O'Brien" }));
        assert_eq!(by_name("n")["parameterValue"], json!({ "value": "3" }));
        assert_eq!(by_name("ok")["parameterValue"], json!({ "value": "true" }));
        assert_eq!(
            by_name("tags")["parameterType"],
            json!({ "type": "ARRAY", "arrayType": { "type": "STRING" } })
        );
        assert_eq!(by_name("day")["parameterType"], json!({ "type": "DATE" }));
    }

    #[test]
    fn an_audience_is_a_query_or_a_table_never_both() {
        assert!(audience(json!({ "table": "p.d.t" })).is_ok());
        assert!(audience(json!({ "table": "d.t" })).is_ok());
        for (bad, says) in [
            (json!({}), "neither"),
            (json!({ "query": "SELECT 1", "table": "d.t" }), "both"),
            (json!({ "table": "d.t", "params": { "a": 1 } }), "with a query"),
            (json!({ "query": " ; " }), "empty"),
            (json!({ "table": "p.d.t`; DROP TABLE x; --" }), "plain names"),
            (json!({ "table": "a.b.c.d" }), "plain names"),
            (json!({ "query": "SELECT @1", "params": { "1": 1 } }), "not a name"),
            (json!({ "query": "SELECT @a", "params": { "a": null } }), "null"),
            (json!({ "query": "SELECT @a", "params": { "a": [1, "x"] } }), "mixes"),
            (
                json!({ "query": "SELECT @a", "params": { "a": { "type": "GEOGRAPHY", "value": "x" } } }),
                "not one of",
            ),
        ] {
            let err = audience(bad.clone()).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn exports_and_chunks_end_differently() {
        let id = RequestId::from("spring-sale");
        assert!(!super::super::chunk_object(&id, 1).ends_with(EXPORT_SUFFIX));
        assert!(export_prefix(&id).starts_with("requests/"));
        let job = export_job_id("b", &id, 0);
        assert_eq!(job, export_job_id("b", &id, 0));
        assert_ne!(job, export_job_id("b", &id, 1));
        assert_ne!(job, export_job_id("other", &id, 0));
        assert!(job.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{job}");
    }

    #[test]
    fn a_table_is_quoted_with_the_default_project_when_it_names_none() {
        assert_eq!(TableName::parse("d.t").unwrap().quoted("p"), "`p.d.t`");
        assert_eq!(TableName::parse("other-p.d.t-1").unwrap().quoted("p"), "`other-p.d.t-1`");
    }
}
