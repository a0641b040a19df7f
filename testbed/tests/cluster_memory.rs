//! The shared behavioural scenarios against the in-process memory implementation.

use ringcast_testbed::redis_cluster::scenarios::MemoryBackend;

ringcast_testbed::cluster_scenario_tests!(MemoryBackend::default());
