//! A short soak: edges chatting (with signed tokens) through a relay that cuts and corrupts a third of the
//! connections mid-stream and loses packets, while the cloud is killed and restarted — every answer must still be
//! the right one (from the cloud, resumed, or a local fallback), none wrong, no request lost.

use std::time::Duration;

use tandem_tests::soak::{SoakConfig, run};

#[test]
fn every_request_gets_the_right_answer_through_faults_and_restarts() {
    let cfg = SoakConfig {
        requests: 100,
        max_duration: Duration::from_secs(240),
        edges: 3,
        fault_rate: 0.35,
        restart_every: Some(Duration::from_secs(4)),
        down_for: Duration::from_millis(700),
        ..SoakConfig::default()
    };
    let r = run(&cfg, &|_| {}).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", r.summary());
    assert_eq!(r.requests, cfg.requests, "the soak ran out of time");
    assert_eq!(r.wrong, 0, "wrong answers: {}", r.summary());
    assert!(r.errors.is_empty(), "{}", r.summary());
    assert_eq!(r.correct(), r.requests);
    assert!(r.restarts >= 1, "{}", r.summary());
    assert!(r.cuts + r.corruptions > 0, "{}", r.summary());
    assert!(r.losses > 0, "no loss emulated: {}", r.summary());
    assert!(
        r.correct_resumed + r.correct_local_fallback > 0,
        "no fault reached an edge: {}",
        r.summary()
    );
    assert!(r.correct_from_cloud > 0, "{}", r.summary());
}
