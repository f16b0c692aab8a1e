//! A large audience prepared in parts: each byte range of a file by its own shard task, the
//! partitions of the addresses cut by tasks of their own, spread over two trigger instances, with every task
//! delivered again after it was acknowledged. The counts are exact, every address is kept once
//! (the first of its rows), across files, and no recipient is sent twice.

use std::time::Duration;

use haishin_local::stack::{BUCKET, LocalStack};
use haishin_stand_ins::Redelivery;
use haishin_tests::{TestStack, finished_within};
use serde_json::{Value, json};

/// Writes a CSV file of the rows given to the local Cloud Storage and returns its URI.
async fn csv_file(stack: &LocalStack, object: &str, rows: &[String]) -> String {
    let mut csv = String::from("email,name\n");
    for row in rows {
        csv.push_str(row);
        csv.push('\n');
    }
    stack.blobs.write(BUCKET, object, csv.into_bytes().into()).await.expect("audience written");
    format!("gs://{BUCKET}/{object}")
}

async fn parts_stack() -> LocalStack {
    let stack = TestStack {
        chunk_size: 50,
        triggers: 2,
        // About 2 KB of rows a partition: the 40 KB audience below spreads over many.
        prepare_partition_bytes: Some(2_000),
        ..TestStack::default()
    }
    .start()
    .await;
    stack.stand_ins.set_redelivery(Redelivery::with_probability(1.0)).expect("redelivery set");
    stack
}

fn batch(id: &str, uris: &[String]) -> Value {
    json!({"id": id, "class": "batch",
           "template": { "subject": "Hi {{name}}", "text": "Hello {{name}}" },
           "audience": {"gcs": {"uris": uris}}})
}

#[tokio::test]
async fn files_prepared_in_parts_are_deduplicated_across_files_and_counted_exactly() {
    let stack = parts_stack().await;
    // Three files of 400 rows; the second repeats 100 of the first's addresses (one in capitals),
    // the third 50 of the second's; a few bad rows in each.
    let people = |from: usize, to: usize| -> Vec<String> {
        (from..to).map(|i| format!("part-{i}@example.com,User {i}")).collect()
    };
    let mut first = people(0, 400);
    first.push("not-an-address,Bad".into());
    let mut second = people(300, 700);
    second[0] = "PART-300@Example.com,Shouted".into();
    second.push("short-row@example.com".into());
    let mut third = people(650, 1_050);
    third.push("two@@example.com,Bad".into());
    third.push("ünïcode@exämple.com,Fine".into());
    let uris = vec![
        csv_file(&stack, "audiences/parts/a.csv", &first).await,
        csv_file(&stack, "audiences/parts/b.csv", &second).await,
        csv_file(&stack, "audiences/parts/c.csv", &third).await,
    ];
    stack.requests_topic.publish(&batch("in-parts", &uris), &[]).await.expect("published");

    let status = finished_within(&stack, "in-parts", Duration::from_secs(120)).await;
    let rows = first.len() + second.len() + third.len();
    let recipients = 1_050 + 1;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["rows"], rows);
    assert_eq!(status["audience"]["recipients"], recipients);
    assert_eq!(
        status["audience"]["skipped"],
        json!({"invalid_email": 2, "missing_column": 1, "duplicate": 150}),
        "{status}"
    );
    assert_eq!(status["delivered"], recipients);

    // Each file read in byte ranges, each range a shard, and the shards cut in several groups,
    // every part done.
    let (shards, ranged, groups, cuts): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE kind = 'shard' AND done),
                count(*) FILTER (WHERE kind = 'shard' AND start_byte > 0),
                count(DISTINCT index >> 16) FILTER (WHERE kind = 'partition' AND done),
                count(*) FILTER (WHERE kind = 'partition' AND done)
           FROM prepare_parts WHERE request_id = 'in-parts'",
    )
    .fetch_one(stack.store.pool())
    .await
    .unwrap();
    assert!(shards > 3 && ranged > 0, "{shards} shards, {ranged} not at a file's start");
    assert!(groups >= 3 && cuts > groups, "{groups} groups, {cuts} cuts");

    let sim = stack.esp.report();
    assert_eq!(sim.requests["in-parts"].counts.unique, recipients as u64);
    assert_eq!(sim.deliveries.duplicates, 0);
    let (_, tasks_redelivered) = stack.redelivered();
    assert!(tasks_redelivered > 0, "no task was delivered again");
    // The chunk objects hold each address once (a tail piece shares its chunk's object).
    let mut addresses = std::collections::BTreeSet::new();
    let mut lines = 0;
    for object in stack.blobs.list(BUCKET, "requests/in-parts/chunks/").await.unwrap() {
        let data = stack.blobs.read_all(BUCKET, &object).await.unwrap();
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let recipient: Value = serde_json::from_slice(line).unwrap();
            addresses.insert(recipient["email"].as_str().unwrap().to_lowercase());
            lines += 1;
        }
    }
    assert_eq!((lines, addresses.len()), (recipients, recipients));
    assert!(addresses.contains("part-300@example.com") && addresses.contains("ünïcode@exämple.com"));
    stack.stop().await;
}

