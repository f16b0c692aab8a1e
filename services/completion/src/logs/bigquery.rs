//! The BigQuery sink: rows go in through a DML `MERGE` keyed on the row's id (`jobs.query`), so a
//! pass that wrote its rows and was killed before recording that writes them again harmlessly.
//!
//! The columns come from the table schemas that Terraform creates the tables from
//! (`terraform/schemas/*.json`), so the two cannot drift apart; rows travel as one
//! `ARRAY<STRUCT<…>>` query parameter, never spliced into the SQL.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{DeliveryLog, LogError, LogSink, RequestLog};
use haishin_shared::gcp::{BigQuery, GcpArgs};

/// The schema of the `deliveries` table, as Terraform creates it.
pub const DELIVERIES_SCHEMA: &str = include_str!("../../../../terraform/schemas/deliveries.json");
/// The schema of the `requests` table, as Terraform creates it.
pub const REQUESTS_SCHEMA: &str = include_str!("../../../../terraform/schemas/requests.json");

/// How long a `MERGE` may run before the pass gives up on it (the next pass writes its rows).
const MERGE_WAIT: Duration = Duration::from_secs(300);

/// A column of a table schema file.
#[derive(Debug, Clone, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// The columns of a schema file (`[{"name", "type", "mode", "description"}, …]`).
pub fn columns(schema: &str) -> Result<Vec<Column>, LogError> {
    let columns: Vec<Column> =
        serde_json::from_str(schema).map_err(|e| LogError(format!("unreadable table schema: {e}")))?;
    for column in &columns {
        if !matches!(column.kind.as_str(), "STRING" | "INT64" | "TIMESTAMP" | "JSON") {
            return Err(LogError(format!(
                "column {} has type {}, which rows cannot carry",
                column.name, column.kind
            )));
        }
    }
    Ok(columns)
}

/// One table and the column that identifies its rows.
#[derive(Debug, Clone)]
struct Table {
    name: &'static str,
    key: &'static str,
    columns: Vec<Column>,
}

impl Table {
    /// `MERGE` of the `@rows` parameter into the table: rows whose key is present are left alone.
    fn merge(&self, project: &str, dataset: &str) -> String {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let picked: Vec<String> = names.iter().map(|n| format!("r.{n} AS {n}")).collect();
        let values: Vec<String> = names.iter().map(|n| format!("s.{n}")).collect();
        format!(
            "MERGE `{project}.{dataset}.{table}` AS t \
             USING (SELECT {picked} FROM UNNEST(@rows) AS r) AS s ON t.{key} = s.{key} \
             WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values})",
            table = self.name,
            key = self.key,
            picked = picked.join(", "),
            names = names.join(", "),
            values = values.join(", "),
        )
    }

    /// The `@rows` parameter: one struct per row, typed as the table's columns.
    fn parameter<T: Serialize>(&self, rows: &[T]) -> Result<Value, LogError> {
        let struct_types: Vec<Value> =
            self.columns.iter().map(|c| json!({ "name": c.name, "type": { "type": c.kind } })).collect();
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            let row = serde_json::to_value(row).map_err(|e| LogError(format!("{}: {e}", self.name)))?;
            let mut fields = serde_json::Map::new();
            for column in &self.columns {
                let value = encode(&column.kind, row.get(&column.name).unwrap_or(&Value::Null))
                    .map_err(|e| LogError(format!("{}.{}: {e}", self.name, column.name)))?;
                fields
                    .insert(column.name.clone(), value.map_or_else(|| json!({}), |v| json!({ "value": v })));
            }
            values.push(json!({ "structValues": fields }));
        }
        Ok(json!({
            "name": "rows",
            "parameterType": { "type": "ARRAY", "arrayType": { "type": "STRUCT", "structTypes": struct_types } },
            "parameterValue": { "arrayValues": values },
        }))
    }
}

/// A row's field as a query parameter value (`None`: NULL).
fn encode(kind: &str, value: &Value) -> Result<Option<String>, String> {
    Ok(match (kind, value) {
        (_, Value::Null) => None,
        ("JSON", value) => Some(value.to_string()),
        ("TIMESTAMP", Value::String(text)) => {
            let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| format!("{text}: {e}"))?;
            Some(at.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string())
        }
        ("STRING", Value::String(text)) => Some(text.clone()),
        ("INT64", Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        (kind, value) => return Err(format!("{value} is not a {kind}")),
    })
}

/// Writes the logs to BigQuery (dataset `haishin` by default, tables `deliveries` and `requests`).
#[derive(Debug, Clone)]
pub struct BigQuerySink {
    bigquery: BigQuery,
    dataset: String,
    deliveries: Table,
    requests: Table,
}

impl BigQuerySink {
    pub fn new(gcp: &GcpArgs, dataset: &str) -> anyhow::Result<Self> {
        Ok(Self {
            bigquery: BigQuery::new(gcp, None)?,
            dataset: dataset.to_owned(),
            deliveries: Table { name: "deliveries", key: "chunk_id", columns: columns(DELIVERIES_SCHEMA)? },
            requests: Table { name: "requests", key: "request_id", columns: columns(REQUESTS_SCHEMA)? },
        })
    }

    async fn merge<T: Serialize>(&self, table: &Table, rows: &[T]) -> Result<(), LogError> {
        if rows.is_empty() {
            return Ok(());
        }
        let sql = table.merge(self.bigquery.project(), &self.dataset);
        self.bigquery
            .query(&sql, vec![table.parameter(rows)?], MERGE_WAIT)
            .await
            .map(drop)
            .map_err(|e| LogError(format!("BigQuery table {}.{}: {e}", self.dataset, table.name)))
    }
}

#[async_trait::async_trait]
impl LogSink for BigQuerySink {
    async fn write_deliveries(&self, rows: &[DeliveryLog]) -> Result<(), LogError> {
        self.merge(&self.deliveries, rows).await
    }

    async fn write_requests(&self, rows: &[RequestLog]) -> Result<(), LogError> {
        self.merge(&self.requests, rows).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_encoded_as_bigquery_parameters() {
        assert_eq!(encode("INT64", &json!(42)), Ok(Some("42".into())));
        assert_eq!(encode("STRING", &Value::Null), Ok(None));
        assert_eq!(encode("JSON", &json!({"a": 1})), Ok(Some(r#"{"a":1}"#.into())));
        assert_eq!(
            encode("TIMESTAMP", &json!("2026-11-24T01:02:03.5Z")),
            Ok(Some("2026-11-24 01:02:03.500000+00:00".into()))
        );
        assert!(encode("INT64", &json!("seven")).is_err());
    }

    #[test]
    fn the_merge_names_every_column_and_keys_on_the_id() {
        let table =
            Table { name: "deliveries", key: "chunk_id", columns: columns(DELIVERIES_SCHEMA).unwrap() };
        let sql = table.merge("p", "haishin");
        assert!(sql.starts_with("MERGE `p.haishin.deliveries` AS t"), "{sql}");
        assert!(sql.contains("ON t.chunk_id = s.chunk_id WHEN NOT MATCHED THEN INSERT"), "{sql}");
        for column in &table.columns {
            assert!(sql.contains(&format!("r.{0} AS {0}", column.name)), "{sql}");
        }
    }
}
