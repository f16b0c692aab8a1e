//! The throwaway cluster survives a crash-like restart with its data, and the store reconnects.

use haishin_shared::domain::RequestId;
use haishin_shared::store::Store;
use haishin_stand_ins::postgres::PgCluster;

#[tokio::test]
async fn the_store_reconnects_after_postgres_restarts_and_keeps_its_data() {
    if std::env::var_os("DATABASE_URL").is_some() {
        eprintln!("skipped: DATABASE_URL names a server this test must not restart");
        return;
    }
    let cluster = PgCluster::start().await.unwrap();
    let store = Store::connect(&cluster.create_database().await.unwrap(), 2).await.unwrap();
    store.migrate().await.unwrap();
    let id = RequestId::from("kept");
    haishin_trigger::intake::records::insert_rejected(&store, &id, "before the restart").await.unwrap();

    cluster.restart().await.unwrap();

    let row = store.request(&id).await.unwrap().expect("data kept");
    assert_eq!(row.reason.as_deref(), Some("before the restart"));
    cluster.stop().await;
}