#[tokio::test]
async fn an_address_repeated_across_files_keeps_the_parameters_of_its_first_row() {
    let stack = parts_stack().await;
    let mut first: Vec<String> = (0..200).map(|i| format!("keep-{i}@example.com,First {i}")).collect();
    first.push("Shared@Example.com,From the first file".into());
    let mut second: Vec<String> = (200..400).map(|i| format!("keep-{i}@example.com,Second {i}")).collect();
    second.insert(0, "shared@example.com,From the second file".into());
    let uris = vec![
        csv_file(&stack, "audiences/keep/1.csv", &first).await,
        csv_file(&stack, "audiences/keep/2.csv", &second).await,
    ];
    stack.requests_topic.publish(&batch("keep-first", &uris), &[]).await.expect("published");

    let status = finished_within(&stack, "keep-first", Duration::from_secs(120)).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["recipients"], 401);
    assert_eq!(status["audience"]["skipped"], json!({"duplicate": 1}), "{status}");

    // The shared address is in one chunk, with the first file's parameters.
    let mut found = Vec::new();
    for object in stack.blobs.list(BUCKET, "requests/keep-first/chunks/").await.unwrap() {
        let data = stack.blobs.read_all(BUCKET, &object).await.unwrap();
        let text = String::from_utf8_lossy(&data).to_lowercase();
        for line in text.lines().filter(|l| l.contains("shared@example.com")) {
            found.push(line.to_owned());
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("from the first file"), "{found:?}");
    assert_eq!(stack.esp.report().deliveries.duplicates, 0);
    stack.stop().await;
}

/// The chunk objects of a request, by name, with their bytes.
async fn chunk_objects(stack: &LocalStack, id: &str) -> Vec<(String, Vec<u8>)> {
    let mut objects = Vec::new();
    for object in stack.blobs.list(BUCKET, &format!("requests/{id}/chunks/")).await.unwrap() {
        let data = stack.blobs.read_all(BUCKET, &object).await.unwrap();
        objects.push((object, data));
    }
    objects
}

