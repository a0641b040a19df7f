//! The reduced demo: a real Redis Cluster, three `ringcast-node` processes and one
//! `ringcast-edge` on loopback, 100 simulated clients over 10 rooms, every fault once with
//! short phases. No client, no acked message may be lost and nothing may be duplicated.
//!
//! The node and edge binaries are taken from the same target folder as this test
//! (`target/debug/`) and built with cargo when missing.

use std::time::Duration;

use ringcast_testbed::binaries::Build;
use ringcast_testbed::runner::{self, CommonOptions};
use ringcast_testbed::scenario::{Fault, RunPlan};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reduced_demo_loses_and_duplicates_nothing() {
    ringcast_testbed::process::install_panic_hook();
    let dir = tempfile::tempdir().unwrap();
    let options = CommonOptions {
        run_dir: Some(dir.path().join("run")),
        conf_dir: runner::default_conf_dir(),
        build: Build::IfMissing,
        nodes: 3,
        edge_grace: Duration::from_secs(3),
        live: false,
    };
    let plan = RunPlan {
        clients: 100,
        rooms: 10,
        rate: 50.0,
        connect_rate: 200.0,
        warmup: Duration::from_secs(2),
        settle: Duration::from_secs(3),
        resume_window: Duration::from_secs(30),
        faults: Fault::ALL.to_vec(),
    };

    let report = runner::run_plan("demo (reduced)", &options, &plan)
        .await
        .unwrap();
    let summary = report.markdown();
    println!("{summary}");

    let total = &report.total;
    assert!(report.fault_errors.is_empty(), "{summary}");
    assert!(report.unexpected_deaths.is_empty(), "{summary}");
    assert_eq!(total.clients_lost, 0, "{summary}");
    assert_eq!(total.lost_messages, 0, "{summary}");
    assert_eq!(total.duplicates, 0, "{summary}");
    assert!(report.passed, "{summary}");

    // The run really did something: messages flowed and the faults moved clients.
    assert!(total.acked > 500, "{summary}");
    assert!(total.expected > 4000, "{summary}");
    assert!(total.reconnects >= 100, "{summary}");
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    for fault in Fault::ALL {
        assert!(
            names.contains(&fault.name()),
            "phase {} missing",
            fault.name()
        );
    }
    for file in ["report.json", "report.md", "report.html"] {
        assert!(dir.path().join("run").join(file).exists(), "{file} missing");
    }
}
