//! The queue store alone, without QUIC: what one durable batch commit of
//! `n` sends costs, beside the disk's own floor (append + fdatasync, what
//! Redis with `appendfsync always` pays per write):
//!
//! ```sh
//! cargo bench -p securechat-relay --bench store
//! ```
//!
//! The relay's send path can answer no faster than these commits; the
//! difference between them and the QUIC bench is the network and request
//! handling.

use std::io::Write;
use std::time::{Duration, Instant};

use securechat_common::MessageId;
use securechat_relay::store::{Account, QueueLimits, QueueOp, Quota, RedbStore, Store};

/// About the size of a sealed one-recipient chat envelope.
const ENVELOPE_LEN: usize = 700;
const COMMITS: usize = 300;
/// Sender and recipient pairs the sends are spread over.
const PAIRS: u64 = 16;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1e3
}

fn report(label: &str, per_commit: usize, mut times: Vec<Duration>) {
    let total: Duration = times.iter().sum();
    times.sort();
    println!(
        "{label}: {:>7.0} ops/s  (commit p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
        (times.len() * per_commit) as f64 / total.as_secs_f64(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        percentile(&times, 1.0),
    );
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    // The floor: one append and one fdatasync per write.
    let mut file = std::fs::File::create(dir.path().join("append.log"))?;
    let record = vec![7u8; ENVELOPE_LEN];
    let mut times = Vec::with_capacity(COMMITS);
    for _ in 0..COMMITS {
        let start = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        times.push(start.elapsed());
    }
    report("append + fdatasync   ", 1, times);

    let store = RedbStore::open(&dir.path().join("relay.redb"))?;
    for i in 0..PAIRS {
        store.activate(&Account {
            username: format!("bob{i}"),
            email: format!("bob{i}@x.test"),
            password_phc: "phc".into(),
            public_key: vec![1],
            totp_secret: zeroize::Zeroizing::new(vec![4; 20]),
            created_unix: 1,
        })?;
    }
    let limits = QueueLimits::quota_only(Quota {
        messages: u64::MAX,
        bytes: u64::MAX,
    });
    let mut next = 0u64;
    for batch in [1usize, 16, 64, 256] {
        let mut times = Vec::with_capacity(COMMITS);
        for _ in 0..COMMITS {
            let ops: Vec<QueueOp> = (0..batch)
                .map(|_| {
                    next += 1;
                    let mut id = [0u8; 16];
                    id[8..].copy_from_slice(&next.to_be_bytes());
                    // As the load tool's senders: each writes to its own
                    // recipient, so a batch touches up to PAIRS queues.
                    let pair = next % PAIRS;
                    QueueOp::Enqueue {
                        recipient: format!("bob{pair}"),
                        sender: format!("alice{pair}"),
                        id: MessageId(id),
                        envelope: vec![9u8; ENVELOPE_LEN],
                        now: 1,
                    }
                })
                .collect();
            let start = Instant::now();
            store.write_queue_batch(&ops, limits)?;
            times.push(start.elapsed());
        }
        report(&format!("redb batch of {batch:>3} sends"), batch, times);
    }
    Ok(())
}