#[tokio::test]
async fn cuts_of_shards_kept_in_memory_make_the_same_chunks_as_cuts_read_from_storage() {
    // The same audience, with repeats within and across its files, prepared by one trigger that
    // keeps what it spreads for its cuts, and by one that keeps nothing.
    let people = |from: usize, to: usize| -> Vec<String> {
        (from..to).map(|i| format!("same-{i}@example.com,User {i}")).collect()
    };
    let mut first = people(0, 500);
    first.extend(people(100, 120));
    let files = [first, people(400, 900)];
    let mut prepared = Vec::new();
    for kept_bytes in [None, Some(0)] {
        let stack = TestStack {
            chunk_size: 50,
            prepare_partition_bytes: Some(2_000),
            prepare_kept_bytes: kept_bytes,
            ..TestStack::default()
        }
        .start()
        .await;
        let mut uris = Vec::new();
        for (i, rows) in files.iter().enumerate() {
            uris.push(csv_file(&stack, &format!("audiences/same/{i}.csv"), rows).await);
        }
        stack.requests_topic.publish(&batch("same", &uris), &[]).await.expect("published");
        let status = finished_within(&stack, "same", Duration::from_secs(120)).await;
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(status["audience"]["recipients"], 900);
        assert_eq!(status["audience"]["skipped"], json!({"duplicate": 120}), "{status}");
        let parts_read = stack.stand_ins.storage.reads_under("requests/same/parts/");
        prepared.push((parts_read, chunk_objects(&stack, "same").await));
        stack.stop().await;
    }
    let [(read_kept, kept), (read_stored, stored)] = <[_; 2]>::try_from(prepared).unwrap();
    assert_eq!(read_kept, 0, "every cut read its shards from memory");
    assert!(read_stored > 0, "every cut read its shards from storage");
    assert!(kept.len() >= 18, "{} chunk objects", kept.len());
    assert!(kept == stored, "the same chunk objects, byte for byte");
}

