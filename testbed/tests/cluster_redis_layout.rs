//! Where Ringcast's keys and channels land in a real Redis Cluster.

use ringcast_shared::cluster::redis::keys::Keys;
use ringcast_testbed::redis_cluster::{RedisCluster, unique_prefix};
use std::collections::{HashMap, HashSet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_keys_share_a_slot_and_rooms_spread_over_every_master() {
    let cluster = RedisCluster::start().await.expect("cluster starts");
    let keys = Keys::new(&unique_prefix());

    let room = keys.room("team/alpha:general");
    let slot = cluster.keyslot(&room.channel).await.expect("keyslot");
    for key in [&room.meta, &room.log, &room.presence, &room.members] {
        assert_eq!(cluster.keyslot(key).await.expect("keyslot"), slot, "{key}");
    }
    let other = keys.room("team/beta");
    assert_ne!(cluster.keyslot(&other.meta).await.expect("keyslot"), slot);

    let topology = cluster.topology().await.expect("topology");
    let mut rooms_per_master: HashMap<u16, usize> = HashMap::new();
    let mut slots = HashSet::new();
    for n in 0..1000 {
        let channel = keys.room(&format!("room-{n}")).channel;
        let slot = cluster.keyslot(&channel).await.expect("keyslot");
        slots.insert(slot);
        let master = topology
            .iter()
            .find(|node| node.master && node.slots.iter().any(|(l, h)| (*l..=*h).contains(&slot)))
            .expect("every slot has a master");
        *rooms_per_master.entry(master.port).or_default() += 1;
    }
    assert_eq!(rooms_per_master.len(), 3, "{rooms_per_master:?}");
    for (master, rooms) in &rooms_per_master {
        assert!(
            *rooms > 200,
            "master {master} got only {rooms} of 1000 rooms"
        );
    }
    assert!(
        slots.len() > 900,
        "1000 rooms use only {} slots",
        slots.len()
    );
}
