//! Envelope crypto speed: `cargo bench -p securechat-common --bench envelope`.
//!
//! A plain timing loop (no criterion) so it builds fast on small machines;
//! each figure is the median of several rounds.

use std::time::{Duration, Instant};

use securechat_common::crypto::{IdentityKey, KeySize};
use securechat_common::envelope::{open, seal, MessageId, SealParams};

fn median_per_op(rounds: usize, iters: u32, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    for (size, label) in [
        (KeySize::Rsa2048, "rsa2048"),
        (KeySize::Rsa3072, "rsa3072"),
        (KeySize::Rsa4096, "rsa4096"),
    ] {
        let keygen = median_per_op(3, 2, || {
            IdentityKey::generate(size).expect("keygen");
        });
        let alice = IdentityKey::generate(size).expect("keygen");
        let bob = IdentityKey::generate(size).expect("keygen");
        for body_len in [100usize, 64 * 1024] {
            let body = vec![b'x'; body_len];
            let params = || SealParams {
                sender_key: &alice,
                sender: "alice",
                recipient: "bob",
                recipient_key: bob.public_key(),
                id: MessageId::random().expect("rng"),
                seq: 1,
                timestamp_ms: 0,
            };
            let sealed = seal(&params(), &body).expect("seal");
            let t_seal = median_per_op(5, 50, || {
                seal(&params(), &body).expect("seal");
            });
            let t_open = median_per_op(5, 50, || {
                open(&sealed, "bob", &bob, alice.public_key()).expect("open");
            });
            println!(
                "{label} body={body_len:>6}B  seal {:>8.3} ms  open {:>8.3} ms  ({:.0} seal+open/s)",
                t_seal.as_secs_f64() * 1e3,
                t_open.as_secs_f64() * 1e3,
                1.0 / (t_seal + t_open).as_secs_f64()
            );
        }
        println!("{label} keygen {:>8.1} ms", keygen.as_secs_f64() * 1e3);
    }
}