#[tokio::test]
async fn a_csv_file_read_in_ranges_keeps_quoted_line_breaks_and_the_file_s_line_numbers() {
    let stack = parts_stack().await;
    // Every fifth address has a quoted field over two lines, with doubled quotes in it; one row
    // in the second half has a bad address.
    let mut csv = String::from("email,address\n");
    let mut bad_line = 0;
    for i in 0..600 {
        if i == 450 {
            bad_line = csv.matches('\n').count() + 1;
            csv.push_str("not-an-address-450,Nowhere\n");
        } else if i % 5 == 0 {
            csv.push_str(&format!("q-{i}@example.com,\"{i} Main St\nFlat \"\"{i}\"\"\"\n"));
        } else {
            csv.push_str(&format!("q-{i}@example.com,{i} Plain Road\n"));
        }
    }
    let object = "audiences/quoted.csv";
    stack.blobs.write(BUCKET, object, csv.into_bytes().into()).await.expect("audience written");
    let uri = format!("gs://{BUCKET}/{object}");
    let request = json!({"id": "quoted", "class": "batch",
        "template": { "subject": "Hi", "text": "To {{address}}" },
        "audience": {"gcs": {"uris": [uri.clone()]}}});
    stack.requests_topic.publish(&request, &[]).await.expect("published");

    let status = finished_within(&stack, "quoted", Duration::from_secs(120)).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["rows"], 600);
    assert_eq!(status["audience"]["recipients"], 599);
    assert_eq!(status["audience"]["skipped"], json!({"invalid_email": 1}), "{status}");
    assert_eq!(status["audience"]["skipped_at"]["invalid_email"], json!([format!("{uri}:{bad_line}")]));
    let ranges: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM prepare_parts WHERE request_id = 'quoted' AND kind = 'shard' AND start_byte > 0",
    )
    .fetch_one(stack.store.pool())
    .await
    .unwrap();
    assert!(ranges > 2, "the file was read in {ranges} ranges after its first");

    let mut addresses = std::collections::BTreeMap::new();
    for object in stack.blobs.list(BUCKET, "requests/quoted/chunks/").await.unwrap() {
        let data = stack.blobs.read_all(BUCKET, &object).await.unwrap();
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let recipient: Value = serde_json::from_slice(line).unwrap();
            let email = recipient["email"].as_str().unwrap().to_owned();
            addresses.insert(email, recipient["params"]["address"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(addresses.len(), 599);
    for i in (0..600).step_by(5).filter(|&i| i != 450) {
        assert_eq!(addresses[&format!("q-{i}@example.com")], format!("{i} Main St\nFlat \"{i}\""));
    }
    assert_eq!(stack.esp.report().deliveries.duplicates, 0);
    stack.stop().await;
}

#[tokio::test]
async fn a_shard_whose_worker_died_halfway_is_taken_over_and_done_again() {
    use haishin_shared::domain::RequestId;
    use haishin_shared::suppression::address_key;
    use haishin_trigger::prepare::parts::{part_object, partition_of};

    let stack = parts_stack().await;
    let people: Vec<String> = (0..1_400).map(|i| format!("taken-{i}@example.com,Person {i}")).collect();
    let uri = csv_file(&stack, "audiences/taken.csv", &people).await;
    stack.requests_topic.publish(&batch("taken-over", &[uri]), &[]).await.expect("published");

    // A worker takes the last shard (whose task waits behind the first shards') and dies after it
    // wrote part of a partition object: what it wrote holds an address the file does not.
    let pool = stack.store.pool();
    let (last, partitions) =
        haishin_tests::eventually("the shards to be planned", Duration::from_secs(30), || async {
            sqlx::query_as::<_, (i32, i32)>(
                "UPDATE prepare_parts p SET lease_until = now() + interval '3 seconds'
             FROM requests r
             WHERE p.request_id = 'taken-over' AND p.kind = 'shard' AND r.id = p.request_id
               AND NOT r.plan_open AND p.index = (SELECT max(index) FROM prepare_parts
                              WHERE request_id = 'taken-over' AND kind = 'shard')
               AND NOT p.done AND p.lease_until IS NULL
             RETURNING p.index, r.partitions",
            )
            .fetch_optional(pool)
            .await
            .unwrap()
        })
        .await;
    assert!(last >= 8, "the last shard, {last}, is queued behind the first ones");
    let id = RequestId::from("taken-over");
    let partition = partition_of(&address_key("taken-1399@example.com"), partitions as u32);
    let torn = r#"{"k":"ghost@example.com","s":0,"l":1,"r":{"email":"ghost@example.com","params":{"name":"Ghost"}}}"#;
    let object = part_object(&id, partition, last as u32, 0);
    stack.blobs.write(BUCKET, &object, format!("{torn}\n").into_bytes().into()).await.unwrap();

    let status = finished_within(&stack, "taken-over", Duration::from_secs(120)).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["recipients"], 1_400, "{status}");
    assert_eq!(status["audience"]["skipped"], json!({}), "{status}");
    let sim = stack.esp.report();
    assert_eq!(sim.requests["taken-over"].counts.unique, 1_400);
    assert_eq!(sim.deliveries.duplicates, 0);
    let chunks = stack.blobs.list(BUCKET, "requests/taken-over/chunks/").await.unwrap();
    for object in chunks {
        let data = stack.blobs.read_all(BUCKET, &object).await.unwrap();
        assert!(!String::from_utf8_lossy(&data).contains("ghost@"), "{object} holds the torn write");
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_cut_whose_worker_died_is_taken_over_once_its_lease_runs_out() {
    let stack = parts_stack().await;
    // The first cut is born held, as by a worker that claimed it and died, until every shard is
    // spread: the shards whose ends find it open cannot run it, and it must not be left without
    // a task to take it over.
    sqlx::raw_sql(
        "CREATE FUNCTION held_cut() RETURNS trigger AS $$
         BEGIN NEW.lease_until := now() + interval '8 seconds'; RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER held_cut BEFORE INSERT ON prepare_parts FOR EACH ROW
             WHEN (NEW.kind = 'partition' AND NEW.index = 0) EXECUTE FUNCTION held_cut();",
    )
    .execute(stack.store.pool())
    .await
    .unwrap();
    let people: Vec<String> = (0..1_400).map(|i| format!("held-{i}@example.com,Person {i}")).collect();
    let uri = csv_file(&stack, "audiences/held.csv", &people).await;

    stack.requests_topic.publish(&batch("held-cut", &[uri]), &[]).await.expect("published");

    let status = finished_within(&stack, "held-cut", Duration::from_secs(60)).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["recipients"], 1_400, "{status}");
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM prepare_parts WHERE request_id = 'held-cut' AND kind = 'partition' AND index = 0 AND done",
    )
    .fetch_one(stack.store.pool())
    .await
    .unwrap();
    assert_eq!(held, 1, "the held cut was done");
    let sim = stack.esp.report();
    assert_eq!(sim.requests["held-cut"].counts.unique, 1_400);
    assert_eq!(sim.deliveries.duplicates, 0);
    stack.stop().await;
}

#[tokio::test]
async fn the_first_chunks_are_stored_while_the_plan_still_reads_and_an_interrupted_plan_is_taken_up_again() {
    // Partitions of 600 KB: a 2.5 MB file is cut into shards of 256 KB, 512 KB, then 600 KB.
    let stack =
        TestStack { chunk_size: 5_000, prepare_partition_bytes: Some(600_000), ..TestStack::default() }
            .start()
            .await;
    stack.stand_ins.set_redelivery(Redelivery::with_probability(1.0)).expect("redelivery set");
    // The plan records its first shards one by one as it finds them, and the others together
    // once it has read the whole file. That last record stalls the first time, then fails, as a
    // plan whose instance died would.
    sqlx::raw_sql(
        "CREATE SEQUENCE plan_attempts;
         CREATE FUNCTION stalled_plan() RETURNS trigger AS $$
         BEGIN
             IF NEW.kind = 'shard' AND NEW.index >= 4 AND nextval('plan_attempts') = 1 THEN
                 PERFORM pg_sleep(3);
                 RAISE EXCEPTION 'the plan was interrupted';
             END IF;
             RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER stalled_plan BEFORE INSERT ON prepare_parts
             FOR EACH ROW EXECUTE FUNCTION stalled_plan();",
    )
    .execute(stack.store.pool())
    .await
    .unwrap();
    let people: Vec<String> =
        (0..50_000).map(|i| format!("streamed-{i:05}@example.com,Person number {i:05}")).collect();
    let uri = csv_file(&stack, "audiences/streamed.csv", &people).await;
    stack.requests_topic.publish(&batch("streamed", &[uri]), &[]).await.expect("published");

    // While the plan is open, the first shard's chunks are stored and on their way, and the
    // request is not summed.
    let pool = stack.store.pool();
    haishin_tests::eventually("a chunk stored while the plan is open", Duration::from_secs(30), || async {
        let (open, state, chunks): (bool, String, i64) = sqlx::query_as(
            "SELECT r.plan_open, r.state::text, (SELECT count(*) FROM chunks WHERE request_id = r.id)
             FROM requests r WHERE r.id = 'streamed'",
        )
        .fetch_optional(pool)
        .await
        .unwrap()?;
        (open && chunks > 0).then(|| assert_eq!(state, "preparing"))
    })
    .await;

    let status = finished_within(&stack, "streamed", Duration::from_secs(120)).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["rows"], 50_000, "{status}");
    assert_eq!(status["audience"]["recipients"], 50_000, "{status}");
    let attempts: i64 =
        sqlx::query_scalar("SELECT last_value FROM plan_attempts").fetch_one(pool).await.unwrap();
    assert!(attempts >= 2, "the plan was taken up again after it was interrupted");
    let (shards, open): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM prepare_parts WHERE request_id = r.id AND kind = 'shard'), r.plan_open
         FROM requests r WHERE r.id = 'streamed'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(shards >= 5 && !open, "{shards} shards, plan open: {open}");
    let sim = stack.esp.report();
    assert_eq!(sim.requests["streamed"].counts.unique, 50_000);
    assert_eq!(sim.deliveries.duplicates, 0);
    stack.stop().await;
}
