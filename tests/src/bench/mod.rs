//! `just bench`: CE-LSLM's experiments on our system — edge-only, cloud-only and tandem variants under emulated
//! 6G/5G/4G/poor links, one user and many — measured side by side in one run, written as JSON, a markdown report
//! and plots.

pub mod cloud_process;
pub mod links;
pub mod machine;
pub mod plots;
pub mod report;
pub mod results;
pub mod sse;
pub mod systems;
pub mod workload;
