//! Scale-out: two cloud replicas on different ports share computed context KV through a real Redis, so a context
//! registered on one streams from the other with no second prefill.

use tandem_cloud::ServeOptions;
use tandem_common::codec::Codec;
use tandem_edge::chat::KvSource;
use tandem_tests::answers;
use tandem_tests::cloud::TestCloud;
use tandem_tests::redis::TestRedis;

const CONTEXT: &str = "Station log, week 12: the wind turbine on the north ridge was serviced on Tuesday; the \
greenhouse grew its first tomatoes; the radio operator, Ines, fixed the antenna with a spare coat hanger.";

#[test]
fn a_context_registered_on_one_replica_streams_from_another_without_a_second_prefill() {
    let redis = TestRedis::start();
    let replica = || {
        TestCloud::start(ServeOptions {
            redis: Some(redis.url()),
            ..Default::default()
        })
    };
    let (a, b) = (replica(), replica());
    assert_ne!(a.addr, b.addr);
    let id = a.register(CONTEXT);
    assert_eq!(a.metric("tandem_contexts_prefilled_total"), 1);

    // b lists it, and an edge asking b gets exactly the KV a computed: the local answer.
    let (status, list) = b.request("GET", "/v1/contexts", "");
    assert_eq!(status, 200);
    assert!(list.contains(&id), "{list}");
    let (got, source) = answers::from_cloud(&b.url(), &id, None, "Who fixed the antenna?");
    assert_eq!(source, KvSource::exact(Codec::Lossless));
    assert_eq!(
        got,
        answers::local(CONTEXT, "Who fixed the antenna?"),
        "the KV shared through Redis changed the answer"
    );

    // Registering the same text on b finds it too.
    let (status, _) = b.request(
        "POST",
        "/v1/contexts",
        &serde_json::json!({ "text": CONTEXT }).to_string(),
    );
    assert_eq!(status, 200, "already known, not created");
    assert_eq!(
        b.metric("tandem_contexts_prefilled_total"),
        0,
        "b never prefilled"
    );
    assert!(b.metric("tandem_store_hits_total") >= 1);

    // With Redis gone, a replica still serves what it holds.
    drop(redis);
    let (status, _) = b.request("GET", &format!("/v1/contexts/{id}"), "");
    assert_eq!(status, 200, "b keeps serving what it holds without Redis");
}
